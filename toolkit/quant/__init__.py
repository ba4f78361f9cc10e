"""Quant: exact quant sizes and mixed-precision quants assembled from published branches.

storage.py reads an EXL3 quant's quantization_config.json (exllamav3's tensor_storage: every stored tensor's shape
and bytes) into exact VRAM bytes per module, tensor group and layer, without loading anything; sizes.py turns that
into `deploy quant sizes`' report, with the model card's size beside the exact one. recipe.py plans a mix of two or
more quants of one model to an exact size (profiles/quant_mix.yaml), measurement.py checks exllamav3's measurement
of them, mix.py assembles it through mix_entry.py (exllamav3's own assembly, run by a runner) into a model folder
with a manifest. Dependencies point
cli -> quant -> facts; quant uses only toolkit.inputs, atomic, errors, validate and output besides.
"""

"""Facts the pipeline reads, each kept once: model profiles (profiles/*.yaml, loaded and validated into
ModelProfile), the TabbyAPI pin and its CUDA variants (profiles/tabbyapi.yaml), the GPU card table
(profiles/gpus.yaml) and where these data files live in a checkout or an installed wheel. Every stage may read
facts; facts import no stage.
"""

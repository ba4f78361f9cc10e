"""Detect: the GPUs a plan is made for, as a GpuInventory. From this host through NVML (the only I/O here, in
nvml.py), or from a `--gpus` spec such as 8x24GiB or 2xH200 (gpu_spec.py, using the card table in facts).
"""

"""Plan: GpuInventory + ModelProfile + PlanRequest -> Plan. The VRAM model of an exllamav3 load (memory.py), the
search for the lowest-KL quant, cache mode, split and context that fit (planner.py), and the typed Plan that every
later stage takes (plan.py). Pure: no NVML, Docker, network, clock or file access.
"""

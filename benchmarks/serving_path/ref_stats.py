"""Run `deploy reference compute` in-process and record its cost: wall time, torch's peak allocation and NVML's
peak used memory on GPU 0 (sampled every 5 ms), as JSON. The computation is the toolkit's own (Exl3Backend:
exllamav3 Model.forward over each whole prompt with no cache, i.e. FP16 activations and FP16 attention over the
prompt, no quantized KV cache), from the frozen snapshot on PYTHONPATH.

    python3 -P ref_stats.py --stats OUT.json -- reference compute --model-dir DIR --out REF.json.gz
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the deploy arguments")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv

    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    baseline = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.monotonic()
    import torch  # before the CLI, so its import time is reported apart (seconds_imports)

    from toolkit.cli import main as deploy

    import_s = time.monotonic() - started
    code = deploy(argv)
    elapsed = time.monotonic() - started
    stop.set()
    thread.join()
    stats = {
        "exit": code,
        "argv": argv,
        "seconds_total": round(elapsed, 2),
        "seconds_imports": round(import_s, 2),
        "torch_max_allocated_mib": round(torch.cuda.max_memory_allocated(0) / MIB, 1),
        "torch_max_reserved_mib": round(torch.cuda.max_memory_reserved(0) / MIB, 1),
        "nvml_baseline_mib": round(baseline / MIB, 1),
        "nvml_peak_mib": round(peak[0] / MIB, 1),
        "nvml_peak_delta_mib": round((peak[0] - baseline) / MIB, 1),
        "note": "NVML is per GPU, not per process: other processes on GPU 0 during the run count too",
    }
    args.stats.write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

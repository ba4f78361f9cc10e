"""Held-out memory loads: configurations the calibration (results.json) was NOT fitted on, measured with exactly
measure.py's method, to test the fitted memory model on data it has not seen (issue 11 item 2).

Held out in three ways at once: cache modes 6,5 and 4,4 (fitted: FP16, 5,4, 8,8), contexts 16k/32k/64k/128k on one
GPU (fitted: 8k, 256k), chunk size 1024 (fitted: 512, 2048, 4096), and a 4-layer slice (`make_glm_slice.py OUT
--dense 1 --moe 3`; fitted: 3 layers). measure.py is imported from the frozen snapshot (.dev/snap), so the method is
the calibration's to the line: TabbyAPI per configuration, NVML after load, during and after two one-chunk
completions. One direct exllamav3 probe (measure.py's probe-one, verbose loader) gives the chunk-1024 loader
transient, which the other chunk sizes take from the calibration's probes (fit.py's method).

    python3 -P heldout.py tabby --model SLICE --tabby TABBY_DIR --out OUT [--deadline-s N] [--only A,B]
    python3 -P heldout.py probe --model SLICE --out OUT
Both append to OUT/results.jsonl; heldout_fit.py turns the records into predicted-vs-measured.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SNAP = ROOT / ".dev/snap/benchmarks/memory_calibration"
sys.path.insert(0, str(SNAP if (SNAP / "measure.py").exists() else Path(__file__).resolve().parent))

import measure
from measure import LoadConfig

HELDOUT = [
    LoadConfig("4l-1gpu-q65-64k", "0", "single", 65536, "6,5"),
    LoadConfig("4l-1gpu-fp16-32k-chunk1024", "0", "single", 32768, "FP16", chunk_size=1024),
    LoadConfig("4l-1gpu-q44-128k", "0", "single", 131072, "4,4"),
    LoadConfig("4l-1gpu-q54-128k-chunk1024", "0", "single", 131072, "5,4", chunk_size=1024),
    LoadConfig("4l-1gpu-q65-16k-chunk512", "0", "single", 16384, "6,5", chunk_size=512),
    LoadConfig("4l-1gpu-fp16-64k-chunk4096", "0", "single", 65536, "FP16", chunk_size=4096),
]
PROBES = ["4l-1gpu-fp16-32k-chunk1024"]
TRANSIENT = re.compile(r"largest measured transient (\d+) MiB")


def run_tabby(args: argparse.Namespace) -> None:
    """measure.py's TabbyAPI measurement of each held-out configuration, until the deadline."""
    args.out.mkdir(parents=True, exist_ok=True)
    nvml = measure.Nvml()
    start = time.monotonic()
    measure.append(
        args.out,
        {
            "kind": "host",
            "gpus": nvml.info(),
            "baseline_mib": measure.mib(nvml.used()),
            "model": measure.model_bytes(args.model),
        },
    )
    prompts = measure.Prompts(args.model)
    only = set(args.only.split(",")) if args.only else None
    for n, cfg in enumerate(HELDOUT):
        if only and cfg.name not in only:
            continue
        if time.monotonic() - start > args.deadline_s:
            measure.append(args.out, {"kind": "skipped", "config": asdict(cfg), "reason": "deadline"})
            continue
        print(f"--- {cfg.name} at {time.monotonic() - start:.0f} s", flush=True)
        try:
            texts = prompts.make(min(cfg.chunk_size, 4096) - measure.PROMPT_MARGIN, 2)
            record = measure.measure_tabby(cfg, args, nvml, texts, 5200 + n)
        except Exception as exc:  # noqa: BLE001 - one broken load must not lose the others
            record = {"kind": "tabby", "config": asdict(cfg), "error": f"{type(exc).__name__}: {exc}"}
        measure.append(args.out, record)


def run_probes(args: argparse.Namespace) -> None:
    """measure.py's probe-one for each held-out probe, in a fresh process; the loader's transient from its log."""
    nvml = measure.Nvml()
    for name in PROBES:
        baseline = measure.wait_released(nvml, nvml.used(), 5)
        log_path = args.out / "probe.log"
        with open(log_path, "ab") as log:
            log.write(f"\n===== probe {name} =====\n".encode())
            log.flush()
            offset = log.tell()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-P",
                    __file__,
                    "probe-one",
                    "--model",
                    str(args.model),
                    "--out",
                    str(args.out),
                    "--config",
                    name,
                    "--baseline",
                    ",".join(str(b / measure.MIB) for b in baseline),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.load_timeout_s,
                check=False,
            )
        text = log_path.read_bytes()[offset:].decode(errors="replace")
        transients = [int(x) for x in TRANSIENT.findall(text)]
        measure.append(
            args.out,
            {
                "kind": "probe-transient",
                "probe": name,
                "exit": proc.returncode,
                "loader_largest_transient_mib": transients,
            },
        )
        measure.wait_released(nvml, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("tabby", "probe", "probe-one"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--load-timeout-s", type=float, default=120)
        if name == "tabby":
            p.add_argument("--tabby", type=Path, required=True)
            p.add_argument("--deadline-s", type=float, default=200)
            p.add_argument("--only", default="")
        if name == "probe-one":
            p.add_argument("--config", required=True)
            p.add_argument("--baseline", required=True)
    args = parser.parse_args()
    args.model = args.model.resolve()
    args.out = args.out.resolve()
    if args.cmd == "tabby":
        args.tabby = args.tabby.resolve()
        run_tabby(args)
    elif args.cmd == "probe":
        run_probes(args)
    else:
        measure.CONFIGS.extend(HELDOUT)
        measure.probe_one(args)


if __name__ == "__main__":
    main()

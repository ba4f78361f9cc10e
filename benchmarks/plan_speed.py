"""Wall time of `deploy plan --gpus 8x24GiB --json` as a whole process (interpreter start and imports included).

Usage: python3 benchmarks/plan_speed.py [--runs N] [--gpus SPEC] [--command deploy]
Prints the median, min and max wall time of N runs (target: median below 0.5 s), and the median CPU time of the
child (user + sys), which a busy machine disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.5


def time_once(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; a failing plan is a broken benchmark, not a fast one."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    """Warm the file cache once, then time N runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--gpus", default="8x24GiB")
    parser.add_argument(
        "--command", default=None, help="the entry point to time (default: python -m toolkit.cli)"
    )
    args = parser.parse_args()
    prefix = shlex.split(args.command) if args.command else [sys.executable, "-m", "toolkit.cli"]
    command = [*prefix, "plan", "--gpus", args.gpus, "--json"]
    time_once(command)
    runs = [time_once(command) for _ in range(args.runs)]
    times = [wall for wall, _ in runs]
    median = statistics.median(times)
    cpu = statistics.median(cpu for _, cpu in runs)
    print(
        f"{shlex.join(command)}: wall median {median:.3f} s, min {min(times):.3f} s, max {max(times):.3f} s, "
        f"CPU median {cpu:.3f} s over {args.runs} runs "
        f"(target < {TARGET_S} s: {'met' if median < TARGET_S else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

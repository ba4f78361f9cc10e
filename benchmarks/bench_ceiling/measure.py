"""Measure `deploy bench`'s own ceiling: requests/s and streamed tokens/s it sustains against instant_server.py.

    python3 benchmarks/bench_ceiling/measure.py [--repeats 3] [--update-profile]

Runs the real command (`python3 -m toolkit.cli bench --json`) twice per repeat against a server that answers
instantly on this machine: (a) one-token answers to 16-token prompts at concurrency 1,4,16,64 -> requests/s;
(b) 1024 one-token events per answer at concurrency 1,4,16 -> streamed tokens/s. The ceiling of a repeat is its
worst level (what the client sustains at every concurrency tried); the recorded ceiling is the median over
repeats. Both processes share this machine's cores, as a bench
run on the GPU host shares them with TabbyAPI's own front end. Writes results.json (every sweep, the machine, the
load average before and after) next to this file; --update-profile also writes profiles/bench_ceiling.yaml, the
data `deploy bench` reads to warn when a level comes within 2x of the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROFILE = ROOT / "profiles" / "bench_ceiling.yaml"
REQUESTS_SWEEP = [
    "--input-len",
    "16",
    "--output-len",
    "1",
    "--concurrency",
    "1,4,16,64",
    "--num-prompts",
    "2000",
]
STREAM_SWEEP = ["--input-len", "16", "--output-len", "1024", "--concurrency", "1,4,16", "--num-prompts", "64"]


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def machine() -> dict[str, object]:
    """What the numbers depend on: CPU, cores, Python and httpx versions."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "kernel": platform.release(),
    }


def bench(url: str, flags: list[str]) -> dict:
    """One sweep through the real CLI; its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "DEPLOY_API_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        command = [
            sys.executable,
            "-m",
            "toolkit.cli",
            "bench",
            "--url",
            url,
            "--warmup",
            "4",
            "--seed",
            "1",
            "--out",
            str(out),
            "--json",
            *flags,
        ]
        subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> int:
    """Run the sweeps, write results.json (and the profile)."""
    parser = argparse.ArgumentParser(description="measure deploy bench's own ceiling")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update-profile", action="store_true")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(HERE / "instant_server.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "instant server on ..." once it listens
        url = f"http://127.0.0.1:{port}"
        load_before = os.getloadavg()
        started = time.time()
        repeats = []
        for _ in range(args.repeats):
            requests_sweep = bench(url, REQUESTS_SWEEP)
            stream_sweep = bench(url, STREAM_SWEEP)
            repeats.append(
                {
                    "requests_per_s": min(level["request_throughput"] for level in requests_sweep["levels"]),
                    "streamed_tokens_per_s": min(
                        level["streamed_chunk_throughput"] for level in stream_sweep["levels"]
                    ),
                    "requests_sweep": requests_sweep,
                    "stream_sweep": stream_sweep,
                }
            )
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(10)
    info = machine()
    record = {
        "command": "python3 benchmarks/bench_ceiling/measure.py"
        + (" --update-profile" if args.update_profile else ""),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.time() - started,
        "machine": info,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "requests_flags": REQUESTS_SWEEP,
        "stream_flags": STREAM_SWEEP,
        "requests_per_s": statistics.median(r["requests_per_s"] for r in repeats),
        "streamed_tokens_per_s": statistics.median(r["streamed_tokens_per_s"] for r in repeats),
        "repeats": repeats,
    }
    (HERE / "results.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(
        f"requests/s {record['requests_per_s']:.0f}, streamed tokens/s {record['streamed_tokens_per_s']:.0f} "
        f"(median of {args.repeats}; per repeat: "
        + ", ".join(f"{r['requests_per_s']:.0f} / {r['streamed_tokens_per_s']:.0f}" for r in repeats)
        + f"); load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    if args.update_profile:
        profile = {
            "requests_per_s": round(record["requests_per_s"]),
            "streamed_tokens_per_s": round(record["streamed_tokens_per_s"]),
            "machine": f"{info['cpu']}, {info['cores']} cores (shared with the server), Python {info['python']}, "
            f"httpx {info['httpx']}",
            "measured": record["measured"][:10],
            "record": "benchmarks/bench_ceiling/results.json",
        }
        header = (
            "# deploy bench's own ceiling: what the load generator sustains against a server that answers\n"
            "# instantly (benchmarks/bench_ceiling/, written by `python3 benchmarks/bench_ceiling/measure.py\n"
            "# --update-profile`). A level within 2x of either number may be measuring the client.\n"
        )
        PROFILE.write_text(header + yaml.safe_dump(profile, sort_keys=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rolling update of a plan change on a real (namespaced) Docker Swarm, while a client polls the one endpoint.

Usage (as root, on a machine set up with scripts/setup-dev.sh):
    .venv/bin/python benchmarks/swarm_rollout/run.py [--runs 3] [--out benchmarks/swarm_rollout/results]

Each run starts a fresh two-node Swarm with the fleet of tests/docker/test_swarm.py (3 replicas of the TabbyAPI
test server over 2 node classes, behind the HAProxy gateway), waits until it serves the full context, then
re-plans the fleet for 65536 tokens and `docker stack deploy`s it while a client alternates a readiness probe and
a one-token completion against the endpoint. Recorded per run: replicas replaced, requests that succeeded and
failed, the contexts the endpoint reported, the seconds from the deploy until every class converged, and the
whole polling window. Writes one raw JSON record (with the machine's load, engine version and git commit) and
prints a summary. The same scenario is tests/docker/test_swarm.py::test_a_plan_change_rolls_out_without_a_failed_request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the scenario lives in the test machinery (tests/docker/swarm_site.py)

from tests.conftest import TEST_BASE_IMAGE, TEST_TOOLS_IMAGE
from tests.docker.swarm_site import ROLLED_CONTEXT, roll_out, swarm_site


def _git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _machine() -> dict:
    """What the numbers depend on: cores, load, kernel, engine, haproxy (from the tools image)."""
    import docker

    client = docker.from_env()
    haproxy = client.containers.run(TEST_TOOLS_IMAGE, ["haproxy", "-v"], remove=True).decode().splitlines()[0]
    return {
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "kernel": platform.release(),
        "docker_engine": client.version()["Version"],
        "haproxy": haproxy,
        "server": "tests/tabby_test_server (TabbyAPI-compatible test double; no GPU, no TabbyAPI/exllamav3)",
    }


def main() -> int:
    """Run the scenario N times on fresh Swarms and write the raw record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "swarm_rollout" / "results")
    args = parser.parse_args()
    import docker

    client = docker.from_env()
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine_before": _machine(),
        "scenario": {"replicas": 3, "classes": 2, "rolled_to_context": ROLLED_CONTEXT},
        "runs": [],
    }
    for index in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="glmdt-bench-") as tmp:
            setup_started = time.monotonic()
            with swarm_site(client, TEST_BASE_IMAGE, TEST_TOOLS_IMAGE, Path(tmp)) as site:
                setup_s = time.monotonic() - setup_started
                rollout = roll_out(site, ROLLED_CONTEXT)
        run = {
            **asdict(rollout),
            "contexts": sorted(rollout.contexts),
            "failed_count": len(rollout.failed),
            "failed": rollout.failed[:20],
            "setup_s": round(setup_s, 1),
            "converged_s": round(rollout.converged_s, 1),
            "window_s": round(rollout.window_s, 1),
        }
        record["runs"].append(run)
        print(
            f"run {index + 1}/{args.runs}: {run['replicas']} replicas replaced={run['replaced_all']}, "
            f"{run['ok']} ok / {run['failed_count']} failed, converged {run['converged_s']} s after the deploy "
            f"(window {run['window_s']} s)",
            flush=True,
        )
    record["machine_after"] = {"loadavg": os.getloadavg()}
    runs = record["runs"]
    record["summary"] = {
        "runs": len(runs),
        "runs_without_failures": sum(1 for r in runs if r["failed_count"] == 0 and r["replaced_all"]),
        "converged_s_median": statistics.median(r["converged_s"] for r in runs),
        "converged_s_range": [min(r["converged_s"] for r in runs), max(r["converged_s"] for r in runs)],
        "requests_ok_median": statistics.median(r["ok"] for r in runs),
        "requests_failed_total": sum(r["failed_count"] for r in runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rollout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"summary: {json.dumps(record['summary'])}\nrecord: {path.relative_to(ROOT)}")
    return 0 if record["summary"]["runs_without_failures"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())

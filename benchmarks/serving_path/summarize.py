"""The tables of RESULTS.md from the raw device records (results-call*.json): per cache mode, the spot-check KL of
TabbyAPI serving the deployed 4 bpw folder against `deploy reference compute` on that same folder, and the wrong
deployments. No GPU needed:  python3 benchmarks/serving_path/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ["FP16", "8,8", "6,5", "5,4", "4,4", "2,2"]


def runs() -> list[tuple[str, dict]]:
    """(call, run) for every server of every recorded device call."""
    out = []
    for path in sorted(HERE.glob("results-call*.json")):
        call = path.stem.removeprefix("results-")
        out += [(call, run) for run in json.loads(path.read_text())["runs"] if run.get("verify")]
    return out


def row(call: str, run: dict) -> str:
    """One markdown row."""
    verify = run["verify"]
    kl = verify["kl"]
    checks = {c["name"]: c["passed"] for c in verify["checks"]}
    failed = [name for name, ok in checks.items() if not ok]
    return (
        f"| {run['name']} | {run['weights']} as {run['served_as']} | {run['cache_mode']} | {call} | "
        f"{kl['mean']:.6f} | {kl['ci95'][0]:.6f}-{kl['ci95'][1]:.6f} | {kl['median']:.6f} | {kl['p99']:.4f} | "
        f"{kl['max']:.4f} | {verify['top1_agreement']:.3f} | {kl['threshold']} | "
        f"{'pass' if verify['passed'] else 'FAIL: ' + ', '.join(failed)} | {verify['timing']['kl_requests_s']:.1f} |"
    )


def main() -> None:
    header = (
        "| server | weights served as | cache | call | mean KL | 95% CI | median | p99 | max | top-1 | "
        "threshold | deploy verify | KL request s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    all_runs = runs()
    print("Deployed 4 bpw folder, per cache mode (159 positions each):\n")
    print(header)
    for mode in MODES:
        for call, run in all_runs:
            if run["name"] == f"cache-{mode}":
                print(row(call, run))
    print("\nWrong deployments (served under the planned name and settings, 8,8):\n")
    print(header)
    for call, run in all_runs:
        if run["name"].startswith("wrong-"):
            print(row(call, run))
    stats = json.loads((HERE / "reference-stats.json").read_text())
    print(
        f"\nReference computation: {stats['seconds_total']} s wall ({stats['seconds_imports']} s imports), torch max "
        f"allocated {stats['torch_max_allocated_mib']} MiB, reserved {stats['torch_max_reserved_mib']} MiB, NVML "
        f"peak {stats['nvml_peak_delta_mib']} MiB over the {stats['nvml_baseline_mib']} MiB baseline."
    )


if __name__ == "__main__":
    main()

"""The deployment reference on the GPU (issue 16 items 2 and 5): `deploy reference compute` on the deployed EXL3
folder itself, then real TabbyAPI serving that folder with each cache mode's rendered config.yml, and `deploy
verify --reference --json` against it; then deliberately wrong deployments (another quant folder served under the
planned name and settings). Writes results.json after every server. Run by run.sh.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks/gpu_stack"))

import image_launch as il

URL = "http://127.0.0.1:5000"


class Clock:
    """Seconds left before the deadline."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def deploy(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`deploy ARGS` from the frozen snapshot on PYTHONPATH."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "toolkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def serve_and_verify(
    name: str,
    render: Path,
    model: Path,
    tabby: Path,
    reference: Path,
    expect_cache: str | None,
    out: Path,
    clock: Clock,
) -> dict[str, Any]:
    """Rendered config.yml + api_tokens.yml unchanged, `model` mounted as its model_name; verify; stop."""
    spec = il.image_spec(render / "Dockerfile")
    config = il.prepare_app(spec, tabby, render, model)
    key = il.api_key(spec)
    served = config["model"]
    run: dict[str, Any] = {
        "name": name,
        "render": render.name,
        "weights": model.name,
        "served_as": served["model_name"],
        "cache_mode": str(served["cache_mode"]),
        "max_seq_len": served["max_seq_len"],
        "cache_size": served["cache_size"],
    }
    proc, ready = il.start_and_wait(spec, out / "tabby.log", URL, key, min(120.0, clock.left() - 20))
    try:
        run["ready_s"] = ready["seconds"]
        run["ran_as"] = ready.get("as")
        if not ready["ready"]:
            run["error"] = ready.get("error")
            return run
        parameters = ready["model"].get("parameters", {})
        run["v1_model"] = {
            k: parameters.get(k)
            for k in ("max_seq_len", "cache_size", "cache_mode", "chunk_size", "max_batch_size")
        }
        expect = [
            "--expect-model",
            str(served["model_name"]),
            "--expect-cache-mode",
            expect_cache or str(served["cache_mode"]),
            "--expect-context",
            str(served["max_seq_len"]),
        ]
        args = [
            "verify",
            "--url",
            URL,
            "--api-key-file",
            str(Path(spec.workdir) / "api_tokens.yml"),
            "--reference",
            str(reference),
            *expect,
            "--json",
        ]
        started = time.monotonic()
        done = deploy(args, max(30.0, clock.left() - 10))
        run["verify_command"] = "deploy " + " ".join(args)
        run["verify_exit"] = done.returncode
        run["verify_s"] = round(time.monotonic() - started, 1)
        try:
            run["verify"] = json.loads(done.stdout)
        except ValueError:
            run["verify_stdout"] = done.stdout[-2000:]
            run["verify_stderr"] = done.stderr[-2000:]
        return run
    finally:
        run["server_exit"] = il.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deployed", type=Path, required=True, help="the EXL3 folder that is deployed (4 bpw)"
    )
    parser.add_argument(
        "--wrong", type=Path, nargs="*", default=[], help="other quant folders of the same model"
    )
    parser.add_argument("--render", type=Path, required=True, help="the planned rendering (its cache mode)")
    parser.add_argument(
        "--mode-renders",
        type=Path,
        nargs="+",
        required=True,
        help="renderings with --cache FP16, 8,8, ... (one server each)",
    )
    parser.add_argument(
        "--mismatch-mode", default="2,2", help="served with this cache, expected the planned one"
    )
    parser.add_argument("--tabby", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument(
        "--jobs", nargs="*", help="run only these (cache-FP16, cache-8,8, ..., wrong-tiny-2bpw)"
    )
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"runs": []}

    def save() -> None:
        tmp = args.out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(args.out / "results.json")

    planned = il.prepare_app(
        il.image_spec(args.render / "Dockerfile"), args.tabby, args.render, args.deployed
    )
    results["planned"] = {
        k: planned["model"][k] for k in ("model_name", "cache_mode", "max_seq_len", "cache_size")
    }
    # the reference, computed like the container would: on the deployed folder, under the name it is served as
    deployed_as = Path("/tmp/serving_path/deploy") / str(planned["model"]["model_name"])
    il.link_model(args.deployed, deployed_as)
    reference = args.out / "reference-4bpw.json.gz"
    stats_path = args.out / "reference-stats.json"
    ref_args = ["reference", "compute", "--model-dir", str(deployed_as), "--out", str(reference)]
    done = subprocess.run(
        [
            sys.executable,
            "-P",
            str(Path(__file__).with_name("ref_stats.py")),
            "--stats",
            str(stats_path),
            "--",
            *ref_args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    results["reference"] = {
        "command": "deploy " + " ".join(ref_args),
        "exit": done.returncode,
        "stats": json.loads(stats_path.read_text()) if stats_path.exists() else None,
        "stderr": done.stderr[-2500:],
    }
    log(f"reference: exit {done.returncode} {results['reference']['stats']}")
    save()
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1

    mode_render = {}
    for render in args.mode_renders:
        text = (render / "config.yml").read_text()
        mode = next(
            line.split(":", 1)[1].strip().strip('"')
            for line in text.splitlines()
            if line.strip().startswith("cache_mode:")
        )
        mode_render[mode] = render
    # in priority order: the planned mode, FP16, the wrong quant, then the other modes, then the second wrong quant
    jobs: list[tuple[str, Path, Path, str | None]] = []
    planned_mode = str(planned["model"]["cache_mode"])
    order = [planned_mode, "FP16", "WRONG0", "5,4", "4,4", "6,5", args.mismatch_mode, "WRONG1"]
    for item in order:
        if item.startswith("WRONG"):
            index = int(item[5:])
            if index < len(args.wrong):
                jobs.append((f"wrong-{args.wrong[index].name}", args.render, args.wrong[index], None))
        elif item in mode_render:
            expect = planned_mode if item == args.mismatch_mode else None
            jobs.append((f"cache-{item}", mode_render[item], args.deployed, expect))
    if args.jobs:
        jobs = [job for job in jobs if job[0] in args.jobs]
    for name, render, model, expect in jobs:
        if clock.left() < 45:
            results["runs"].append({"name": name, "skipped": f"{clock.left():.0f} s left"})
            continue
        try:
            run = serve_and_verify(name, render, model, args.tabby, reference, expect, args.out, clock)
        except Exception as error:  # noqa: BLE001 - one failed server must not lose the others
            run = {"name": name, "error": f"{type(error).__name__}: {error}"}
        results["runs"].append(run)
        verify = run.get("verify") or {}
        log(
            f"{name}: exit {run.get('verify_exit')} kl {verify.get('kl')} top1 {verify.get('top1_agreement')} "
            f"checks {[(c['name'], c['passed']) for c in verify.get('checks', [])]} error {run.get('error')}"
        )
        save()
    save()
    keys = [
        key
        for render in {args.render, *args.mode_renders}
        for key in il.secrets(il.image_spec(render / "Dockerfile"), render)
    ]
    for path in (args.out / "tabby.log", args.out / "results.json"):
        if path.exists():  # TabbyAPI prints the keys at startup
            path.write_text(il.redact(path.read_text(errors="replace"), keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())

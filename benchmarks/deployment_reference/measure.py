"""The deployment reference on a GPU (issue 16), after run.sh made a tiny GLM-4 MoE and its 4 and 2 bpw EXL3 quants:

1. the reference entry point exactly as `deploy reference deployment` runs it in the image (`python3 -m
   toolkit.verify.reference_entry --model-dir DIR --out DIR`): exit, wall time, its own load/compute time and peak
   GPU memory;
2. its distributions (FP16 cache, prefill then a one-token forward, as TabbyAPI's generator) against exllamav3's
   plain forward of the same weights (model_diff's convention), full vocabulary, at the same positions;
3. real TabbyAPI serving the 4 bpw folder, `deploy verify --reference` with the serving-path threshold of the
   expected cache mode: served with FP16, 8,8, 6,5, 5,4 and 4,4 (each as planned), 2,2 while FP16 was planned (a
   wrong setting), and each other quant folder (--wrong: 2 and 6 bpw) under the 4 bpw folder's name with FP16 and
   5,4 (wrong weights); FP16 also against a reference made with the plain forward (which computation is closer to
   the server).

Writes results.json after every step. Run by run.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks/spotcheck_gpu")]

import driver as spotcheck
import numpy as np

from toolkit.facts.layout import DEPLOYMENT_REFERENCE
from toolkit.verify.kl import full_kl
from toolkit.verify.reference import compute_reference, load_prompts, load_reference, save_reference


def entry_point(model: Path, out: Path, timeout_s: float) -> dict[str, Any]:
    """The command the reference container runs, as a plain process here."""
    command = [
        sys.executable,
        "-m",
        "toolkit.verify.reference_entry",
        "--model-dir",
        str(model),
        "--out",
        str(out),
        "--model-commit",
        "local-conversion",
    ]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    result: dict[str, Any] = {
        "command": " ".join(command[1:]),
        "exit": done.returncode,
        "wall_s": round(time.monotonic() - started, 2),
        "log": done.stderr.splitlines()[-6:],
    }
    if done.returncode == 0:
        settings = load_reference(out / DEPLOYMENT_REFERENCE).settings
        result["settings"] = {k: v for k, v in settings.items() if k != "key"}
    return result


class PlainForward:
    """The loaded backend seen through its plain forward (no cache): a reference computed the old way."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.model_id, self.kind, self.tokenizer_sha256 = (
            backend.model_id,
            backend.kind,
            backend.tokenizer_sha256,
        )
        self.encode, self.pieces = backend.encode, backend.pieces

    def logprobs_at(self, ids: list[int], counts: list[int]) -> Any:
        return self._backend.plain_logprobs_at(ids, counts)


def methods(model: Path, reference_path: Path, plain_path: Path) -> dict[str, Any]:
    """Full-vocabulary KL(plain forward || cached one-token forward) at the reference's positions; the cached path
    run twice (determinism); and a reference file made with the plain forward."""
    from toolkit.verify.exl3_backend import Exl3Backend

    reference = load_reference(reference_path)
    backend = Exl3Backend(model)
    try:
        backend.load(int(reference.settings["max_seq_len"]))
        kls, repeat, top1 = [], [], []
        for prompt in reference.prompts:
            longest = max(prompt.positions, key=lambda p: p.token_count)
            ids, counts = list(longest.prefix_ids or ()), [p.token_count for p in prompt.positions]
            cached, again = backend.logprobs_at(ids, counts), backend.logprobs_at(ids, counts)
            plain = backend.plain_logprobs_at(ids, counts)
            kls += [full_kl(a, b) for a, b in zip(plain, cached)]
            repeat += [full_kl(a, b) for a, b in zip(cached, again)]
            top1 += list(plain.argmax(1) == cached.argmax(1))
        save_reference(compute_reference(PlainForward(backend), load_prompts()), plain_path)
    finally:
        backend.close()
    return {
        "positions": len(kls),
        "kl_plain_vs_cached_mean": float(np.mean(kls)),
        "kl_plain_vs_cached_max": float(np.max(kls)),
        "top1_agreement": float(np.mean(top1)),
        "kl_cached_repeat_max": float(np.max(repeat)),
    }


def serving_folder(folder: Path, served_as: str, work: Path) -> Path:
    """`folder` under the name `served_as`: a real folder of hard links, since TabbyAPI names the model after the
    resolved folder (a symlink would give the weights away by name and readiness, not KL, would catch them)."""
    if folder.name == served_as:
        return folder
    served = work / "serve" / served_as
    if served.exists():
        for old in served.iterdir():
            old.unlink()
    served.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        os.link(item, served / item.name)
    return served


def serve(
    tabby: Path,
    folder: Path,
    served_as: str,
    cache: str,
    expect_cache: str,
    references: dict[str, Path],
    work: Path,
    out: Path,
    clock: spotcheck.Clock,
) -> dict[str, Any]:
    """TabbyAPI serving `folder` as model `served_as` with `cache`; `deploy verify` per reference, expecting the
    planned `expect_cache` (its serving-path bound is the threshold)."""
    key = os.urandom(16).hex()
    key_file = work / "api_key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    served = serving_folder(folder, served_as, work)
    server = spotcheck.Tabby(tabby, served, cache, key, work / f"tabby-{served_as}-{cache}.log")
    run: dict[str, Any] = {
        "weights": folder.name,
        "served_as": served_as,
        "cache_mode": cache,
        "expected_cache_mode": expect_cache,
    }
    try:
        run["ready_s"] = server.wait_ready(key, max(20.0, min(120.0, clock.left() - 40)))
        if run["ready_s"] is None:
            run["error"] = f"TabbyAPI not ready (exit {server.process.poll()})"
            return run
        for name, path in references.items():
            args = [
                "verify",
                "--url",
                server.url,
                "--api-key-file",
                str(key_file),
                "--reference",
                str(path),
                "--expect-model",
                served_as,
                "--expect-cache-mode",
                expect_cache,
                "--expect-context",
                str(spotcheck.MAX_SEQ_LEN),
                "--json",
            ]
            started = time.monotonic()
            done = spotcheck.run_cli(args, timeout_s=max(30.0, clock.left() - 20))
            data = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {"stderr": done.stderr}
            kl = data.get("kl") or {}
            run[name] = {
                "exit": done.returncode,
                "seconds": round(time.monotonic() - started, 1),
                "checks": {c["name"]: c["passed"] for c in data.get("checks", [])},
                "kl": {
                    k: kl.get(k)
                    for k in (
                        "mean",
                        "ci95",
                        "median",
                        "p99",
                        "max",
                        "positions",
                        "threshold",
                        "threshold_source",
                    )
                },
                "top1_agreement": data.get("top1_agreement"),
            }
            spotcheck.log(
                f"{served_as} ({folder.name}) cache {cache}, {name}: exit {done.returncode}, "
                f"KL {kl.get('mean')} vs threshold {kl.get('threshold')}"
            )
        return run
    finally:
        server.stop()
        text = server.log_path.read_text(encoding="utf-8", errors="replace").replace(key, "<redacted>")
        with open(out / "tabby.log", "a", encoding="utf-8") as handle:
            handle.write(
                f"==== {folder.name} as {served_as}, cache {cache}\n"
                + "".join(text.splitlines(keepends=True)[-40:])
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployed", type=Path, required=True, help="the deployed quant folder (4 bpw)")
    parser.add_argument(
        "--wrong",
        type=Path,
        action="append",
        default=[],
        help="another quant folder of the same model (repeat)",
    )
    parser.add_argument("--tabby", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=360)
    args = parser.parse_args()
    clock = spotcheck.Clock(args.budget_s)
    results: dict[str, Any] = {}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    results["entry_point"] = entry_point(args.deployed, args.out, timeout_s=min(300.0, clock.left()))
    spotcheck.log(f"entry point: {results['entry_point']}")
    save()
    if results["entry_point"]["exit"] != 0:
        return 1
    reference, plain = args.out / DEPLOYMENT_REFERENCE, args.work / "reference-plain.json.gz"
    results["methods"] = methods(args.deployed, reference, plain)
    spotcheck.log(f"methods: {results['methods']}")
    save()
    deployment = {"deployment": reference}
    jobs = [("FP16", args.deployed, "FP16", "FP16", {**deployment, "plain_forward": plain})]
    jobs.append(("5,4", args.deployed, "5,4", "5,4", deployment))
    jobs.append(("wrong cache 2,2 (planned FP16)", args.deployed, "2,2", "FP16", deployment))
    for wrong in (w for w in args.wrong if (w / "config.json").is_file()):
        for mode in ("FP16", "5,4"):
            name = f"wrong weights ({wrong.name} as {args.deployed.name}, {mode})"
            jobs.append((name, wrong, mode, mode, deployment))
    # The remaining modes last: if the budget runs short, the wrong deployments have been served.
    jobs += [(mode, args.deployed, mode, mode, deployment) for mode in ("8,8", "6,5", "4,4")]
    results["served"] = {}
    for name, folder, cache, expect, references in jobs:
        if clock.left() < 45:
            results["served"][name] = {"skipped": f"{clock.left():.0f} s left"}
            continue
        results["served"][name] = serve(
            args.tabby, folder, args.deployed.name, cache, expect, references, args.work, args.out, clock
        )
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

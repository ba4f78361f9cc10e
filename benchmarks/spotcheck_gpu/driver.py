"""GPU acceptance of the KL spot-check: reference compute on BF16, TabbyAPI serving each EXL3 quant, deploy verify,
and exllamav3's exact full-vocabulary KL at the same positions for comparison. Writes results.json + results.md.

Run by run.sh on the device (README.md); every phase checks the time left and records why it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np

from toolkit.verify.kl import (
    bootstrap_mean_ci,
    collision_counts,
    full_kl,
    position_kl,
    side_from_entries,
    truncated_side,
)
from toolkit.verify.reference import Reference, load_reference

OFFLINE_K = (20, 50, 100, 200)
MAX_SEQ_LEN = 2048


class Clock:
    """Seconds left before the deadline the caller gave (a device command may run 600 s)."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_cli(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`deploy ...` from this checkout (no install needed)."""
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Tabby:
    """TabbyAPI serving one model dir from its source folder, the way the device README runs it."""

    def __init__(self, tabby_dir: Path, model_dir: Path, cache_mode: str, key: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"network": {"host": "127.0.0.1", "port": self.port, "disable_auth": False},
                  "model": {"model_dir": str(model_dir.parent), "model_name": model_dir.name,
                            "max_seq_len": MAX_SEQ_LEN, "cache_size": MAX_SEQ_LEN, "cache_mode": cache_mode},
                  "sampling": {"override_preset": None}}
        (tabby_dir / "config.yml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        tokens = tabby_dir / "api_tokens.yml"
        tokens.write_text(json.dumps({"api_key": key, "admin_key": secrets.token_hex(16)}), encoding="utf-8")
        tokens.chmod(0o600)
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "main.py"], cwd=tabby_dir, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, key: str, timeout_s: float) -> float | None:
        """Seconds until /health and /v1/model answer 200, or None (died or timed out)."""
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                return None
            try:
                if (httpx.get(f"{self.url}/health", timeout=2).status_code == 200 and
                        httpx.get(f"{self.url}/v1/model", headers={"X-API-Key": key}, timeout=2).status_code == 200):
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return None

    def stop(self) -> None:
        """SIGINT the process group, then SIGKILL what is left."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self._log.close()


def serve_and_verify(tabby_dir: Path, model_dir: Path, reference_path: Path, cache_mode: str, work: Path,
                     clock: Clock) -> dict[str, Any]:
    """One quant: start TabbyAPI, `deploy verify --json` against it, stop it."""
    key = secrets.token_hex(16)
    key_file = work / "api_key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    server = Tabby(tabby_dir, model_dir, cache_mode, key, work / f"tabby-{model_dir.name}.log")
    result: dict[str, Any] = {"model": model_dir.name, "cache_mode": cache_mode}
    try:
        ready_s = server.wait_ready(key, min(180.0, clock.left() - 60))
        result["ready_s"] = ready_s
        if ready_s is None:
            result["error"] = "TabbyAPI did not become ready (see tabby.log)"
            return result
        log(f"{model_dir.name}: TabbyAPI ready after {ready_s:.1f} s")
        started = time.monotonic()
        done = run_cli(["verify", "--url", server.url, "--api-key-file", str(key_file), "--reference",
                        str(reference_path), "--max-kl", "5", "--expect-model", model_dir.name,
                        "--expect-cache-mode", cache_mode, "--expect-context", str(MAX_SEQ_LEN), "--json"],
                       timeout_s=max(30.0, clock.left() - 30))
        result["verify_wall_s"] = time.monotonic() - started
        result["verify_exit"] = done.returncode
        try:
            result["verify"] = json.loads(done.stdout)
        except ValueError:
            result["error"] = f"verify printed no JSON: {done.stderr[-500:]}"
        return result
    finally:
        server.stop()
        log_text = server.log_path.read_text(encoding="utf-8", errors="replace").replace(key, "<redacted>")
        server.log_path.write_text(log_text, encoding="utf-8")


def _positions(reference: Reference) -> list[tuple[int, list[int], list[int]]]:
    """(prompt index, ids of the longest prefix, token counts) per prompt with positions."""
    rows = []
    for index, prompt in enumerate(reference.prompts):
        if prompt.positions and all(p.prefix_ids is not None for p in prompt.positions):
            longest = max(prompt.positions, key=lambda p: p.token_count)
            rows.append((index, list(longest.prefix_ids or ()), [p.token_count for p in prompt.positions]))
    return rows


def exact_logprobs(model_dir: Path, reference: Reference) -> tuple[np.ndarray, list[str]]:
    """exllamav3 forward at every reference position: (positions, vocab) log-softmax, and the pieces."""
    from toolkit.verify.exl3_backend import Exl3Backend

    backend = Exl3Backend(model_dir)
    try:
        rows = [backend.logprobs_at(ids, counts) for _, ids, counts in _positions(reference)]
        return np.concatenate(rows), backend.pieces()
    finally:
        backend.close()


def full_vocabulary(reference: Reference, bf16: Path, quant_dirs: list[Path], clock: Clock) -> dict[str, Any]:
    """Exact KL(BF16 || quant) over the full vocabulary at the reference's positions, plus the estimator applied
    offline to the same exact distributions at several K (separates truncation bias from serving effects)."""
    reference_rows, pieces = exact_logprobs(bf16, reference)
    counts = collision_counts(pieces)
    entries = [side_from_entries(p.entries(), reference.vocab_collisions or counts)
               for prompt in reference.prompts for p in prompt.positions if p.prefix_ids is not None]
    out: dict[str, Any] = {"positions": int(reference_rows.shape[0]), "vocab": len(pieces),
                           "colliding_strings": len(counts), "mean_top1_prob": float(np.exp(reference_rows.max(1)).mean()),
                           "quants": {}}
    for quant_dir in quant_dirs:
        if clock.left() < 45:
            out["quants"][quant_dir.name] = {"skipped": "out of time"}
            continue
        rows, _ = exact_logprobs(quant_dir, reference)
        exact = np.array([full_kl(a, b) for a, b in zip(reference_rows, rows)])
        top1 = float(np.mean(reference_rows.argmax(1) == rows.argmax(1)))
        offline = {}
        for k in OFFLINE_K:
            values = [position_kl(ref_side, truncated_side(row, pieces, k, counts), counts)
                      for ref_side, row in zip(entries, rows)]
            offline[str(k)] = float(np.mean(values))
        out["quants"][quant_dir.name] = {"exact_mean": float(exact.mean()), "exact_top1": top1,
                                         "exact_per_position": exact.tolist(), "offline_estimator_mean": offline}
        log(f"{quant_dir.name}: full-vocabulary KL {exact.mean():.5f}, top-1 {top1:.3f}, offline K=100 "
            f"{offline['100']:.5f}")
    return out


def separation(low_bits: dict[str, Any], high_bits: dict[str, Any]) -> dict[str, Any]:
    """Is the lower-bit quant's KL above the higher-bit one's at 95%? Unpaired CIs and a paired bootstrap."""
    a, b = low_bits["per_position"], high_bits["per_position"]
    if [(p["prompt"], p["tokens"]) for p in a] != [(p["prompt"], p["tokens"]) for p in b]:
        return {"error": "the two runs measured different positions"}
    groups = {name: i for i, name in enumerate(dict.fromkeys(p["prompt"] for p in a))}
    diff = np.array([x["kl"] - y["kl"] for x, y in zip(a, b)])
    low, high = bootstrap_mean_ci(diff, np.array([groups[p["prompt"]] for p in a]))
    return {"unpaired_ci_disjoint": high_bits["kl"]["ci95"][1] < low_bits["kl"]["ci95"][0],
            "paired_mean_difference": float(diff.mean()), "paired_ci95": [low, high], "separated": low > 0}


def markdown(results: dict[str, Any]) -> str:
    """The table the README quotes."""
    header = ("| quant | spot-check mean KL (95% CI) | top-1 | full-vocab KL | spot / full | offline est. K=100 / full "
              "| server time (s) | ready (s) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    full = results.get("full_vocabulary", {}).get("quants", {})
    for run in results["runs"]:
        name = run["model"]
        verify = run.get("verify") or {}
        kl = verify.get("kl") or {}
        exact = full.get(name, {})
        ratio = (kl["mean"] / exact["exact_mean"]) if kl and exact.get("exact_mean") else None
        offline = (exact["offline_estimator_mean"]["100"] / exact["exact_mean"]) if exact.get("exact_mean") else None
        lines.append(
            f"| {name} | {kl.get('mean', float('nan')):.5f} ({kl['ci95'][0]:.5f}-{kl['ci95'][1]:.5f}) "
            f"| {verify.get('top1_agreement', float('nan')):.3f} | {exact.get('exact_mean', float('nan')):.5f} "
            f"| {ratio if ratio is None else f'{ratio:.3f}'} | {offline if offline is None else f'{offline:.3f}'} "
            f"| {verify.get('timing', {}).get('kl_requests_s', float('nan'))} | {run.get('ready_s') or float('nan'):.1f} |"
            if kl else f"| {name} | {run.get('error', 'no result')} | | | | | | |")
    for pair, value in results.get("separation", {}).items():
        lines.append(f"\nSeparation {pair}: {json.dumps(value)}")
    lines.append(f"\nRanking correct: {results.get('ranking_correct')}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bf16", type=Path, required=True, help="the BF16 model dir")
    parser.add_argument("--quant", type=Path, action="append", required=True,
                        help="an EXL3 quant dir, lowest bits first (repeat)")
    parser.add_argument("--tabby", type=Path, required=True, help="TabbyAPI source folder (main.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-mode", default="FP16")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--reference", type=Path, help="use this reference instead of computing one")
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/spotcheck-work")
    work.mkdir(exist_ok=True)
    results: dict[str, Any] = {"cache_mode": args.cache_mode, "runs": []}
    try:
        import httpx  # noqa: F401 - the toolkit's client needs it
    except ImportError:
        print("httpx is missing on this host: add its wheels to .whl (README.md)", file=sys.stderr)
        return 1
    reference_path = args.out / "reference.json.gz"
    if args.reference:
        reference_path = args.reference
    else:
        started = time.monotonic()
        done = run_cli(["reference", "compute", "--model-dir", str(args.bf16), "--out", str(reference_path)],
                       timeout_s=max(60.0, clock.left() - 120))
        results["reference_compute"] = {"exit": done.returncode, "seconds": time.monotonic() - started,
                                        "stderr_tail": done.stderr[-1500:]}
        log(f"reference compute exit {done.returncode} in {time.monotonic() - started:.1f} s")
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
            return 1
    reference = load_reference(reference_path)
    results["reference"] = {"positions": reference.positions, "prompts": len(reference.prompts),
                            "kind": reference.kind, "top_k": reference.settings.get("top_k")}
    for quant_dir in args.quant:
        if clock.left() < 90:
            results["runs"].append({"model": quant_dir.name, "error": "skipped: out of time"})
            continue
        run = serve_and_verify(args.tabby, quant_dir, reference_path, args.cache_mode, work, clock)
        results["runs"].append(run)
        kl = (run.get("verify") or {}).get("kl") or {}
        log(f"{quant_dir.name}: verify exit {run.get('verify_exit')}, mean KL {kl.get('mean')}, "
            f"CI {kl.get('ci95')}, server time {(run.get('verify') or {}).get('timing')}")
    tails = [f"==== {path.name}\n" + "".join(path.read_text(errors="replace").splitlines(keepends=True)[-80:])
             for path in sorted(work.glob("tabby-*.log"))]
    (args.out / "tabby.log").write_text("".join(tails), encoding="utf-8")
    measured = [r for r in results["runs"] if (r.get("verify") or {}).get("kl")]
    means = [r["verify"]["kl"]["mean"] for r in measured]
    results["ranking_correct"] = len(measured) == len(args.quant) and means == sorted(means, reverse=True)
    results["separation"] = {f"{a['model']} vs {b['model']}": separation(a["verify"], b["verify"])
                             for a, b in itertools.pairwise(measured)}
    try:
        results["full_vocabulary"] = full_vocabulary(reference, args.bf16, args.quant, clock)
    except Exception as error:  # noqa: BLE001 - keep the served results even when this comparison breaks
        results["full_vocabulary"] = {"error": f"{type(error).__name__}: {error}"}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if results["ranking_correct"] else 2


if __name__ == "__main__":
    sys.exit(main())

"""GPU acceptance of the KL spot-check: TabbyAPI serving each EXL3 quant + `deploy verify --json` against a
full-precision reference, then exllamav3's exact full-vocabulary KL at the same positions. Writes results.json and
results.md after every step (a run stopped early keeps what it finished).

`--floor` (run.sh's SPOTCHECK_MODE=floor) first serves the BF16 model itself against its own reference: that
spot-check's mean KL is the serving path's floor (TabbyAPI's cached, batched one-token forward vs the plain forward
of the reference), to subtract from a quant's reading. `--extra-cache-mode` serves the last quant once more with
that cache mode (e.g. "5,4"): the quantized cache's own KL.

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
import traceback
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
MAX_SEQ_LEN = 4096  # 4 concurrent prefixes of the longest default prompt (460 tokens) fit many times over
AGREEMENT = 0.20  # issue 5: spot-check mean within 20 % of the full-vocabulary KL


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
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Tabby:
    """TabbyAPI serving one model dir from its source folder: config.yml + api_tokens.yml in it, `main.py`."""

    def __init__(self, tabby_dir: Path, model_dir: Path, cache_mode: str, key: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "network": {"host": "127.0.0.1", "port": self.port, "disable_auth": False},
            "model": {
                "model_dir": str(model_dir.parent),
                "model_name": model_dir.name,
                "backend": "exllamav3",
                "max_seq_len": MAX_SEQ_LEN,
                "cache_size": MAX_SEQ_LEN,
                "cache_mode": cache_mode,
            },
            "sampling": {"override_preset": None},
        }
        (tabby_dir / "config.yml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        tokens = tabby_dir / "api_tokens.yml"
        tokens.write_text(json.dumps({"api_key": key, "admin_key": secrets.token_hex(16)}), encoding="utf-8")
        tokens.chmod(0o600)
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "main.py"],
            cwd=tabby_dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, key: str, timeout_s: float) -> float | None:
        """Seconds until /health and /v1/model answer 200, or None (died or timed out)."""
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                return None
            try:
                if (
                    httpx.get(f"{self.url}/health", timeout=2).status_code == 200
                    and httpx.get(f"{self.url}/v1/model", headers={"X-API-Key": key}, timeout=2).status_code
                    == 200
                ):
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return None

    def stop(self) -> None:
        """SIGINT the process group, then SIGKILL what is left."""
        for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self._log.close()


def serve_and_verify(
    tabby_dir: Path,
    model_dir: Path,
    reference_path: Path,
    cache_mode: str,
    role: str,
    work: Path,
    out: Path,
    clock: Clock,
) -> dict[str, Any]:
    """One model (role: floor, quant or cache): start TabbyAPI, `deploy verify --json` against it, stop it; its log
    tail goes to tabby.log."""
    key = secrets.token_hex(16)
    key_file = work / "api_key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    server = Tabby(tabby_dir, model_dir, cache_mode, key, work / f"tabby-{model_dir.name}-{role}.log")
    result: dict[str, Any] = {"model": model_dir.name, "cache_mode": cache_mode, "role": role}
    try:
        ready_s = server.wait_ready(key, max(20.0, min(150.0, clock.left() - 60)))
        result["ready_s"] = ready_s
        if ready_s is None:
            result["error"] = f"TabbyAPI did not become ready (exit {server.process.poll()}; see tabby.log)"
            return result
        log(f"{model_dir.name}: TabbyAPI ready after {ready_s:.1f} s")
        started = time.monotonic()
        try:
            done = run_cli(
                [
                    "verify",
                    "--url",
                    server.url,
                    "--api-key-file",
                    str(key_file),
                    "--reference",
                    str(reference_path),
                    "--max-kl",
                    "5",
                    "--expect-model",
                    model_dir.name,
                    "--expect-cache-mode",
                    cache_mode,
                    "--expect-context",
                    str(MAX_SEQ_LEN),
                    "--json",
                ],
                timeout_s=max(30.0, clock.left() - 30),
            )
        except subprocess.TimeoutExpired:
            result["error"] = "deploy verify timed out"
            return result
        result["verify_wall_s"] = time.monotonic() - started
        result["verify_exit"] = done.returncode
        try:
            result["verify"] = json.loads(done.stdout)
        except ValueError:
            result["error"] = f"verify printed no JSON: {done.stderr[-800:]}"
        return result
    finally:
        server.stop()
        text = server.log_path.read_text(encoding="utf-8", errors="replace").replace(key, "<redacted>")
        with open(out / "tabby.log", "a", encoding="utf-8") as handle:
            handle.write(
                f"==== {model_dir.name} ({role}, cache {cache_mode})\n"
                + "".join(text.splitlines(keepends=True)[-80:])
            )


def _positions(reference: Reference) -> list[tuple[str, list[int], list[int]]]:
    """(prompt name, ids of the longest prefix, token counts) per prompt, in the reference's order."""
    rows = []
    for prompt in reference.prompts:
        if prompt.positions and all(p.prefix_ids is not None for p in prompt.positions):
            longest = max(prompt.positions, key=lambda p: p.token_count)
            rows.append(
                (prompt.name, list(longest.prefix_ids or ()), [p.token_count for p in prompt.positions])
            )
    return rows


def exact_logprobs(model_dir: Path, reference: Reference) -> tuple[np.ndarray, list[str]]:
    """exllamav3 forward at every reference position: (positions, vocab) log-softmax, and the pieces."""
    from toolkit.verify.exl3_backend import Exl3Backend

    backend = Exl3Backend(model_dir)
    try:
        backend.load(MAX_SEQ_LEN)
        rows = [backend.plain_logprobs_at(ids, counts) for _, ids, counts in _positions(reference)]
        return np.concatenate(rows), backend.pieces()
    finally:
        backend.close()


def full_vocabulary(
    results: dict[str, Any], reference: Reference, bf16: Path, quant_dirs: list[Path], clock: Clock, save: Any
) -> None:
    """Exact KL(BF16 || quant) over the full vocabulary at the reference's positions (exllamav3's convention,
    plain forward on both), plus the estimator applied offline to those exact distributions at several K: that
    separates the estimator's truncation bias from serving effects (generator, cache, batching)."""
    out: dict[str, Any] = {"quants": {}}
    results["full_vocabulary"] = out
    started = time.monotonic()
    reference_rows, pieces = exact_logprobs(bf16, reference)
    counts = collision_counts(pieces)
    where = [(name, n) for name, _, token_counts in _positions(reference) for n in token_counts]
    groups = np.array([i for i, (_, _, c) in enumerate(_positions(reference)) for _ in c])
    entries = [
        side_from_entries(p.entries(), reference.vocab_collisions or counts)
        for prompt in reference.prompts
        for p in prompt.positions
        if p.prefix_ids is not None
    ]
    probs = np.exp(reference_rows)
    out.update(
        {
            "positions": int(reference_rows.shape[0]),
            "vocab": len(pieces),
            "colliding_strings": len(counts),
            "colliding_ids": int(sum(counts.values())),
            "bf16_load_forward_s": round(time.monotonic() - started, 1),
            "mean_top1_prob": float(probs.max(1).mean()),
            "mean_mass_beyond_top100": float(1 - np.sort(probs, 1)[:, -100:].sum(1).mean()),
        }
    )
    save()
    for quant_dir in quant_dirs:
        if clock.left() < 25:
            out["quants"][quant_dir.name] = {"skipped": "out of time"}
            continue
        rows, _ = exact_logprobs(quant_dir, reference)
        exact = np.array([full_kl(a, b) for a, b in zip(reference_rows, rows)])
        top1 = float(np.mean(reference_rows.argmax(1) == rows.argmax(1)))
        offline = {}
        for k in OFFLINE_K:
            values = [
                position_kl(ref_side, truncated_side(row, pieces, k, counts), counts)
                for ref_side, row in zip(entries, rows)
            ]
            offline[str(k)] = float(np.mean(values))
        out["quants"][quant_dir.name] = {
            "exact_mean": float(exact.mean()),
            "exact_ci95": list(bootstrap_mean_ci(exact, groups)),
            "exact_top1": top1,
            "offline_estimator_mean": offline,
            "exact_per_position": [
                {"prompt": name, "tokens": n, "kl": float(v)} for (name, n), v in zip(where, exact)
            ],
        }
        log(
            f"{quant_dir.name}: full-vocabulary KL {exact.mean():.5f}, top-1 {top1:.3f}, offline K=100 "
            f"{offline['100']:.5f}"
        )
        save()


def separation(low_bits: dict[str, Any], high_bits: dict[str, Any]) -> dict[str, Any]:
    """Is the lower-bit quant's KL above the higher-bit one's at 95%? Unpaired CIs, and a prompt-clustered
    bootstrap of the per-position difference over the positions both runs measured."""
    b = {(p["prompt"], p["tokens"]): p["kl"] for p in high_bits["per_position"]}
    pairs = [
        (p["prompt"], p["kl"] - b[(p["prompt"], p["tokens"])])
        for p in low_bits["per_position"]
        if (p["prompt"], p["tokens"]) in b
    ]
    if not pairs:
        return {"error": "the two runs share no position"}
    groups = {name: i for i, name in enumerate(dict.fromkeys(name for name, _ in pairs))}
    diff = np.array([d for _, d in pairs])
    low, high = bootstrap_mean_ci(diff, np.array([groups[name] for name, _ in pairs]))
    return {
        "unpaired_ci_disjoint": high_bits["kl"]["ci95"][1] < low_bits["kl"]["ci95"][0],
        "paired_positions": len(pairs),
        "paired_mean_difference": float(diff.mean()),
        "paired_ci95": [low, high],
        "separated": low > 0,
    }


def acceptance(results: dict[str, Any], quant_count: int) -> dict[str, Any]:
    """The issue's four requirements, from whatever has been measured so far."""
    measured = [r for r in results["runs"] if (r.get("verify") or {}).get("kl") and r.get("role") == "quant"]
    means = [r["verify"]["kl"]["mean"] for r in measured]
    full = results.get("full_vocabulary", {}).get("quants", {})
    agreement = {}
    for run in measured:
        exact = full.get(run["model"], {})
        if exact.get("exact_mean"):
            # over the positions the spot-check measured (a position without logprobs is left out there)
            by_position = {(p["prompt"], p["tokens"]): p["kl"] for p in exact["exact_per_position"]}
            same = [
                by_position[(p["prompt"], p["tokens"])]
                for p in run["verify"]["per_position"]
                if (p["prompt"], p["tokens"]) in by_position
            ]
            full_mean = float(np.mean(same)) if same else exact["exact_mean"]
            ratio = run["verify"]["kl"]["mean"] / full_mean
            offline = exact["offline_estimator_mean"]["100"] / exact["exact_mean"]
            agreement[run["model"]] = {
                "spot_over_full": ratio,
                "within_20pct": abs(ratio - 1) <= AGREEMENT,
                "full_mean_same_positions": full_mean,
                "positions_compared": len(same),
                "offline_k100_over_full": offline,
                "served_over_offline_k100": ratio / offline if offline else None,
            }
    seconds = {r["model"]: r["verify"]["timing"]["kl_requests_s"] for r in measured}
    exact_means = [
        full[r["model"]]["exact_mean"] for r in measured if full.get(r["model"], {}).get("exact_mean")
    ]
    return {
        "ranking_correct": len(measured) == quant_count and means == sorted(means, reverse=True),
        "exact_ranking_correct": len(exact_means) == quant_count
        and exact_means == sorted(exact_means, reverse=True),
        "separation": {
            f"{a['model']} vs {b['model']}": separation(a["verify"], b["verify"])
            for a, b in itertools.pairwise(measured)
        },
        "agreement": agreement,
        "server_seconds": seconds,
        "server_seconds_under_60": bool(seconds) and max(seconds.values()) < 60,
    }


def floor_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The serving floor (BF16 served against its own reference) and each quant's reading less that floor,
    against the exact full-vocabulary KL; the extra cache mode's paired difference to the same quant on FP16."""
    runs = [r for r in results["runs"] if (r.get("verify") or {}).get("kl")]
    floor_run = next((r for r in runs if r["role"] == "floor"), None)
    if floor_run is None:
        return {}
    kl = floor_run["verify"]["kl"]
    summary: dict[str, Any] = {
        "floor": {key: kl[key] for key in ("mean", "ci95", "median", "p99", "max", "positions")},
        "floor_top1": floor_run["verify"].get("top1_agreement"),
        "quants": {},
    }
    full = results.get("full_vocabulary", {}).get("quants", {})
    agreement = results.get("acceptance", {}).get("agreement", {})
    for run in (r for r in runs if r["role"] == "quant"):
        exact = full.get(run["model"], {})
        spot = run["verify"]["kl"]["mean"]
        row: dict[str, Any] = {
            "spot": spot,
            "spot_minus_floor": spot - kl["mean"],
            "paired_vs_floor": separation(run["verify"], floor_run["verify"]),
        }
        same = agreement.get(run["model"], {}).get("full_mean_same_positions")
        if same:
            offline = exact["offline_estimator_mean"]["100"]
            row.update(
                {
                    "exact": same,
                    "offline_k100": offline,
                    "spot_over_exact": spot / same,
                    "spot_minus_floor_over_exact": (spot - kl["mean"]) / same,
                    "spot_minus_offline_k100": spot - offline,
                    "within_20pct_after_floor": abs((spot - kl["mean"]) / same - 1) <= AGREEMENT,
                }
            )
        summary["quants"][run["model"]] = row
    for run in (r for r in runs if r["role"] == "cache"):
        fp16 = next((r for r in runs if r["role"] == "quant" and r["model"] == run["model"]), None)
        summary[f"cache {run['cache_mode']} {run['model']}"] = {
            "spot": run["verify"]["kl"]["mean"],
            "ci95": run["verify"]["kl"]["ci95"],
            "minus_fp16_cache": separation(run["verify"], fp16["verify"]) if fp16 else None,
        }
    return summary


def _f(value: Any, spec: str = ".5f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The table the README quotes."""
    lines = [
        (
            "| quant | spot-check mean KL (95% CI) | top-1 | full-vocab KL (95% CI) | full top-1 | spot / full "
            "| offline K=100 / full | KL server time (s) | verify total (s) | ready (s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = results.get("full_vocabulary", {}).get("quants", {})
    agreement = results.get("acceptance", {}).get("agreement", {})
    for run in results["runs"]:
        name = run["model"]
        label = name if run.get("role") == "quant" else f"{name} ({run.get('role')}, {run.get('cache_mode')})"
        verify = run.get("verify") or {}
        kl = verify.get("kl") or {}
        if not kl:
            lines.append(f"| {label} | {run.get('error', 'no result')} | | | | | | | | |")
            continue
        exact = full.get(name, {}) if run.get("role") == "quant" else {}
        ci = exact.get("exact_ci95")
        agree = agreement.get(name, {}) if run.get("role") == "quant" else {}
        lines.append(
            f"| {label} | {kl['mean']:.5f} ({kl['ci95'][0]:.5f}-{kl['ci95'][1]:.5f}) "
            f"| {_f(verify.get('top1_agreement'), '.3f')} "
            f"| {_f(exact.get('exact_mean'))}"
            + (f" ({ci[0]:.5f}-{ci[1]:.5f})" if ci else "")
            + f" | {_f(exact.get('exact_top1'), '.3f')} | {_f(agree.get('spot_over_full'), '.3f')} "
            f"| {_f(agree.get('offline_k100_over_full'), '.3f')} | {_f(verify['timing']['kl_requests_s'], '.2f')} "
            f"| {_f(verify['timing']['total_s'], '.2f')} | {_f(run.get('ready_s'), '.1f')} |"
        )
    vocab = results.get("full_vocabulary", {})
    if vocab.get("positions"):
        lines.append(
            f"\n{vocab['positions']} positions, vocabulary {vocab['vocab']} ({vocab['colliding_ids']} ids "
            f"share {vocab['colliding_strings']} decoded strings); BF16 mean top-1 probability "
            f"{vocab['mean_top1_prob']:.3f}, mass beyond the top 100 {vocab['mean_mass_beyond_top100']:.4f}"
        )
    accept = results.get("acceptance", {})
    for pair, value in accept.get("separation", {}).items():
        lines.append(f"\nSeparation {pair}: {json.dumps(value)}")
    if results.get("floor"):
        lines.append(f"\nServing floor: {json.dumps(results['floor'])}")
    lines.append(
        f"\nRanking correct (spot-check): {accept.get('ranking_correct')}; (full vocabulary): "
        f"{accept.get('exact_ranking_correct')}; KL server time under 60 s: "
        f"{accept.get('server_seconds_under_60')}"
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bf16", type=Path, required=True, help="the BF16 model dir")
    parser.add_argument(
        "--quant",
        type=Path,
        action="append",
        required=True,
        help="an EXL3 quant dir, lowest bits first (repeat)",
    )
    parser.add_argument("--tabby", type=Path, required=True, help="TabbyAPI source folder (main.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-mode", default="FP16")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--reference", type=Path, help="use this reference instead of computing one")
    parser.add_argument("--reference-stats", type=Path, help="JSON {exit, seconds} of the reference compute")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="first serve the BF16 model itself against its reference: the serving floor",
    )
    parser.add_argument("--extra-cache-mode", help="then serve the last quant again with this cache mode")
    parser.add_argument("--skip-full-vocabulary", action="store_true", help="no exllamav3 here (a dry run)")
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/spotcheck-work")
    work.mkdir(exist_ok=True)
    results: dict[str, Any] = {"cache_mode": args.cache_mode, "max_seq_len": MAX_SEQ_LEN, "runs": []}

    def save() -> None:
        results["acceptance"] = acceptance(results, len(args.quant))
        results["floor"] = floor_summary(results)
        for name, text in (
            ("results.json", json.dumps(results, indent=1)),
            ("results.md", markdown(results)),
        ):
            tmp = args.out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(args.out / name)

    try:
        import httpx  # noqa: F401 - the toolkit's client needs it
    except ImportError:
        print("httpx is missing on this host: add its wheels to .whl (README.md)", file=sys.stderr)
        return 1
    reference_path = args.reference or args.out / "reference.json.gz"
    if args.reference_stats:
        results["reference_compute"] = json.loads(args.reference_stats.read_text())
    if not args.reference:
        started = time.monotonic()
        done = run_cli(
            ["reference", "compute", "--model-dir", str(args.bf16), "--out", str(reference_path)],
            timeout_s=max(60.0, clock.left() - 120),
        )
        results["reference_compute"] = {
            "exit": done.returncode,
            "seconds": time.monotonic() - started,
            "stderr_tail": done.stderr[-1500:],
        }
        log(f"reference compute exit {done.returncode} in {time.monotonic() - started:.1f} s")
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            save()
            return 1
    reference = load_reference(reference_path)
    results["reference"] = {
        "positions": reference.positions,
        "prompts": len(reference.prompts),
        "kind": reference.kind,
        "top_k": reference.settings.get("top_k"),
        "model_id": reference.model_id,
    }
    save()
    jobs = [(args.bf16, args.cache_mode, "floor")] if args.floor else []
    jobs += [(quant_dir, args.cache_mode, "quant") for quant_dir in args.quant]
    if args.extra_cache_mode:
        jobs.append((args.quant[-1], args.extra_cache_mode, "cache"))
    for model_dir, cache_mode, role in jobs:
        if clock.left() < 60:
            results["runs"].append(
                {
                    "model": model_dir.name,
                    "cache_mode": cache_mode,
                    "role": role,
                    "error": "skipped: out of time",
                }
            )
            continue
        try:
            run = serve_and_verify(
                args.tabby, model_dir, reference_path, cache_mode, role, work, args.out, clock
            )
        except Exception as error:  # noqa: BLE001 - one broken quant must not lose the others
            run = {
                "model": model_dir.name,
                "cache_mode": cache_mode,
                "role": role,
                "error": f"{type(error).__name__}: {error}",
            }
        results["runs"].append(run)
        verify = run.get("verify") or {}
        log(
            f"{model_dir.name} ({role}, {cache_mode}): verify exit {run.get('verify_exit')}, kl {verify.get('kl')}, top-1 "
            f"{verify.get('top1_agreement')}, timing {verify.get('timing')}, error {run.get('error')}, checks "
            f"{[(c['name'], c['passed']) for c in verify.get('checks', [])]}"
        )
        save()
    if not args.skip_full_vocabulary:
        try:
            full_vocabulary(results, reference, args.bf16, args.quant, clock, save)
        except Exception as error:  # noqa: BLE001 - keep the served results even when this comparison breaks
            results.setdefault("full_vocabulary", {})["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            log(f"full-vocabulary comparison failed: {type(error).__name__}: {error}")
    save()
    print(markdown(results))
    return 0 if results["acceptance"]["ranking_correct"] else 2


if __name__ == "__main__":
    sys.exit(main())

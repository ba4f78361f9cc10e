"""Mixed-precision quants on the GPU (issue 14, item 5), after run.sh trained a tiny GLM-4 MoE and converted it.

1. exllamav3 loads the BF16 original: its held-out perplexity beside the trainer's (same function = same numbers);
2. exllamav3's measure step over the lowest and highest conversion (its own KL-per-bit measurement);
3. `deploy quant mix` at the exact VRAM size of every intermediate conversion: the card recipe
   (profiles/quant_mix.yaml) and exllamav3's optimizer from that measurement, both through the local-Python runner;
4. full-vocabulary KL(BF16 || quant) over the held-out rows for every conversion and every mix, top-1 agreement,
   perplexity, exact VRAM bytes (toolkit.quant.storage);
5. TabbyAPI serving one recipe mix: ready, and a completion.

Writes results.json after every step. Usage (run.sh): measure.py --models DIR --out DIR --work DIR --budget-s S
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks/spotcheck_gpu")]

import driver as spotcheck
import numpy as np

from toolkit.quant.storage import read_storage

GIB = 2**30


def deploy(args: list[str], timeout_s: float) -> dict[str, Any]:
    """`deploy ...` as a user runs it; exit code, wall time, the JSON it printed and the tail of stderr."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    out = done.stdout.strip()
    return {
        "exit": done.returncode,
        "wall_s": round(time.monotonic() - started, 2),
        "json": json.loads(out) if out.startswith("{") else None,
        "stderr": done.stderr.splitlines()[-5:],
    }


class Scorer:
    """BF16 log-probabilities of the held-out rows, kept on the GPU; any model scored against them."""

    def __init__(self, bf16: Path, eval_ids: np.ndarray) -> None:
        import torch

        self.torch = torch
        self.ids = torch.tensor(eval_ids, dtype=torch.long)
        self.ref, self.ref_nll, load_s = self._logprobs(bf16)
        self.bf16_load_s = load_s

    def _logprobs(self, folder: Path) -> tuple[Any, float, float]:
        from exllamav3 import Config, Model

        torch = self.torch
        started = time.monotonic()
        model = Model.from_config(Config.from_directory(str(folder)))
        model.load("cuda:0")
        load_s = time.monotonic() - started
        rows, nll = [], []
        with torch.inference_mode():
            for row in self.ids:
                logits = model.forward(row[None, :], {"attn_mode": "flash_attn_nc"}).float()[0]
                logp = torch.log_softmax(logits, dim=-1)
                rows.append(logp)
                nll.append(-logp[:-1].gather(1, row[1:, None].cuda()).mean().item())
        model.unload()
        return torch.stack(rows), float(np.mean(nll)), load_s

    def score(self, folder: Path) -> dict[str, Any]:
        """Full-vocabulary KL(BF16 || model) per position (model_diff's convention), averaged; top-1; ppl."""
        torch = self.torch
        logq, nll, load_s = self._logprobs(folder)
        kl = (self.ref.exp() * (self.ref - logq)).sum(-1)  # (rows, positions)
        top1 = (self.ref.argmax(-1) == logq.argmax(-1)).float().mean().item()
        per_row = kl.mean(-1).cpu().numpy()
        del logq
        torch.cuda.empty_cache()
        storage = read_storage(folder)
        return {
            "kl_mean": float(kl.mean().item()),
            "kl_row_sd": float(per_row.std(ddof=1)),
            "kl_rows": [round(float(v), 7) for v in per_row],
            "kl_median": float(kl.median().item()),
            "top1": top1,
            "ppl": math.exp(nll),
            "vram_bytes": storage.vram_bytes,
            "vram_gib": storage.vram_bytes / GIB,
            "load_s": round(load_s, 2),
        }


def measure_step(
    models: dict[str, Path], bf16: Path, out: Path, rows: int, timeout_s: float
) -> dict[str, Any]:
    """exllamav3's own measurement of the lowest and highest conversion against BF16."""
    command = [
        sys.executable,
        "-m",
        "exllamav3.conversion.measure_model",
        "-i",
        str(models["2"]),
        str(models["4"]),
        "-r",
        str(bf16),
        "-l",
        "2",
        "-o",
        str(out),
        "-cr",
        str(rows),
        "-cc",
        "1024",
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    return {
        "command": " ".join(command[1:]),
        "exit": done.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "tail": (done.stdout + done.stderr).splitlines()[-4:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="bf16/ and q<bits>/ folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tabby", type=Path)
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--measure-rows", type=int, default=10, help="calibration rows of the measure step")
    args = parser.parse_args()
    clock = spotcheck.Clock(args.budget_s)
    bf16 = args.models / "bf16"
    conversions = {
        p.name[1:]: p for p in sorted(args.models.glob("q*")) if (p / "quantization_config.json").is_file()
    }
    results: dict[str, Any] = {"conversions": {}, "mixes": {}}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    train_log = json.loads((bf16 / "train_log.json").read_text())
    scorer = Scorer(bf16, np.load(bf16 / "eval_ids.npy"))
    results["bf16"] = {
        "exllamav3_ppl": math.exp(scorer.ref_nll),
        "torch_ppl": train_log.get("torch_eval_ppl"),
        "rows": list(scorer.ids.shape),
        "load_s": round(scorer.bf16_load_s, 2),
    }
    spotcheck.log(f"bf16: {results['bf16']}")
    save()
    measurement = args.work / "measurement.json"
    results["measure_step"] = measure_step(
        conversions, bf16, measurement, args.measure_rows, timeout_s=min(120.0, clock.left() - 60)
    )
    spotcheck.log(f"measure step: {results['measure_step']}")
    save()
    for bits, folder in conversions.items():
        results["conversions"][bits] = scorer.score(folder)
        spotcheck.log(f"conversion {bits} bpw: {results['conversions'][bits]}")
        save()
    low, high = conversions["2"], conversions["4"]
    targets = [bits for bits in conversions if bits not in ("2", "4")]
    methods = [("recipe", ["--recipe", "card"])]
    if results["measure_step"]["exit"] == 0:
        methods.append(("optimizer", ["--measurement", str(measurement)]))
    for bits in targets:
        gib = f"{results['conversions'][bits]['vram_bytes'] / GIB:.9f}"
        for method, flags in methods:
            if clock.left() < 20:
                break
            name = f"{method}@{bits}"
            folder = args.work / "mixes" / name.replace("@", "-")
            run = deploy(
                ["quant", "mix", "--lower", str(low), "--upper", str(high), "--target-gib", gib, *flags]
                + ["--out", str(folder), "--python", sys.executable, "--json"],
                timeout_s=min(300.0, clock.left() - 30),
            )
            entry: dict[str, Any] = {"target_gib": float(gib), "deploy_quant_mix": run}
            if run["exit"] == 0:
                entry.update(scorer.score(folder))
                manifest = json.loads((folder / "mix.json").read_text())
                entry["manifest"] = {k: v for k, v in manifest.items() if k != "modules"}
            results["mixes"][name] = entry
            spotcheck.log(
                f"mix {name}: exit {run['exit']}, KL {entry.get('kl_mean')}, GiB {entry.get('vram_gib')}"
            )
            save()
    served = next(
        (
            args.work / "mixes" / f"recipe-{b}"
            for b in targets
            if (args.work / "mixes" / f"recipe-{b}" / "mix.json").is_file()
        ),
        None,
    )
    if args.tabby and served and clock.left() > 45:
        results["tabbyapi"] = serve(args.tabby, served, args.work, clock)
        spotcheck.log(f"tabbyapi: {results['tabbyapi']}")
        save()
    return 0


def serve(tabby: Path, folder: Path, work: Path, clock: spotcheck.Clock) -> dict[str, Any]:
    """TabbyAPI loading the mix as a model folder: seconds to ready, the model id, one completion."""
    import httpx

    key = secrets.token_hex(16)
    server = spotcheck.Tabby(tabby, folder, "FP16", key, work / "tabby-mix.log")
    try:
        ready = server.wait_ready(key, max(20.0, min(120.0, clock.left() - 20)))
        result: dict[str, Any] = {"model": folder.name, "ready_s": ready}
        if ready is None:
            result["log_tail"] = server.log_path.read_text(errors="replace").splitlines()[-15:]
            return result
        headers = {"Authorization": f"Bearer {key}"}
        model = httpx.get(f"{server.url}/v1/model", headers=headers, timeout=30).json()
        answer = httpx.post(
            f"{server.url}/v1/completions",
            headers=headers,
            json={"prompt": "The history of the city", "max_tokens": 24, "temperature": 0},
            timeout=60,
        )
        result.update(
            model_id=model.get("id"), status=answer.status_code, text=answer.json()["choices"][0]["text"]
        )
        return result
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())

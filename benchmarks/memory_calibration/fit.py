"""Fit the planner's per-GPU overhead terms to the measured loads (results.json) and compare the planner's
predictions (toolkit/plan/memory.py with profiles/glm-4.7.yaml's terms) with what each GPU needed.

Runs anywhere (no GPU): `python3 benchmarks/memory_calibration/fit.py [--write TABLE.md]`. It also reports the
model's error on the loads the terms were fitted on and, separately, on held-out loads measured for the purpose
(heldout-<exllamav3>.json, when present: other contexts, chunk sizes, cache modes and a 4-layer slice; the rows
of heldout_fit.py, predicted with the current memory model and profile).
Per GPU, "needed" is the larger of
- NVML used after the two one-chunk generations (the runtime footprint; the allocator keeps its high-water mark), and
- for a GPU that exllamav3's autosplit loader finishes on: NVML after load - torch's reserved-but-free pool + the
  largest measuring-forward transient + 256 MiB (exllamav3 model_ls.py refuses the load without that headroom,
  EXL3_AUTOSPLIT_MARGIN_MB).
Overhead = needed - the weights and cache actually on that GPU (from the slice's shapes and exllamav3's split).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.facts.profiles import ModelProfile, parse_profile
from toolkit.plan import memory

MIB = 2**20
LOADER_MARGIN_MIB = 256  # exllamav3 model_ls.py EXL3_AUTOSPLIT_MARGIN_MB default
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM = 5120, 96, 8, 128
DENSE_I, MOE_I, EXPERTS, VOCAB = 12288, 1536, 160, 151552
BITS, HEAD_BITS = 4, 6


def exl3_bytes(in_f: int, out_f: int, bits: int, bias: bool = False) -> int:
    """Bytes of one EXL3 Linear as make_glm_slice.py writes it: trellis, suh, svh, mul1 marker, bias."""
    return in_f * out_f * bits // 8 + 2 * in_f + 2 * out_f + 4 + (2 * out_f if bias else 0)


def slice_components() -> dict[str, int]:
    """Bytes of each part of the slice that exllamav3 places or splits as a unit."""
    attention = (
        exl3_bytes(HIDDEN, Q_HEADS * HEAD_DIM, BITS, True)
        + 2 * exl3_bytes(HIDDEN, KV_HEADS * HEAD_DIM, BITS, True)
        + exl3_bytes(Q_HEADS * HEAD_DIM, HIDDEN, BITS)
    )
    expert = 2 * exl3_bytes(HIDDEN, MOE_I, BITS) + exl3_bytes(MOE_I, HIDDEN, BITS)
    return {
        "norms": 2 * HIDDEN * 2,
        "attention": attention,
        "dense_mlp": 2 * exl3_bytes(HIDDEN, DENSE_I, BITS) + exl3_bytes(DENSE_I, HIDDEN, BITS),
        "router": EXPERTS * HIDDEN * 2 + EXPERTS * 4,
        "experts": EXPERTS * expert,
        "shared": expert,
        "head": exl3_bytes(HIDDEN, VOCAB, HEAD_BITS) + HIDDEN * 2,
    }


def layer_bytes(parts: dict[str, int], index: int) -> int:
    """One decoder layer of the slice (layer 0 dense, the others MoE)."""
    mlp = parts["dense_mlp"] if index == 0 else parts["router"] + parts["experts"] + parts["shared"]
    return parts["norms"] + parts["attention"] + mlp


def cache_layer_bytes(mode: str, tokens: int) -> float:
    """KV cache of one layer (8 KV heads x 128): FP16 4 bytes per element pair, else (k + v + 1) / 8."""
    per = 4 if mode == "FP16" else sum(int(x) for x in mode.split(",")) / 8 + 1 / 8
    return tokens * KV_HEADS * HEAD_DIM * per


@dataclass
class GpuRow:
    """One GPU of one measured configuration."""

    source: str  # tabby | probe
    config: dict[str, Any]
    gpu: int
    role: str  # single | layer-first | layer-last | tp-output | tp-other
    weights: float  # bytes actually there
    cache: float
    after_load: float  # NVML delta MiB
    runtime: float  # NVML delta MiB, max over the generation phases
    loader_need: float | None

    @property
    def needed(self) -> float:
        return max(self.runtime, self.loader_need or 0.0)

    @property
    def overhead(self) -> float:
        return self.needed - (self.weights + self.cache) / MIB

    @property
    def quantized(self) -> bool:
        return self.config["cache_mode"] != "FP16"


def placement(cfg: dict[str, Any], probes: dict[str, dict[str, Any]]) -> list[list[int]]:
    """Layers on each GPU for single / layer-split loads (the head goes with the last)."""
    if cfg["split"] != "layer":
        return [[0, 1, 2]]
    first_moved = next(
        int(m.split()[0].split(".")[2])
        for p in probes.values()
        if p["config"]["gpu_split"] == cfg["gpu_split"]
        for m in p.get("loader_did_not_fit", [])
    )
    return [list(range(first_moved)), list(range(first_moved, 3))]


def tp_weights(parts: dict[str, int], table: list[str]) -> list[float]:
    """Per-GPU weight bytes of a TP load from exllamav3's printed split table (units per GPU)."""
    shares = [0.0, 0.0]
    for line in table:
        cols = line.split()
        if len(cols) != 4 or not cols[2].isdigit():
            continue
        key, a, b = cols[0], int(cols[2]), int(cols[3])
        frac = (a / (a + b), b / (a + b)) if a + b else (0.5, 0.5)
        if key == "lm_head":
            size = parts["head"]
        elif key.endswith("self_attn"):
            size = parts["attention"]
        elif key.endswith("shared_experts"):
            size = parts["shared"]
        elif key == "model.layers.0.mlp":
            size = parts["dense_mlp"]
        else:
            size = parts["experts"]
            shares = [s + parts["router"] for s in shares]  # the router is replicated
        shares = [s + size * f for s, f in zip(shares, frac)]
    return [s + 3 * parts["norms"] for s in shares]


def gpu_rows(results: dict[str, Any]) -> list[GpuRow]:
    """Every measured GPU with the weights and cache exllamav3 put there."""
    parts = slice_components()
    records = results["records"]
    probes = {r["config"]["name"]: r for r in records if r["kind"] == "probe" and "phases" in r}
    tp_table = next(r["tp_split_table"] for r in probes.values() if "tp_split_table" in r)
    rows: list[GpuRow] = []
    for rec in records:
        if (
            rec["kind"] not in ("tabby", "probe")
            or rec.get("error")
            or (rec["kind"] == "probe" and "phases" not in rec)
        ):
            continue
        cfg = rec["config"]
        gpus = len(cfg["gpus"].split(","))
        if rec["kind"] == "tabby":
            after_load = rec["after_load_delta_mib"]
            gen = [
                rec.get(k)
                for k in (
                    "after_gen1_delta_mib",
                    "after_gen2_delta_mib",
                    "peak_during_gen1_delta_mib",
                    "peak_during_gen2_delta_mib",
                )
                if rec.get(k)
            ]
        else:
            phases = {p["phase"]: p for p in rec["phases"]}
            after_load = phases["after_load"]["nvml_delta_mib"]
            gen = [phases[k]["nvml_delta_mib"] for k in ("after_gen1", "after_gen2")]
        runtime = [max(g[i] for g in gen) for i in range(gpus)]
        layer_cache = cache_layer_bytes(cfg["cache_mode"], cfg["cache_size"])
        probe = probes.get(cfg["name"]) or _family_probe(cfg, probes)
        if cfg["split"] == "tp":
            weights = tp_weights(parts, tp_table)
            for i in range(gpus):
                rows.append(
                    GpuRow(
                        rec["kind"],
                        cfg,
                        i,
                        "tp-output" if i == 0 else "tp-other",
                        weights[i],
                        3 * layer_cache / 2,
                        after_load[i],
                        runtime[i],
                        None,
                    )
                )
            continue
        layout = placement(cfg, probes)
        for i, layers in enumerate(layout):
            last = i == len(layout) - 1
            weights = sum(layer_bytes(parts, n) for n in layers) + (parts["head"] if last else 0)
            role = "single" if len(layout) == 1 else ("layer-last" if last else "layer-first")
            need = None
            if last:
                load = next(p for p in probe["phases"] if p["phase"] == "after_load")
                j = min(i, len(load["torch_reserved_mib"]) - 1)
                slack = load["torch_reserved_mib"][j] - load["torch_allocated_mib"][j]
                need = after_load[i] - slack + probe["loader_largest_transient_mib"][j] + LOADER_MARGIN_MIB
            rows.append(
                GpuRow(
                    rec["kind"],
                    cfg,
                    i,
                    role,
                    weights,
                    len(layers) * layer_cache,
                    after_load[i],
                    runtime[i],
                    need,
                )
            )
    return rows


def _family_probe(cfg: dict[str, Any], probes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The probe with the same split, chunk size and gpu_split (same loader transient), smallest pool slack.

    Its after-load pool slack stands in for the TabbyAPI load's (same loader, same allocator), which NVML cannot see.
    """
    split = "single" if cfg["split"] == "autosplit" else cfg["split"]  # autosplit put everything on GPU 0
    same = [
        p
        for p in probes.values()
        if p["config"]["split"] == split
        and p["config"]["chunk_size"] == cfg["chunk_size"]
        and p["config"]["gpu_split"] == cfg["gpu_split"]
    ]
    return min(
        same, key=lambda p: p["phases"][0]["torch_reserved_mib"][0] - p["phases"][0]["torch_allocated_mib"][0]
    )


def fit_terms(results: dict[str, Any], rows: list[GpuRow]) -> dict[str, float]:
    """Each term as the smallest value that covers every measurement it applies to (see RESULTS.md)."""
    probes = [r for r in results["records"] if r["kind"] == "probe" and "phases" in r]
    base = max(
        ph["nvml_delta_mib"][0] - ph["torch_reserved_mib"][0]
        for p in probes
        if p["config"]["split"] != "tp"
        for ph in p["phases"]
    )
    transient = {
        p["config"]["chunk_size"]: p["loader_largest_transient_mib"][0]
        for p in probes
        if p["config"]["split"] == "single" and p["config"]["cache_mode"] == "FP16"
    }
    slope = (transient[4096] - transient[512]) / (4096 - 512)
    statics = []
    for p in probes:
        if p["config"]["split"] not in ("single", "layer"):
            continue
        match = [
            r
            for r in rows
            if r.source == "probe" and r.config["name"] == p["config"]["name"] and r.loader_need
        ]
        for r in match:
            j = min(r.gpu, len(p["phases"][0]["torch_allocated_mib"]) - 1)
            statics.append(p["phases"][0]["torch_allocated_mib"][j] - (r.weights + r.cache) / MIB)
    resident = max(statics) + transient[2048] - slope * 2048

    def core(r: GpuRow) -> float:
        return base + resident + slope * r.config["chunk_size"]

    def worst(roles: tuple[str, ...], quantized: bool) -> float:
        return max(r.overhead - core(r) for r in rows if r.role in roles and r.quantized == quantized)

    output = worst(("single", "layer-last"), False)  # the GPU the loader finishes on
    tensor_parallel = worst(("tp-output", "tp-other"), False)
    spill = worst(("layer-first",), False)  # GPUs the loader moved past
    role_term = {
        "single": output,
        "tp-output": tensor_parallel,
        "tp-other": tensor_parallel,
        "layer-first": spill,
        "layer-last": output,
    }
    staging = max(0.0, max(r.overhead - core(r) - role_term[r.role] for r in rows if r.quantized))
    return {
        "base_mib": math.ceil(base),
        "resident_mib": math.ceil(resident),
        "chunk_mib_per_token": math.ceil(slope * 10_000) / 10_000,
        "quant_cache_staging_mib": math.ceil(staging),
        "output_gpu_mib": math.ceil(output),
        "tensor_parallel_mib": math.ceil(tensor_parallel),
        "layer_spill_mib": math.ceil(spill),
        "_transients_mib": transient,
        "_statics_mib": max(statics),
    }


def slice_profile(exllamav3: str, name: str = "glm-4.7-slice.yaml") -> ModelProfile:
    """A slice profile with profiles/glm-4.7.yaml's memory terms for that exllamav3 version: the planner's view."""
    data = yaml.safe_load((HERE / name).read_text())
    glm = yaml.safe_load((ROOT / "profiles/glm-4.7.yaml").read_text())
    for section in ("memory_overhead", "uncalibrated_margin"):
        data[section] = copy.deepcopy(glm[section])
    return parse_profile(data, HERE / name).with_calibration(exllamav3)


def predict(profile: ModelProfile, row_cfg: dict[str, Any]) -> memory.Placement:
    """What toolkit/plan/memory.py places on each GPU for a measured configuration."""
    quant = profile.quants[0]
    mode = memory.parse_cache_mode(row_cfg["cache_mode"])
    tokens, chunk = row_cfg["cache_size"], row_cfg["chunk_size"]
    big = 143_771 - 616
    if row_cfg["split"] == "tp":
        return memory.place_tensor_parallel(profile, quant, mode, tokens, [big, big], chunk)
    if row_cfg["split"] == "layer":
        # the usable memory whose gpu_split entry (layer_split_gib) is what the measured load was given
        entries = row_cfg["gpu_split"]
        usable = [
            memory.outside_gpu_split_mib(profile, last=i == len(entries) - 1) + round(g * 1024)
            for i, g in enumerate(entries)
        ]
        return memory.place_layers(profile, quant, mode, tokens, usable, chunk)
    return memory.place_layers(profile, quant, mode, tokens, [big], chunk)


def error_summary(label: str, pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """The prediction error over (needed, predicted) pairs, MiB and % of needed; positive = over-predicted (safe)."""
    diffs = [predicted - needed for needed, predicted in pairs]
    shares = [100 * (predicted - needed) / needed for needed, predicted in pairs]
    return {
        "set": label,
        "gpus": len(pairs),
        "within": sum(abs(d) <= max(0.03 * n, 256) for d, (n, _) in zip(diffs, pairs)),
        "mean_abs_mib": sum(abs(d) for d in diffs) / len(diffs),
        "mean_abs_pct": sum(abs(s) for s in shares) / len(shares),
        "min_mib": min(diffs),
        "max_mib": max(diffs),
        "under_predicted": sum(d < 0 for d in diffs),
    }


def fitted_pairs(rows: list[GpuRow], profile: ModelProfile, single_only: bool) -> list[tuple[float, float]]:
    """(needed, predicted) of every measured GPU the terms were fitted on (single-GPU loads only, if asked)."""
    pairs = []
    for r in rows:
        if single_only and r.role != "single":
            continue
        load = predict(profile, r.config).loads[r.gpu]
        pairs.append((r.needed, load.weights_mib + load.cache_mib + load.overhead_mib))
    return pairs


def heldout_pairs(results: dict[str, Any], path: Path, exllamav3: str) -> list[tuple[float, float]] | None:
    """(needed, predicted) of the held-out loads (heldout_fit.py's rows, today's memory model), None without data."""
    if not path.is_file():
        return None
    sys.path.insert(0, str(HERE))
    import heldout_fit

    heldout = json.loads(path.read_text())
    profile = slice_profile(exllamav3, "glm-4.7-slice-4l.yaml")
    rows = heldout_fit.rows(heldout, heldout_fit.probes_from(results, heldout), profile)
    return [
        (r["predicted_mib"] - r["diff_mib"], r["predicted_mib"]) for r in rows
    ]  # diff_mib: unrounded need


def error_table(summaries: list[dict[str, Any]]) -> str:
    """The fitted-vs-held-out error summary as markdown."""
    lines = [
        "| loads | GPUs | within max(3 %, 256 MiB) | mean abs error | error range (predicted - needed) | under-predicted |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['set']} | {s['gpus']} | {s['within']} | {s['mean_abs_mib']:.0f} MiB ({s['mean_abs_pct']:.1f} %) "
            f"| {s['min_mib']:+.0f} .. {s['max_mib']:+.0f} MiB | {s['under_predicted']} |"
        )
    return "\n".join(lines)


def comparison(rows: list[GpuRow], profile: ModelProfile) -> tuple[list[str], int, int]:
    """Markdown rows: predicted vs needed per GPU, and how many are within max(3 %, 256 MiB)."""
    lines = [
        (
            "| source | config | GPU | role | weights+cache MiB (actual / predicted) | NVML after load | "
            "NVML after gen | loader needs | needed | predicted | diff | within |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = 0
    for r in rows:
        load = predict(profile, r.config).loads[r.gpu]
        predicted = load.weights_mib + load.cache_mib + load.overhead_mib
        diff = predicted - r.needed
        tolerance = max(0.03 * r.needed, 256)
        within = abs(diff) <= tolerance
        ok += within
        actual_wc = (r.weights + r.cache) / MIB
        lines.append(
            f"| {r.source} | {r.config['name']} | {r.gpu} | {r.role} | {actual_wc:.0f} / "
            f"{load.weights_mib + load.cache_mib} | {r.after_load:.0f} | {r.runtime:.0f} | "
            f"{'' if r.loader_need is None else f'{r.loader_need:.0f}'} | {r.needed:.0f} | {predicted} | "
            f"{diff:+.0f} | {'yes' if within else 'NO'} |"
        )
    return lines, ok, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--write", type=Path, help="write the comparison table (markdown) to this file")
    parser.add_argument(
        "--exllamav3", default="1.6.5", help="the exllamav3 version the results were measured with (1.6.5)"
    )
    parser.add_argument(
        "--heldout", type=Path, help="held-out loads (default: heldout-<exllamav3>.json here, when present)"
    )
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    rows = gpu_rows(results)
    terms = fit_terms(results, rows)
    print("fitted terms:", json.dumps(terms))
    profile = slice_profile(args.exllamav3)
    used = profile.memory_overhead
    differ = {
        k: (v, getattr(used, k)) for k, v in terms.items() if not k.startswith("_") and getattr(used, k) != v
    }
    if differ:
        print("profiles/glm-4.7.yaml differs from the fit (fit, profile):", differ)
    lines, ok, total = comparison(rows, profile)
    table = "\n".join(lines)
    print(table)
    print(f"{ok} of {total} GPUs within max(3 %, 256 MiB)")
    summaries = [
        error_summary("fitted on: every GPU of results.json", fitted_pairs(rows, profile, single_only=False)),
        error_summary("fitted on: single-GPU loads", fitted_pairs(rows, profile, single_only=True)),
    ]
    heldout = heldout_pairs(results, args.heldout or HERE / f"heldout-{args.exllamav3}.json", args.exllamav3)
    if heldout:
        summaries.append(error_summary("held out: single-GPU loads (4-layer slice)", heldout))
    errors = error_table(summaries)
    print(errors if heldout else errors + "\n(no held-out loads: heldout-<exllamav3>.json not found)")
    if args.write:
        args.write.write_text(table + f"\n\n{ok} of {total} GPUs within max(3 %, 256 MiB).\n\n{errors}\n")


if __name__ == "__main__":
    main()

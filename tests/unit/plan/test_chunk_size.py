"""Chunk size as a planning dimension: lowered only when the required context does not fit, only where the memory
model was checked at that size, and never for a context that fits at the default."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import NoFit
from toolkit.facts.profiles import load_profile, parse_profile
from toolkit.facts.tabby_pin import load_tabby_pin
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import make_plan, plan_with_details
from toolkit.render.bundle import RenderOptions, render_files

ROOT = Path(__file__).resolve().parents[3]
CALIBRATION = ROOT / "benchmarks" / "memory_calibration"
PROFILE = load_profile("glm-4.7")
WITHOUT_FALLBACKS = dataclasses.replace(
    PROFILE, serving=dataclasses.replace(PROFILE.serving, chunk_fallbacks=())
)
TOKENS = "api_key: 00000000000000000000000000000000\nadmin_key: 11111111111111111111111111111111\n"


def _script(name: str):
    """A script of benchmarks/memory_calibration as a module (its fitting code is the calibration's definition)."""
    spec = importlib.util.spec_from_file_location(f"calibration_{name}", CALIBRATION / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measured_rows() -> list[tuple[str, int, int, float]]:
    """(split, chunk_size, predicted - needed MiB, tolerance MiB) for every measured GPU, with today's profile
    terms: the calibration loads (3-layer slice, results.json) and the held-out loads (4-layer slice)."""
    fit, heldout_fit = _script("fit"), _script("heldout_fit")
    results = json.loads((CALIBRATION / "results.json").read_text())
    rows = []
    exllamav3 = load_tabby_pin().exllamav3  # the terms of the pinned stack's version
    profile = fit.slice_profile(exllamav3)
    for row in fit.gpu_rows(results):
        load = fit.predict(profile, row.config).loads[row.gpu]
        predicted = load.weights_mib + load.cache_mib + load.overhead_mib
        split = row.role.split("-")[0]
        rows.append((split, row.config["chunk_size"], predicted - row.needed, max(0.03 * row.needed, 256)))
    heldout = json.loads((CALIBRATION / "heldout-1.6.5.json").read_text())
    data = yaml.safe_load((CALIBRATION / "glm-4.7-slice-4l.yaml").read_text())
    glm = yaml.safe_load((ROOT / "profiles" / "glm-4.7.yaml").read_text())
    for section in ("memory_overhead", "uncalibrated_margin"):
        data[section] = copy.deepcopy(glm[section])
    four_layers = parse_profile(data, CALIBRATION / "glm-4.7-slice-4l.yaml").with_calibration(exllamav3)
    for row in heldout_fit.rows(heldout, heldout_fit.probes_from(results, heldout), four_layers):
        rows.append(("single", row["chunk_size"], row["diff_mib"], max(0.03 * row["needed_mib"], 256)))
    return rows


@pytest.mark.parametrize("fallback", PROFILE.serving.chunk_fallbacks, ids=lambda f: f"chunk{f.chunk_size}")
def test_every_smaller_chunk_size_is_calibrated_where_the_profile_says(fallback):
    rows = measured_rows()
    for split in fallback.calibrated_splits:
        at_size = [
            (diff, tolerance)
            for s, chunk, diff, tolerance in rows
            if s == split and chunk == fallback.chunk_size
        ]
        assert at_size, f"no {split} load was measured at chunk_size {fallback.chunk_size}"
        assert all(abs(diff) <= tolerance for diff, tolerance in at_size), at_size


HOSTS = [f"{n}x{card}" for card in ("RTX4090", "RTX5090", "A6000", "L40S", "RTXPRO6000", "H100", "H200", "24GiB")
         for n in (1, 2, 4, 8)] + ["141GB", "3xH200", "96GiB,48GiB"]  # fmt: skip


@pytest.mark.parametrize("spec", HOSTS)
def test_a_context_that_fits_at_the_default_chunk_size_changes_nothing(spec):
    inventory = parse_gpu_spec(spec)
    requests = [PlanRequest()] + ([PlanRequest(split="layer")] if len(inventory.gpus) > 1 else [])
    for request in requests:
        try:
            before = make_plan(WITHOUT_FALLBACKS, inventory, request)
        except NoFit:
            with pytest.raises(NoFit):
                make_plan(PROFILE, inventory, request)
            continue
        plan, details = plan_with_details(PROFILE, inventory, request)
        assert plan.to_dict() == before.to_dict() and details.chunk_trade is None


def test_a_smaller_chunk_keeps_the_better_quant_at_full_context():
    inventory = parse_gpu_spec("141GB")  # one GPU of 141 GB, e.g. an H200 NVL, at the model's full context
    before = make_plan(WITHOUT_FALLBACKS, inventory, PlanRequest(context_max=True))
    plan, details = plan_with_details(PROFILE, inventory, PlanRequest(context_max=True))
    assert (before.quant, before.chunk_size) == ("2.10bpw-tuned", 2048)
    assert (plan.quant, plan.cache_mode, plan.chunk_size) == ("2.57bpw-tuned", "5,4", 1024)
    assert plan.expected.kl < before.expected.kl
    trade = details.chunk_trade
    assert (trade.default_chunk_size, trade.chunk_size, trade.required_context) == (2048, 1024, 202752)
    assert trade.default_max_context < trade.required_context <= trade.max_context
    assert trade.prefill_vs_default == PROFILE.serving.chunk_fallbacks[0].prefill_vs_default
    config = render_files(plan, Path("/tmp/out"), RenderOptions(), TOKENS)["config.yml"][0]
    assert yaml.safe_load(config)["model"]["chunk_size"] == 1024


@pytest.mark.parametrize("spec", ["8x24GiB", "4xRTX5090", "2xH200"])
def test_splits_not_calibrated_at_a_smaller_chunk_keep_the_default(spec):
    planned = []
    for request in (PlanRequest(context_max=True), PlanRequest(context=131072), PlanRequest(context=65536)):
        with contextlib.suppress(NoFit):
            planned.append(make_plan(PROFILE, parse_gpu_spec(spec), request))
    assert planned, "the test needs plans"
    assert all(plan.chunk_size == PROFILE.serving.chunk_size for plan in planned if plan.split != "single")

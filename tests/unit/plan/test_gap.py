"""The planner's gap: the weights budget at the required context, and the mix of two branches it proposes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.detect.inventory import Gpu, GpuInventory
from toolkit.errors import BadInput, NoFit
from toolkit.facts.profiles import load_profile
from toolkit.plan.check import plan_from_data
from toolkit.plan.gap import fits, interpolated_kl, uniform_quant, weights_budget
from toolkit.plan.memory import GIB, MIB, cache_size_tokens, parse_cache_mode, weights_bytes
from toolkit.plan.plan import Plan, PlanRequest
from toolkit.plan.planner import make_plan, resolve_headroom

ROOT = Path(__file__).resolve().parents[3]
PROFILE = load_profile("glm-4.7")
QUANTS = {q.branch: q for q in PROFILE.quants}
REQUIRED = cache_size_tokens(PROFILE.serving.default_min_context)
RTX_5090_X4 = "4x32607MiB"  # the issue's example: 4 x RTX 5090 (NVML total 32607 MiB each)


def plan_for(inventory: GpuInventory, **request: Any) -> Plan:
    return make_plan(PROFILE, inventory, PlanRequest(**request))


def placed(plan: Plan) -> tuple[list[int], str]:
    """The usable MiB of the GPUs the plan places on, and its split (as the planner hands them to gap.py)."""
    headroom = resolve_headroom(plan.inventory, PlanRequest())
    usable = [gpu.free_mib - room for gpu, room in zip(plan.inventory.gpus, headroom)]
    return (usable[:1] if plan.split == "single" else usable), plan.split


def budget_of(plan: Plan) -> int:
    usable, split = placed(plan)
    mode = parse_cache_mode(plan.cache_mode)
    return weights_budget(PROFILE, QUANTS[plan.quant], mode, REQUIRED, split, usable, plan.chunk_size)


def fits_weights(plan: Plan, weights: int) -> bool:
    usable, split = placed(plan)
    stand_in = uniform_quant(PROFILE, QUANTS[plan.quant].head_bits, weights)
    return fits(
        PROFILE, stand_in, parse_cache_mode(plan.cache_mode), REQUIRED, split, usable, plan.chunk_size
    )


def test_the_issues_example_proposes_a_257_315_tuned_mix() -> None:
    plan = plan_for(parse_gpu_spec(RTX_5090_X4))
    proposal = plan.mix_proposal
    assert plan.quant == "2.57bpw-tuned" and proposal is not None
    assert (proposal.lower, proposal.upper) == ("2.57bpw-tuned", "3.15bpw-tuned")
    lower, upper = QUANTS["2.57bpw-tuned"], QUANTS["3.15bpw-tuned"]
    assert lower.size_gib < proposal.target_gib < upper.size_gib
    assert proposal.target_gib == math.floor(proposal.budget_gib) - PROFILE.mix.margin_gib  # type: ignore[union-attr]
    assert proposal.free_gib_before >= PROFILE.mix.min_gap_gib  # type: ignore[union-attr]
    assert upper.kl_ref_quant < proposal.expected_kl < lower.kl_ref_quant
    assert proposal.expected_kl == pytest.approx(interpolated_kl(lower, upper, proposal.target_gib), abs=1e-4)
    assert proposal.kl_basis.startswith("estimate:") and "2.57bpw-tuned (105 GiB" in proposal.kl_basis
    assert [d.branch for d in proposal.downloads] == ["2.57bpw-tuned", "3.15bpw-tuned"]
    embedding_gb = PROFILE.architecture.embedding_bytes / 1e9
    assert proposal.downloads[1].gb == pytest.approx(129 * GIB / 1e9 + embedding_gb, abs=0.05)
    # the budget is the inverse of the memory model: it fits at the required context, 64 MiB more does not
    budget = budget_of(plan)
    assert proposal.budget_gib == round(budget / GIB, 2)
    assert fits_weights(plan, budget) and not fits_weights(plan, budget + 64 * MIB)
    assert fits_weights(plan, int(proposal.target_gib * GIB))
    # 3bpw_H6 (124 GiB) is larger too, but lies above the log-KL line from 2.57 to 3.15bpw-tuned
    assert interpolated_kl(lower, QUANTS["3bpw_H6"], proposal.target_gib) > proposal.expected_kl


def test_the_plan_table_shows_the_gap_in_one_line_and_json_carries_it() -> None:
    command = [sys.executable, "-m", "toolkit.cli", "plan", "--gpus", RTX_5090_X4]
    table = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert table.returncode == 0, table.stderr
    gap = [line for line in table.stdout.splitlines() if line.startswith("gap: ")]
    assert len(gap) == 1
    assert "-> mix 2.57bpw-tuned + 3.15bpw-tuned at " in gap[0] and "(estimate" in gap[0]
    assert "deploy auto --mix" in gap[0] and "2.57bpw-tuned + 3.15bpw-tuned" in gap[0]
    shown = subprocess.run(
        [*command, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    data = json.loads(shown.stdout)
    assert data["mix_proposal"]["upper"] == "3.15bpw-tuned"
    assert (
        plan_from_data(data, "plan.json").mix_proposal == plan_for(parse_gpu_spec(RTX_5090_X4)).mix_proposal
    )


def test_no_proposal_when_the_chosen_quant_leaves_less_than_the_gap() -> None:
    plan = plan_for(parse_gpu_spec("1xH200"))
    assert plan.mix_proposal is None
    unused = (budget_of(plan) - weights_bytes(PROFILE.architecture, QUANTS[plan.quant])) / GIB
    assert 0 <= unused < PROFILE.mix.min_gap_gib  # type: ignore[union-attr]
    larger = [q for q in PROFILE.quants if q.size_gib > QUANTS[plan.quant].size_gib]
    assert larger and all(weights_bytes(PROFILE.architecture, q) > budget_of(plan) for q in larger)


def test_no_proposal_for_the_largest_quant_or_a_fixed_quant() -> None:
    largest = plan_for(parse_gpu_spec("4xH200"))
    assert largest.quant == max(PROFILE.quants, key=lambda q: q.size_gib).branch
    assert largest.mix_proposal is None
    assert plan_for(parse_gpu_spec(RTX_5090_X4), quant="2.57bpw-tuned").mix_proposal is None


GPU_MIB = st.lists(st.integers(min_value=16 * 1024, max_value=160 * 1024), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(free_mib=GPU_MIB, context=st.sampled_from([None, 8192, 32768, 65536]))
def test_a_proposal_fits_its_budget_and_lies_between_its_branches(
    free_mib: list[int], context: int | None
) -> None:
    inventory = GpuInventory(
        gpus=tuple(Gpu(index=i, name="test", total_mib=m, free_mib=m) for i, m in enumerate(free_mib)),
        source="spec",
    )
    try:
        plan = plan_for(inventory, context=context)
    except NoFit:
        return
    proposal = plan.mix_proposal
    if proposal is None:
        return
    required = cache_size_tokens(context or PROFILE.serving.default_min_context)
    usable, split = placed(plan)
    budget = weights_budget(
        PROFILE,
        QUANTS[plan.quant],
        parse_cache_mode(plan.cache_mode),
        required,
        split,
        usable,
        plan.chunk_size,
    )
    lower, upper = QUANTS[proposal.lower], QUANTS[proposal.upper]
    assert proposal.lower == plan.quant
    assert proposal.target_gib * GIB <= budget
    assert lower.size_gib < proposal.target_gib < upper.size_gib
    assert weights_bytes(PROFILE.architecture, upper) > budget  # the upper itself does not fit
    assert upper.kl_ref_quant <= proposal.expected_kl <= lower.kl_ref_quant
    plan_from_data(
        json.loads(json.dumps(plan.to_dict())), "plan.json"
    )  # the check accepts what the planner made


def edited(change: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(plan_for(parse_gpu_spec(RTX_5090_X4)).to_dict()))
    change(data["mix_proposal"])
    return data


def set_field(proposal: dict[str, Any], key: str, value: Any) -> None:
    proposal[key] = value


REFUSED = {
    "lower is not the planned quant": (
        lambda p: set_field(p, "lower", "2bpw_H6"),
        "is not the planned quant",
    ),
    "upper unknown": (lambda p: set_field(p, "upper", "9bpw"), "is not a branch of glm-4.7 larger"),
    "upper smaller": (lambda p: set_field(p, "upper", "2bpw_H6"), "is not a branch of glm-4.7 larger"),
    "target above the upper": (lambda p: set_field(p, "target_gib", 130.0), "is not between"),
    "target above the budget": (
        lambda p: set_field(p, "target_gib", p["budget_gib"] + 0.5),
        "is not between",
    ),
    "budget beyond the GPUs": (lambda p: set_field(p, "budget_gib", 500.0), "the planned GPUs'"),
    "free after inconsistent": (lambda p: set_field(p, "free_gib_after", 9.0), "free_gib_after"),
    "gap below the profile's": (lambda p: set_field(p, "free_gib_before", 1.0), "free_gib_before"),
    "kl edited": (lambda p: set_field(p, "expected_kl", 0.1), "is not the card-point estimate"),
    "kl said to be measured": (
        lambda p: set_field(p, "kl_basis", "measured"),
        "does not say the KL is an estimate",
    ),
    "head bits": (lambda p: set_field(p, "head_bits", 8), "head_bits"),
    "downloads": (lambda p: p["downloads"].pop(), "downloads"),
    "kl as text": (lambda p: set_field(p, "expected_kl", "0.38"), "expected_kl must be a finite number"),
    "not an object": (lambda p: p.clear() or p.update({"lower": []}), "is not a `deploy plan --json` object"),
}


def test_the_plan_check_accepts_the_planners_proposal() -> None:
    plan = plan_from_data(edited(lambda p: None), "plan.json")
    assert plan.mix_proposal is not None and plan.mix_proposal.upper == "3.15bpw-tuned"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_plan_check_refuses_an_edited_proposal(case: str) -> None:
    change, expected = REFUSED[case]
    with pytest.raises(BadInput) as refused:
        plan_from_data(edited(change), "plan.json")
    assert expected in refused.value.line() and refused.value.exit_code == 2

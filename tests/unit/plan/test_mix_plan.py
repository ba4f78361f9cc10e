"""Planning a mix: `--mix` (the planner's proposal) and `--quant mix:LOWER+UPPER@GIB`, the plan that names it, and
plan/check.py refusing an edited one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import BadInput
from toolkit.facts.profiles import load_profile
from toolkit.plan.check import plan_from_data
from toolkit.plan.gap import interpolated_kl
from toolkit.plan.memory import GIB, weights_bytes
from toolkit.plan.mix_quant import source_target_bytes
from toolkit.plan.plan import Plan, PlanRequest
from toolkit.plan.planner import make_plan
from toolkit.quant.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[3]
PROFILE = load_profile("glm-4.7")
QUANTS = {q.branch: q for q in PROFILE.quants}
RTX_5090_X4 = "4x32607MiB"  # the example: 4 x RTX 5090
SPEC = "mix:2.57bpw-tuned+3.15bpw-tuned@110"


def plan_for(gpus: str = RTX_5090_X4, **request: Any) -> Plan:
    return make_plan(PROFILE, parse_gpu_spec(gpus), PlanRequest(**request))


def test_mix_takes_the_planners_proposal_and_places_it_at_its_target() -> None:
    proposal = plan_for().mix_proposal
    assert proposal is not None
    plan = plan_for(mix=True)
    mix = plan.mix
    assert mix is not None and plan.mix_proposal is None
    assert (mix.lower, mix.upper, mix.target_gib) == (proposal.lower, proposal.upper, proposal.target_gib)
    assert plan.quant == mix.name == f"mix-{proposal.lower}-{proposal.upper}-{proposal.target_gib:g}GiB"
    assert mix.expected_kl == proposal.expected_kl and mix.kl_basis == proposal.kl_basis
    assert mix.downloads == proposal.downloads and mix.head_bits == proposal.head_bits
    recipe = load_recipe(None)
    assert (mix.recipe, mix.recipe_sha256) == (recipe.name, recipe.sha256)
    # the memory plan's weights are the target: what the GPUs hold adds up to it (MiB rounding per GPU)
    assert plan.weights_gib == mix.target_gib
    held_mib = sum(a.weights_mib for a in plan.per_gpu)
    assert held_mib * 2**20 == pytest.approx(mix.target_gib * GIB, abs=len(plan.per_gpu) * 2**20)
    assert all(a.free_after_mib >= 0 for a in plan.per_gpu)
    assert plan.context >= PROFILE.serving.default_min_context
    lower, upper = QUANTS[mix.lower], QUANTS[mix.upper]
    assert upper.kl_ref_quant < plan.expected.kl < lower.kl_ref_quant
    assert upper.top1 > plan.expected.top1 > lower.top1
    assert all(r.reason.startswith(("needs", "fits, but the mix")) for r in plan.rejected)


def test_the_explicit_spec_plans_the_same_as_mix() -> None:
    proposal = plan_for().mix_proposal
    assert proposal is not None
    spec = f"mix:{proposal.lower}+{proposal.upper}@{proposal.target_gib:g}"
    assert plan_for(quant=spec) == plan_for(mix=True)


def test_the_mix_is_part_of_what_the_plan_deploys() -> None:
    plan = plan_for(quant=SPEC)
    other = plan_for(quant="mix:2.57bpw-tuned+3.15bpw-tuned@111")
    assert plan.digest() != other.digest() and plan.quant != other.quant
    data = plan.to_dict()
    assert data["mix"]["name"] == "mix-2.57bpw-tuned-3.15bpw-tuned-110GiB" and "mix_proposal" not in data
    assert "mix" not in plan_for(quant="2.57bpw-tuned").to_dict()  # branch plans stay as they were


def test_plan_mix_on_the_command_line_prints_the_mix_and_its_estimate() -> None:
    command = [sys.executable, "-m", "toolkit.cli", "plan", "--gpus", RTX_5090_X4, "--mix"]
    shown = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    chosen = [line for line in shown.stdout.splitlines() if line.startswith(">")]
    assert len(chosen) == 1 and "mix-2.57bpw-tuned-3.15bpw-tuned-" in chosen[0] and "~0." in chosen[0]
    (line,) = [line for line in shown.stdout.splitlines() if line.startswith("mix: ")]
    assert "2.57bpw-tuned + 3.15bpw-tuned by recipe card" in line and "estimate:" in line
    shown = subprocess.run([*command, "--json"], cwd=ROOT, capture_output=True, text=True, check=False)
    data = json.loads(shown.stdout)
    assert plan_from_data(data, "plan.json") == plan_for(mix=True)


REFUSED_REQUESTS = {
    "not a spec": ("mix:2.57bpw-tuned@110", "is not mix:LOWER+UPPER@GIB"),
    "no size": ("mix:2.57bpw-tuned+3.15bpw-tuned", "is not mix:LOWER+UPPER@GIB"),
    "a size with markup": ("mix:2.57bpw-tuned+3.15bpw-tuned@1[red]", "is not mix:LOWER+UPPER@GIB"),
    "unknown branch": ("mix:2.57bpw-tuned+9bpw@110", "unknown quant '9bpw'"),
    "larger first": ("mix:3.15bpw-tuned+2.57bpw-tuned@110", "is not smaller than"),
    "size below": ("mix:2.57bpw-tuned+3.15bpw-tuned@100", "100 GiB is not between"),
    "size of the upper": ("mix:2.57bpw-tuned+3.15bpw-tuned@129", "is not between"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_REQUESTS))
def test_a_bad_mix_spec_is_one_line_and_exit_2(case: str) -> None:
    spec, expected = REFUSED_REQUESTS[case]
    with pytest.raises(BadInput) as refused:
        plan_for(quant=spec)
    assert expected in refused.value.line() and refused.value.exit_code == 2
    assert "\n" not in refused.value.line()


def test_mix_without_a_proposal_or_with_quant_is_refused() -> None:
    with pytest.raises(BadInput) as none:
        plan_for("1xH200", mix=True)  # the best branch fills one H200: no gap
    assert "--mix: no mix is proposed here" in none.value.line() and none.value.exit_code == 2
    with pytest.raises(BadInput) as both:
        plan_for(mix=True, quant=SPEC)
    assert "--mix takes the planner's proposal; --quant fixes the quant" in both.value.line()


def test_the_mix_target_between_the_downloaded_branches() -> None:
    """The planned 110 GiB at its share of the way between the branches' sizes (the memory model's, exact for the
    published branches): the published branches give the planned bytes, small stand-ins the same share, and never
    more than the planned bytes."""
    mix = plan_for(quant=SPEC).mix
    assert mix is not None
    low, high = (weights_bytes(PROFILE.architecture, QUANTS[b]) for b in (mix.lower, mix.upper))
    planned = 110 * GIB
    assert source_target_bytes(PROFILE, mix, low, high) == pytest.approx(planned, abs=1)
    share = (planned - low) / (high - low)
    assert source_target_bytes(PROFILE, mix, 1_000_000, 3_400_000) == 1_000_000 + int(share * 2_400_000)
    assert source_target_bytes(PROFILE, mix, low + GIB, high + GIB) == planned  # larger branches: capped


def test_a_mix_lies_between_the_memory_models_sizes_too() -> None:
    """2.57bpw-tuned is 105 GiB on the card and more as exllamav3 stores it: 105.5 GiB is no mix of it."""
    lower = weights_bytes(PROFILE.architecture, QUANTS["2.57bpw-tuned"]) / GIB
    assert 105 < lower < 106
    with pytest.raises(BadInput) as refused:
        plan_for(quant="mix:2.57bpw-tuned+3.15bpw-tuned@105.5")
    assert f"is not between 2.57bpw-tuned's {lower:.2f}" in refused.value.line()


def edited(change: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(plan_for(quant=SPEC).to_dict()))
    change(data)
    return data


def mix_field(key: str, value: Any) -> Any:
    return lambda d: d["mix"].__setitem__(key, value)


def renamed(target: float) -> Any:
    """The target raised everywhere but in the memory figures (name, quant, estimates)."""

    def change(d: dict[str, Any]) -> None:
        placed = plan_for(quant=f"mix:2.57bpw-tuned+3.15bpw-tuned@{target:g}")
        d["mix"] = placed.to_dict()["mix"]
        d["quant"], d["expected"] = placed.quant, placed.to_dict()["expected"]

    return change


REFUSED_PLANS = {
    "name": (mix_field("name", "mix-x"), "are not the mix's name"),
    "quant a branch": (lambda d: d.__setitem__("quant", "3.15bpw-tuned"), "are not the mix's name"),
    "lower unknown": (mix_field("lower", "9bpw"), "are not a smaller and a larger branch"),
    "lower a path": (mix_field("lower", "../../victim"), "are not a smaller and a larger branch"),
    "upper smaller": (mix_field("upper", "2bpw_H6"), "are not a smaller and a larger branch"),
    "target above the upper": (mix_field("target_gib", 130.0), "is not between"),
    "target bigger, memory kept": (renamed(111.0), "is not mix-2.57bpw-tuned-3.15bpw-tuned-111GiB's"),
    "target in thousandths": (mix_field("target_gib", 110.001), "in hundredths"),
    "recipe unknown": (mix_field("recipe", "fast"), "is not a recipe"),
    "recipe a file": (mix_field("recipe", "/tmp/evil.yaml"), "is malformed"),
    "recipe changed": (mix_field("recipe_sha256", "0" * 64), "has changed since the plan was made"),
    "kl edited": (mix_field("expected_kl", 0.2), "is not the card-point estimate"),
    "kl said to be measured": (mix_field("kl_basis", "measured"), "does not say the KL is an estimate"),
    "head bits": (mix_field("head_bits", 8), "head_bits"),
    "downloads": (lambda d: d["mix"]["downloads"].pop(), "mix.downloads"),
    "bpw": (lambda d: d.__setitem__("bpw", 2.5), "bpw 2.5 is not"),
    "expected kl of the plan": (lambda d: d["expected"].__setitem__("kl", 0.1), "expected.kl 0.1 is not"),
    "a proposal beside the mix": (
        lambda d: d.__setitem__("mix_proposal", plan_for().to_dict()["mix_proposal"]),
        "carries no mix_proposal",
    ),
    "mix dropped": (lambda d: d.pop("mix"), "is not one of glm-4.7's quants"),
    "target as text": (mix_field("target_gib", "110"), "target_gib must be a finite number"),
    "not an object": (lambda d: d.__setitem__("mix", ["x"]), "is not a `deploy plan --json` object"),
}


def test_the_plan_check_accepts_the_planners_mix() -> None:
    assert plan_from_data(edited(lambda d: None), "plan.json") == plan_for(quant=SPEC)


@pytest.mark.parametrize("case", sorted(REFUSED_PLANS))
def test_the_plan_check_refuses_an_edited_mix(case: str) -> None:
    change, expected = REFUSED_PLANS[case]
    with pytest.raises(BadInput) as refused:
        plan_from_data(edited(change), "plan.json")
    assert expected in refused.value.line() and refused.value.exit_code == 2


def test_the_expected_kl_is_the_card_point_estimate() -> None:
    mix = plan_for(quant=SPEC).mix
    assert mix is not None
    lower, upper = QUANTS["2.57bpw-tuned"], QUANTS["3.15bpw-tuned"]
    share = 5 / 24
    low, high = math.log(lower.kl_ref_quant), math.log(upper.kl_ref_quant)
    estimate = math.exp(low + share * (high - low))
    assert mix.expected_kl == round(estimate, 4) == round(interpolated_kl(lower, upper, 110), 4)

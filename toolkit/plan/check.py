"""A plan from a file (`deploy render --plan`, a rendered folder's plan.json) checked for meaning, not only shape.

A plan.json can be edited by hand. Before anything is rendered or deployed from one, it must still describe a plan
glm-deploy could have made: its profile's repository and one of its quants (with that quant's bpw and weights),
a cache mode TabbyAPI accepts in its own spelling, a split that fits the number of GPUs, a context within the
model's range with a cache of whole pages, one allocation per planned GPU of the inventory, and no GPU planned
beyond its usable memory. A plan deploying a mix (plan.mix) must name it as the planner would: two branches of the
profile, a target strictly between their sizes that is also the plan's weights, the mix's name as the quant, a
recipe of profiles/quant_mix.yaml with its current hash, and its KL as the card-point estimate it is. Any other plan
is bad input (exit 2) naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from .. import validate
from ..detect.inventory import inventory_from_json
from ..errors import BadInput
from ..facts.profiles import ModelProfile, Quant, load_profile
from ..facts.runtime import CACHE_PAGE_TOKENS
from .gap import download_gb, interpolated_kl
from .memory import parse_cache_mode, weights_bytes
from .mix_quant import MixSpec, mix_name, recipe_hash, size_range, stand_in
from .plan import SPLITS, Plan

# The plan's weights_gib is rounded to 0.01 GiB by the planner, as are a mix proposal's GiB figures; its expected
# KL to 4 decimals.
WEIGHTS_TOLERANCE_GIB = 0.02
KL_TOLERANCE = 1e-4
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def plan_from_data(data: Any, source: str) -> Plan:
    """A Plan from parsed JSON, checked for shape and for meaning; BadInput naming the source otherwise."""
    hint = "re-run `deploy plan --json > plan.json` (do not edit it by hand)"
    if not isinstance(data, dict):
        raise BadInput(f"plan {source} is not a `deploy plan --json` object", hint)
    try:
        plan = Plan.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput(
            f"plan {source} is not a `deploy plan --json` object ({type(exc).__name__}: {exc})", hint
        ) from None
    inventory_from_json(
        data["inventory"], lambda problem: BadInput(f"plan {source}: inventory {problem}", hint)
    )
    return check_plan(plan, source)


def check_plan(plan: Plan, source: str = "plan.json") -> Plan:
    """The plan when it means something glm-deploy could have planned, else BadInput naming what does not."""
    hint = "re-run `deploy plan --json > plan.json` (do not edit it by hand)"

    def fail(problem: str) -> BadInput:
        return BadInput(f"plan {source}: {problem}", hint)

    for name, value in (("profile", plan.profile), ("quant", plan.quant)):
        if not validate.SAFE_NAME.fullmatch(value):
            raise fail(f"{name} {value!r} is not a safe name")
    profile = load_profile(plan.profile)
    if plan.hf_repo != profile.hf_repo:
        raise fail(f"hf_repo {plan.hf_repo!r} is not {profile.name}'s repository {profile.hf_repo!r}")
    quant = _check_planned_mix(plan, profile, fail) if plan.mix is not None else None
    quant = quant or next((q for q in profile.quants if q.branch == plan.quant), None)
    if quant is None:
        raise fail(f"quant {plan.quant!r} is not one of {profile.name}'s quants")
    if abs(plan.bpw - quant.bpw) > 1e-9:
        raise fail(f"bpw {plan.bpw} is not {quant.branch}'s {quant.bpw}")
    weights_gib = weights_bytes(profile.architecture, quant) / 2**30
    if abs(plan.weights_gib - weights_gib) > WEIGHTS_TOLERANCE_GIB:
        raise fail(f"weights_gib {plan.weights_gib} is not {quant.branch}'s {weights_gib:.2f}")
    try:
        mode = parse_cache_mode(plan.cache_mode)
    except BadInput:
        raise fail(f"cache_mode {plan.cache_mode!r} is not a TabbyAPI cache mode") from None
    if mode.label != plan.cache_mode:
        raise fail(f"cache_mode {plan.cache_mode!r} is not in TabbyAPI's spelling {mode.label!r}")
    maximum = profile.architecture.max_position_embeddings
    if not 1 <= plan.context <= maximum:
        raise fail(f"context {plan.context} is outside 1..{maximum}")
    if not plan.context <= plan.max_context <= maximum:
        raise fail(f"max_context {plan.max_context} is outside {plan.context}..{maximum}")
    if (
        plan.cache_size % CACHE_PAGE_TOKENS
        or not plan.context <= plan.cache_size < plan.context + CACHE_PAGE_TOKENS
    ):
        raise fail(
            f"cache_size {plan.cache_size} is not context {plan.context} rounded up to {CACHE_PAGE_TOKENS}"
        )
    if not 1 <= plan.chunk_size <= 1 << 20 or plan.headroom_mib < 0:
        raise fail(f"chunk_size {plan.chunk_size} or headroom_mib {plan.headroom_mib} is out of range")
    _check_split(plan, profile.architecture.num_key_value_heads, fail)
    _check_memory(plan, fail)
    _check_mix(plan, profile, fail)
    return plan


def _check_split(plan: Plan, kv_heads: int, fail: Any) -> None:
    """single on one GPU, tp on 2..KV heads, layer on 2 or more; gpu_split one budget per GPU (layer only)."""
    count = len(plan.per_gpu)
    if plan.split not in SPLITS:
        raise fail(f"split {plan.split!r} is not one of {', '.join(SPLITS)}")
    fits = {"single": count == 1, "tp": 2 <= count <= kv_heads, "layer": count >= 2}[plan.split]
    if not fits:
        raise fail(f"split {plan.split} does not fit {count} planned GPU(s)")
    if plan.gpu_split is not None and (
        len(plan.gpu_split) != count or not all(0 < gb <= 1e4 for gb in plan.gpu_split)
    ):
        raise fail(f"gpu_split {plan.gpu_split} is not one positive budget per planned GPU")


def _check_memory(plan: Plan, fail: Any) -> None:
    """One allocation per distinct GPU of the inventory; none beyond the GPU's usable (<= free <= total) memory."""
    gpus = {gpu.index: gpu for gpu in plan.inventory.gpus}
    seen: set[int] = set()
    for allocation in plan.per_gpu:
        gpu = gpus.get(allocation.index)
        if gpu is None or allocation.index in seen:
            raise fail(f"per_gpu index {allocation.index} is not one of the inventory's GPUs, once each")
        seen.add(allocation.index)
        planned = allocation.weights_mib + allocation.cache_mib + allocation.overhead_mib
        parts = (allocation.weights_mib, allocation.cache_mib, allocation.overhead_mib)
        if allocation.total_mib != gpu.total_mib or not 0 < allocation.usable_mib <= gpu.free_mib:
            raise fail(
                f"GPU {allocation.index}: usable {allocation.usable_mib} MiB is not within its free "
                f"{gpu.free_mib} MiB (total {gpu.total_mib})"
            )
        if min(parts) < 0 or planned > allocation.usable_mib:
            raise fail(
                f"GPU {allocation.index} is planned over its usable memory: {planned} MiB of "
                f"{allocation.usable_mib} MiB"
            )
        if allocation.free_after_mib != allocation.usable_mib - planned:
            raise fail(f"GPU {allocation.index}: free_after_mib does not add up")


def _check_planned_mix(plan: Plan, profile: ModelProfile, fail: Any) -> Quant:
    """The plan's mix as the planner names it (see the module docstring); returns the quant the planner placed."""
    mix = plan.mix
    assert mix is not None
    if profile.mix is None:
        raise fail(f"mix: profile {profile.name} proposes no mixes")
    quants = {q.branch: q for q in profile.quants}
    lower, upper = quants.get(mix.lower), quants.get(mix.upper)
    if lower is None or upper is None or lower.size_gib >= upper.size_gib:
        raise fail(
            f"mix: {mix.lower!r} and {mix.upper!r} are not a smaller and a larger branch of {profile.name}"
        )
    low, high = size_range(profile, lower, upper)
    if not low < mix.target_gib < high or round(mix.target_gib, 2) != mix.target_gib:
        raise fail(
            f"mix.target_gib {mix.target_gib} is not between {lower.branch}'s {low:.2f} and {upper.branch}'s "
            f"{high:.2f} GiB (in hundredths)"
        )
    name = mix_name(mix.lower, mix.upper, mix.target_gib)
    if mix.name != name or plan.quant != name:
        raise fail(f"mix.name {mix.name!r} and quant {plan.quant!r} are not the mix's name {name!r}")
    if plan.mix_proposal is not None:
        raise fail("a plan deploying a mix carries no mix_proposal")
    if not SHA256.fullmatch(mix.recipe_sha256) or not validate.SAFE_NAME.fullmatch(mix.recipe):
        raise fail(f"mix.recipe {mix.recipe!r:.60} or its recipe_sha256 is malformed")
    if recipe_hash(mix.recipe) != mix.recipe_sha256:
        raise fail(f"mix.recipe {mix.recipe} has changed since the plan was made (recipe_sha256 differs)")
    expected = interpolated_kl(lower, upper, mix.target_gib)
    if abs(mix.expected_kl - expected) > KL_TOLERANCE:
        raise fail(f"mix.expected_kl {mix.expected_kl} is not the card-point estimate {expected:.4f}")
    basis = mix.kl_basis
    if not (basis.startswith("estimate:") and lower.branch in basis and upper.branch in basis):
        raise fail("mix.kl_basis does not say the KL is an estimate between the two branches")
    if mix.head_bits != lower.head_bits:
        raise fail(f"mix.head_bits {mix.head_bits} is not {lower.branch}'s {lower.head_bits}")
    wanted = [(q.branch, download_gb(profile, q)) for q in (lower, upper)]
    if [(d.branch, d.gb) for d in mix.downloads] != wanted:
        raise fail(f"mix.downloads is not {wanted}")
    placed = stand_in(profile, MixSpec(mix.lower, mix.upper, mix.target_gib))
    if abs(plan.expected.kl - placed.kl_ref_quant) > 1e-9:
        raise fail(f"expected.kl {plan.expected.kl} is not the mix's estimate {placed.kl_ref_quant}")
    return placed


def _check_mix(plan: Plan, profile: ModelProfile, fail: Any) -> None:
    """A mix proposal mixes the planned quant with a larger branch of the profile, targets a size strictly between
    theirs within its budget and the planned GPUs' memory, and states its KL as the card-point estimate it is."""
    proposal = plan.mix_proposal
    if proposal is None:
        return
    if profile.mix is None:
        raise fail(f"mix_proposal: profile {profile.name} proposes no mixes")
    quants = {q.branch: q for q in profile.quants}
    lower, upper = quants[plan.quant], quants.get(proposal.upper)
    if proposal.lower != plan.quant:
        raise fail(f"mix_proposal.lower {proposal.lower!r} is not the planned quant {plan.quant!r}")
    if upper is None or upper.size_gib <= lower.size_gib:
        raise fail(
            f"mix_proposal.upper {proposal.upper!r} is not a branch of {profile.name} larger than {lower.branch}"
        )
    if not lower.size_gib < proposal.target_gib < upper.size_gib:
        raise fail(
            f"mix_proposal.target_gib {proposal.target_gib} is not between {lower.branch}'s {lower.size_gib:g} and "
            f"{upper.branch}'s {upper.size_gib:g} GiB"
        )
    usable_gib = sum(a.usable_mib for a in plan.per_gpu) / 1024
    if not proposal.target_gib <= proposal.budget_gib <= usable_gib:
        raise fail(
            f"mix_proposal.budget_gib {proposal.budget_gib} is not between the target {proposal.target_gib} and "
            f"the planned GPUs' {usable_gib:.2f} GiB"
        )
    if abs(proposal.free_gib_after - (proposal.budget_gib - proposal.target_gib)) > WEIGHTS_TOLERANCE_GIB:
        raise fail("mix_proposal.free_gib_after is not the budget less the target")
    if not profile.mix.min_gap_gib <= proposal.free_gib_before <= proposal.budget_gib:
        raise fail(
            f"mix_proposal.free_gib_before {proposal.free_gib_before} is below the profile's gap of "
            f"{profile.mix.min_gap_gib:g} GiB or above the budget"
        )
    expected = interpolated_kl(lower, upper, proposal.target_gib)
    if abs(proposal.expected_kl - expected) > KL_TOLERANCE:
        raise fail(
            f"mix_proposal.expected_kl {proposal.expected_kl} is not the card-point estimate {expected:.4f}"
        )
    basis = proposal.kl_basis
    if not (basis.startswith("estimate:") and lower.branch in basis and upper.branch in basis):
        raise fail("mix_proposal.kl_basis does not say the KL is an estimate between the two branches")
    if proposal.head_bits != lower.head_bits:
        raise fail(f"mix_proposal.head_bits {proposal.head_bits} is not {lower.branch}'s {lower.head_bits}")
    wanted = [(q.branch, download_gb(profile, q)) for q in (lower, upper)]
    if [(d.branch, d.gb) for d in proposal.downloads] != wanted:
        raise fail(f"mix_proposal.downloads is not {wanted}")

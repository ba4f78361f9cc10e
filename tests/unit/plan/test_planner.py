"""make_plan: the objective, the cache and split rules, the errors, and the properties users rely on."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.detect.inventory import Gpu, GpuInventory
from toolkit.errors import BadInput, NoFit
from toolkit.facts.profiles import load_profile
from toolkit.facts.tabby_pin import load_tabby_pin
from toolkit.plan import memory
from toolkit.plan.memory import CacheMode
from toolkit.plan.plan import Plan, PlanRequest
from toolkit.plan.planner import CACHE_LADDER, _Search, cache_floor, make_plan

PROFILE = load_profile("glm-4.7")
CACHE_FLOOR = cache_floor(PROFILE)
PIN = load_tabby_pin()
MAX_CONTEXT = PROFILE.architecture.max_position_embeddings
KL = {q.branch: q.kl_ref_quant for q in PROFILE.quants}
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_for(spec: str, **request: object) -> Plan:
    return make_plan(PROFILE, parse_gpu_spec(spec), PlanRequest(**request))  # type: ignore[arg-type]


def inventory_of(free_mib: list[int]) -> GpuInventory:
    gpus = tuple(Gpu(index=i, name="test", total_mib=m, free_mib=m) for i, m in enumerate(free_mib))
    return GpuInventory(gpus=gpus, source="spec")


def quant_or_none(free_mib: list[int], **request: object) -> str | None:
    try:
        return make_plan(PROFILE, inventory_of(free_mib), PlanRequest(**request)).quant  # type: ignore[arg-type]
    except NoFit:
        return None


def usable_of(plan: Plan) -> list[int]:
    return [g.free_mib - plan.headroom_mib for g in plan.inventory.gpus]


def mode_of(plan: Plan) -> memory.CacheMode:
    return memory.parse_cache_mode(plan.cache_mode)


def assert_within_usable(plan: Plan) -> None:
    by_index = {gpu.index: gpu for gpu in plan.inventory.gpus}
    for a in plan.per_gpu:
        assert a.weights_mib + a.cache_mib + a.overhead_mib + a.free_after_mib == a.usable_mib
        assert a.free_after_mib >= 0
        assert a.usable_mib <= by_index[a.index].free_mib


# --- the objective -----------------------------------------------------------------------------------------------


def test_best_quant_that_fits_wins_and_every_better_one_is_short() -> None:
    plan = plan_for("8x24GiB")
    assert plan.context >= PROFILE.serving.default_min_context
    assert_within_usable(plan)
    better = [r for r in plan.rejected if KL[r.quant] < KL[plan.quant]]
    assert better and all(r.short_by_mib > 0 and "needs" in r.reason for r in better)
    worse = [r for r in plan.rejected if KL[r.quant] > KL[plan.quant]]
    assert all(r.short_by_mib == 0 and "KL" in r.reason for r in worse if "fits" in r.reason)
    assert {r.quant for r in plan.rejected} | {plan.quant} == set(KL)


def test_expected_quality_is_the_kl_from_fp16_to_the_quant() -> None:
    plan = plan_for("2xH200")
    quant = PROFILE.quant(plan.quant)
    assert (plan.expected.kl, plan.expected.top1, plan.expected.ppl) == (
        quant.kl_ref_quant,
        quant.top1,
        quant.ppl,
    )


def test_without_a_context_request_the_context_is_the_maximum_that_fits() -> None:
    plan = plan_for("8x24GiB")
    assert plan.context == plan.max_context
    search = _Search(PROFILE, usable_of(plan), ("tp",))
    assert not search.place(PROFILE.quant(plan.quant), mode_of(plan), "tp", plan.cache_size + 256).fits


def test_a_context_request_is_configured_exactly() -> None:
    plan = plan_for("8x24GiB", context=40_000)
    assert plan.context == 40_000
    assert plan.cache_size == 40_192
    assert plan.max_context >= 40_000


def test_context_max_asks_for_the_full_context() -> None:
    plan = plan_for("8xH200", context_max=True)
    assert plan.context == MAX_CONTEXT == plan.max_context
    assert plan.cache_size == MAX_CONTEXT  # 202752 = 792 pages


def test_fixed_quant_maximizes_context() -> None:
    plan = plan_for("8x24GiB", quant="3bpw_H6")
    assert plan.quant == "3bpw_H6"
    assert plan.context == plan.max_context > plan_for("8x24GiB", quant="4bpw_H6").max_context
    assert all("--quant 3bpw_H6" in r.reason for r in plan.rejected if r.short_by_mib == 0)


# --- the cache rule ------------------------------------------------------------------------------------------------


def test_auto_cache_takes_fp16_only_when_it_reaches_the_full_context() -> None:
    roomy = plan_for("8xH200")
    assert roomy.cache_mode == "FP16" and roomy.max_context == MAX_CONTEXT
    tight = plan_for("2xH200")
    assert tight.cache_mode != "FP16"


def test_auto_cache_is_the_highest_mode_that_fits_the_required_context() -> None:
    plan = plan_for("8x24GiB", context=65_536)  # 4bpw_H6 with 6,5: a mode between the floor and 8,8
    mode = mode_of(plan)
    ladder = list(CACHE_LADDER)
    assert ladder.index(CacheMode(8, 8)) < ladder.index(mode) <= ladder.index(CACHE_FLOOR)
    better = ladder[ladder.index(mode) - 1]
    search = _Search(PROFILE, usable_of(plan), ("tp", "layer"))
    assert search.fits(PROFILE.quant(plan.quant), mode, memory.cache_size_tokens(65_536))
    assert not search.fits(PROFILE.quant(plan.quant), better, memory.cache_size_tokens(65_536))


def test_auto_cache_goes_below_5_4_only_when_nothing_fits_otherwise() -> None:
    # 2bpw_H6 at the full context needs ~20 GiB of cache at 4,4: 5,4 cannot hold it on 4 x 32 GiB, 2,2 can
    plan = plan_for("4x27GiB", context_max=True)
    assert CACHE_LADDER.index(mode_of(plan)) > CACHE_LADDER.index(CACHE_FLOOR)
    with pytest.raises(NoFit):
        plan_for("4x27GiB", context_max=True, cache="5,4")


def test_below_the_floor_only_the_smallest_quant_gives_up_cache_bits() -> None:
    # 4 x 26 GiB at 112640 tokens: nothing fits with 5,4; 2.10bpw-tuned would fit with 2,2 but is not traded for
    plan = plan_for("4x26GiB", context=112_640)
    search = _Search(PROFILE, usable_of(plan), ("tp", "layer"))
    tokens = memory.cache_size_tokens(112_640)
    assert not any(search.fits(q, CACHE_FLOOR, tokens) for q in PROFILE.quants)
    smallest = min(PROFILE.quants, key=lambda q: memory.weights_bytes(PROFILE.architecture, q))
    below = CACHE_LADDER[CACHE_LADDER.index(CACHE_FLOOR) + 1 :]
    assert plan.quant == smallest.branch
    assert mode_of(plan) == next(mode for mode in below if search.fits(smallest, mode, tokens))
    assert search.fits(PROFILE.quant("2.10bpw-tuned"), memory.CacheMode(2, 2), tokens)


def test_explicit_cache_mode_is_honoured() -> None:
    for text, label in (("FP16", "FP16"), ("Q8", "8,8"), ("4,3", "4,3")):
        assert plan_for("8x24GiB", cache=text).cache_mode == label


# --- the split rule -----------------------------------------------------------------------------------------------


def test_one_gpu_is_single_without_gpu_split() -> None:
    plan = plan_for("1xH200")
    assert plan.split == "single" and plan.gpu_split is None and len(plan.per_gpu) == 1


def test_layer_split_gives_tabbyapi_a_gib_budget_per_gpu() -> None:
    plan = plan_for("2xH200", split="layer")
    assert plan.split == "layer"
    assert plan.gpu_split is not None and len(plan.gpu_split) == len(plan.per_gpu)
    for budget, a in zip(plan.gpu_split, plan.per_gpu):
        assert (a.weights_mib + a.cache_mib) / 1024 <= budget <= a.usable_mib / 1024


@pytest.mark.parametrize("spec", ["2xH200", "3x80GiB", "4x48GiB", "8x24GiB"])
def test_each_gpu_split_entry_caps_what_torch_holds_on_that_gpu(spec: str) -> None:
    # outside the cap: the CUDA context, plus the spill on GPUs the loader moves past, the margin on the last one
    plan = plan_for(spec, split="layer")
    assert plan.split == "layer" and plan.gpu_split is not None
    terms = PROFILE.memory_overhead
    for position, (budget, a) in enumerate(zip(plan.gpu_split, plan.per_gpu)):
        last = position == len(plan.per_gpu) - 1
        outside = terms.base_mib + (terms.output_gpu_mib if last else terms.layer_spill_mib)
        assert budget == memory.layer_split_gib(a.usable_mib, PROFILE, last=last)
        assert a.weights_mib + a.cache_mib + a.overhead_mib - outside <= budget * 1024
        assert a.overhead_mib == memory.overhead_mib(
            PROFILE, mode_of(plan), plan.chunk_size, holds_output=last, split="layer"
        )


def test_tensor_parallel_has_no_gpu_split_and_uses_every_gpu() -> None:
    plan = plan_for("4xRTX5090", split="tp")
    assert plan.split == "tp" and plan.gpu_split is None and len(plan.per_gpu) == 4


def test_auto_split_takes_the_longer_context_and_tp_on_a_tie() -> None:
    auto = plan_for("2xH200")
    tp = plan_for("2xH200", split="tp")
    layer = plan_for("2xH200", split="layer")
    expected = "tp" if tp.max_context >= layer.max_context else "layer"
    assert (auto.split, auto.max_context) == (expected, max(tp.max_context, layer.max_context))


def test_a_layer_split_that_needs_one_gpu_is_single() -> None:
    plan = plan_for("2xH200", quant="2bpw_H6", context=8192, split="layer")
    assert plan.split == "single" and plan.gpu_split is None and len(plan.per_gpu) == 1


def test_more_gpus_than_kv_heads_fall_back_to_layer_split() -> None:
    plan = plan_for("12x24GiB")
    assert plan.split == "layer"
    with pytest.raises(BadInput, match="KV heads"):
        plan_for("12x24GiB", split="tp")


# --- headroom ------------------------------------------------------------------------------------------------------


def test_default_headroom_is_taken_off_free_memory() -> None:
    plan = plan_for("2xH200")
    assert all(a.usable_mib == a.total_mib - memory.default_headroom_mib(a.total_mib) for a in plan.per_gpu)
    assert plan.headroom_mib == 1438


def test_headroom_override_applies_to_every_gpu() -> None:
    default = plan_for("8x24GiB")
    plan = plan_for("8x24GiB", headroom_mib=1024, quant=default.quant)
    assert plan.headroom_mib == 1024 and all(a.usable_mib == 24_576 - 1024 for a in plan.per_gpu)
    assert plan.max_context < default.max_context


def test_detected_gpus_are_planned_on_free_memory() -> None:
    busy = GpuInventory(
        gpus=(Gpu(index=3, name="H200", total_mib=143_771, free_mib=100_000, used_mib=43_771),), source="nvml"
    )
    plan = make_plan(PROFILE, busy, PlanRequest())
    assert plan.per_gpu[0].index == 3
    assert plan.per_gpu[0].usable_mib == 100_000 - 1438


# --- failures ------------------------------------------------------------------------------------------------------


def test_nothing_fits_names_the_context_that_would_fit_and_it_does() -> None:
    with pytest.raises(NoFit) as caught:
        plan_for("4x24GiB", context_max=True)
    hint = caught.value.hint
    assert "--context" in hint
    tokens = int(hint.rsplit("--context ", 1)[1])
    plan = plan_for("4x24GiB", context=tokens)
    assert plan.quant in hint and plan.context == tokens


def test_the_suggested_context_is_a_useful_one_when_any_quant_reaches_it() -> None:
    # On 4x24GiB the lowest-KL quant that fits at all (2.10bpw-tuned) fits only ~1k tokens; a smaller quant
    # reaches the profile's default minimum, and that is the option worth naming.
    with pytest.raises(NoFit) as caught:
        plan_for("4x24GiB", context_max=True)
    tokens = int(caught.value.hint.rsplit("--context ", 1)[1])
    assert tokens >= PROFILE.serving.default_min_context


def test_nothing_fits_with_an_explicit_cache_names_the_cache_that_would() -> None:
    with pytest.raises(NoFit) as caught:
        plan_for("4x25GiB", cache="FP16", context=65_536)
    hint = caught.value.hint
    assert "--cache" in hint
    cache = hint.rsplit("--cache ", 1)[1]
    assert plan_for("4x25GiB", cache=cache, context=65_536).cache_mode == cache


def test_a_fixed_quant_that_cannot_fit_points_to_one_that_does() -> None:
    with pytest.raises(NoFit) as caught:
        plan_for("4x24GiB", quant="8bpw_H8")
    assert "8bpw_H8" in caught.value.message and "--quant" in caught.value.hint


def test_nothing_fits_on_a_small_gpu_says_how_much_is_missing() -> None:
    with pytest.raises(NoFit) as caught:
        plan_for("1x24GiB")
    assert "2bpw_H6" in caught.value.hint and "needs" in caught.value.hint


@pytest.mark.parametrize(
    ("request_args", "fragment"),
    [
        ({"context": MAX_CONTEXT + 1}, "maximum"),
        ({"context": 0}, "positive"),
        ({"quant": "9bpw"}, "unknown quant"),
        ({"cache": "k5v4"}, "5,4"),
        ({"split": "pipeline"}, "unknown split"),
        ({"headroom_mib": -1}, "negative"),
    ],
)
def test_bad_requests_are_bad_input(request_args: dict[str, object], fragment: str) -> None:
    with pytest.raises(BadInput) as caught:
        plan_for("8x24GiB", **request_args)
    assert fragment in caught.value.line()


def test_split_on_one_gpu_is_bad_input() -> None:
    with pytest.raises(BadInput, match="at least 2 GPUs"):
        plan_for("1xH200", split="tp")


def test_empty_inventory_is_bad_input() -> None:
    with pytest.raises(BadInput):
        make_plan(PROFILE, GpuInventory(gpus=(), source="spec"), PlanRequest())


def test_plan_round_trips_through_json() -> None:
    plan = plan_for("3xRTX5090,1x48GiB", split="layer")
    assert Plan.from_dict(plan.to_dict()) == plan


# --- properties ----------------------------------------------------------------------------------------------------

# Hosts are drawn where something fits, and contexts as a fraction of the longest context anything reaches there,
# so every example gets to the assertion (drawing sizes and contexts blindly made about half of them NoFit).
SMALLEST = min(PROFILE.quants, key=lambda q: memory.weights_bytes(PROFILE.architecture, q))
MAX_GPU_MIB = 150_000


def min_gpu_mib(count: int) -> int:
    """Per-GPU MiB above which `count` equal GPUs hold the smallest quant with 32k tokens (found by bisection
    of make_plan on this profile, rounded up: about 87 GiB of weights and 2.4 GiB of overhead per GPU)."""
    return max(16_000, (87_000 + 2_500 * count) // count + 1)


@st.composite
def hosts(draw: st.DrawFn, min_gpus: int = 1, max_gpus: int = 8, headroom_mib: int = 0) -> list[int]:
    """Free MiB of 1-8 GPUs, each large enough that the smallest quant fits on the set."""
    count = draw(st.integers(min_gpus, max_gpus))
    low = min(MAX_GPU_MIB, min_gpu_mib(count) + headroom_mib)
    return draw(st.lists(st.integers(low, MAX_GPU_MIB), min_size=count, max_size=count))


def reach(sizes: list[int], cache: str = "2,2", split: str = "auto", headroom: int | None = None) -> int:
    """The longest context anything fits with (the smallest quant at that cache mode)."""
    request = PlanRequest(context=1, quant=SMALLEST.branch, cache=cache, split=split, headroom_mib=headroom)
    return make_plan(PROFILE, inventory_of(sizes), request).max_context


def context_within(fraction: float, longest: int) -> int:
    return max(1, min(longest, int(fraction * longest)))


fractions = st.floats(min_value=0.0, max_value=1.0)


@PROPERTY
@given(sizes=hosts(), extra=st.integers(1, 40_000), fraction=fractions)
def test_more_memory_never_yields_a_worse_quant(sizes: list[int], extra: int, fraction: float) -> None:
    uniform = [sizes[0]] * len(sizes)
    context = context_within(fraction, reach(uniform))
    smaller = quant_or_none(uniform, context=context)
    larger = quant_or_none([size + extra for size in uniform], context=context)
    assert smaller is not None and larger is not None and KL[larger] <= KL[smaller]


@PROPERTY
@given(
    sizes=hosts(min_gpus=2, max_gpus=4),
    which=st.integers(0, 3),
    extra=st.integers(1, 40_000),
    fraction=fractions,
)
def test_more_memory_on_one_gpu_never_yields_a_worse_quant(
    sizes: list[int], which: int, extra: int, fraction: float
) -> None:
    grown = list(sizes)
    grown[which % len(sizes)] += extra
    context = context_within(fraction, reach(sizes))
    before, after = quant_or_none(sizes, context=context), quant_or_none(grown, context=context)
    assert before is not None and after is not None and KL[after] <= KL[before]


@PROPERTY
@given(sizes=hosts(), short=fractions, longer=fractions)
def test_a_larger_required_context_never_yields_a_better_quant(
    sizes: list[int], short: float, longer: float
) -> None:
    longest = reach(sizes)
    short_context = context_within(short, longest)
    long_context = context_within(max(short, longer), longest)
    with_short = quant_or_none(sizes, context=short_context)
    with_long = quant_or_none(sizes, context=long_context)
    assert with_short is not None and with_long is not None and KL[with_short] <= KL[with_long]


@st.composite
def plan_requests(draw: st.DrawFn) -> tuple[list[int], PlanRequest]:
    """Any GPUs and request under which something fits (the context is drawn within reach)."""
    headroom = draw(st.one_of(st.none(), st.integers(0, 4096)))
    sizes = draw(hosts(headroom_mib=headroom or 0))
    cache = draw(st.sampled_from(["auto", "FP16", "8,8", "6,5", "5,4", "4,4", "2,2"]))
    split = draw(st.sampled_from(["auto", "tp", "layer"])) if len(sizes) > 1 else "auto"
    longest = reach(sizes, "2,2" if cache == "auto" else cache, split, headroom)
    default_fits = longest >= PROFILE.serving.default_min_context
    context = (
        draw(st.one_of(st.none(), fractions.map(lambda f: context_within(f, longest))))
        if default_fits
        else (context_within(draw(fractions), longest))
    )
    return sizes, PlanRequest(context=context, cache=cache, split=split, headroom_mib=headroom)


@PROPERTY
@given(case=plan_requests())
def test_no_plan_overfills_a_gpu_and_cache_is_whole_pages(case: tuple[list[int], PlanRequest]) -> None:
    sizes, request = case
    plan = make_plan(PROFILE, inventory_of(sizes), request)
    assert_within_usable(plan)
    assert plan.cache_size % 256 == 0 and plan.context <= plan.cache_size < plan.context + 256
    assert plan.context <= plan.max_context <= MAX_CONTEXT
    if request.context is not None:
        assert plan.context == request.context
    if request.cache != "auto":
        assert plan.cache_mode == memory.parse_cache_mode(request.cache).label


def test_every_plan_applies_the_memory_terms_of_its_stacks_exllamav3_version() -> None:
    pinned = PROFILE.calibration_for(PIN.exllamav3)
    assert pinned is not None
    heavier = dataclasses.replace(pinned.terms, base_mib=pinned.terms.base_mib + 1300)
    newer = dataclasses.replace(pinned, exllamav3="1.7.0", terms=heavier)
    profile = dataclasses.replace(PROFILE, calibrations=(pinned, newer))  # loaded: 1.7.0's terms by default
    light_plan = make_plan(profile, parse_gpu_spec("8x24GiB"), PlanRequest())
    heavy_plan = make_plan(profile, parse_gpu_spec("8x24GiB"), PlanRequest(exllamav3="1.7.0"))
    assert (light_plan.stack.calibration, heavy_plan.stack.calibration) == (PIN.exllamav3, "1.7.0")
    assert light_plan.stack.calibrated and heavy_plan.stack.calibrated
    assert light_plan == plan_for("8x24GiB")  # the pinned version's terms, whatever the profile holds besides
    assert heavy_plan.per_gpu[0].overhead_mib - light_plan.per_gpu[0].overhead_mib == 1300
    assert (KL[heavy_plan.quant], -heavy_plan.max_context) >= (KL[light_plan.quant], -light_plan.max_context)


def test_an_uncalibrated_stack_is_refused_unless_allowed_and_then_only_loses() -> None:
    with pytest.raises(BadInput, match="no memory calibration for exllamav3 1.4.2"):
        plan_for("8x24GiB", exllamav3="1.4.2")
    with pytest.raises(BadInput, match="TabbyAPI v1.0 is not the stack"):
        plan_for("8x24GiB", tabby_ref="v1.0")
    calibrated = plan_for("8x24GiB")
    for request in ({"exllamav3": "1.4.2"}, {"tabby_ref": "v1.0"}):
        plan = plan_for("8x24GiB", allow_uncalibrated=True, **request)
        assert not plan.stack.calibrated and plan.stack.calibration == PIN.exllamav3
        assert plan.stack.uncalibrated_margin == PROFILE.uncalibrated_margin
        margin = PROFILE.uncalibrated_margin.mib(plan.inventory.gpus[0].total_mib)
        assert [a.usable_mib for a in plan.per_gpu] == [a.usable_mib - margin for a in calibrated.per_gpu]
        assert (KL[plan.quant], -plan.max_context) >= (KL[calibrated.quant], -calibrated.max_context)
    same = plan_for("8x24GiB", tabby_ref=PIN.ref[:7])  # the pinned commit, abbreviated: calibrated
    assert same.stack.tabbyapi == PIN.ref and same == calibrated

"""The VRAM model against the measured facts (../shared/facts/glm-4.7.md) and exllamav3's placement rules."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolkit.errors import BadInput
from toolkit.facts.profiles import load_profile
from toolkit.plan import memory
from toolkit.plan.memory import FP16, GIB, MIB, CacheMode

PROFILE = load_profile("glm-4.7")
ARCH = PROFILE.architecture
CHUNK = PROFILE.serving.chunk_size


def test_fp16_cache_bytes_per_token_is_the_verified_figure() -> None:
    assert memory.cache_bytes_per_token(ARCH, FP16) == 376_832


@pytest.mark.parametrize(("k", "v"), [(4, 4), (5, 4), (6, 5), (8, 8), (2, 2), (8, 2)])
def test_quantized_cache_bytes_per_token(k: int, v: int) -> None:
    assert memory.cache_bytes_per_token(ARCH, CacheMode(k, v)) == 11_776 * (k + v + 1)


@pytest.mark.parametrize(
    ("mode", "gib"),
    [
        (FP16, 71.2),
        (CacheMode(8, 8), 37.8),
        (CacheMode(6, 5), 26.7),
        (CacheMode(5, 4), 22.2),
        (CacheMode(4, 4), 20.0),
    ],
)
def test_full_context_cache_sizes_match_the_facts(mode: CacheMode, gib: float) -> None:
    assert round(memory.cache_bytes(ARCH, mode, 202_752) / GIB, 1) == gib


def test_tiny_model_measurement_is_reproduced() -> None:
    # exllamav3 1.6.5, 6 layers, 2 KV heads x 128: 1728 / 1920 / 2304 / 3264 B/token for 4,4 / 5,4 / 6,5 / 8,8
    tiny = dataclasses.replace(ARCH, num_hidden_layers=6, num_key_value_heads=2)
    measured = {(4, 4): 1728, (5, 4): 1920, (6, 5): 2304, (8, 8): 3264}
    for (k, v), per_token in measured.items():
        assert memory.cache_bytes(tiny, CacheMode(k, v), 256) == per_token * 256


@pytest.mark.parametrize("quant", PROFILE.quants, ids=lambda q: q.branch)
def test_weights_reproduce_the_card_sizes(quant) -> None:
    assert abs(memory.weights_bytes(ARCH, quant) / GIB - quant.size_gib) < 1.0  # the card prints whole GiB


@pytest.mark.parametrize("quant", PROFILE.quants, ids=lambda q: q.branch)
def test_block_decomposition_adds_up_to_the_weights(quant) -> None:
    blocks = memory.layer_weights(ARCH, quant)
    assert len(blocks) == ARCH.num_hidden_layers
    total = sum(b.attention_bytes + b.mlp_bytes + b.shared_bytes for b in blocks) + memory.head_bytes(
        ARCH, quant
    )
    assert abs(total - memory.weights_bytes(ARCH, quant)) < 1024


def test_routed_experts_dominate_as_on_the_card() -> None:
    blocks = memory.layer_weights(ARCH, PROFILE.quant("4bpw_H6"))
    routed = sum(b.mlp_bytes for b in blocks[ARCH.first_k_dense_replace :])
    attention = sum(b.attention_bytes for b in blocks)
    linear = sum(b.attention_bytes + b.mlp_bytes + b.shared_bytes for b in blocks)
    assert round(routed / linear, 3) == pytest.approx(0.956, abs=0.002)  # 95.2 % of all weights incl. head
    assert round(attention / linear, 3) == pytest.approx(0.036, abs=0.001)


@given(st.integers(min_value=1, max_value=1_000_000))
def test_cache_size_is_the_next_multiple_of_256(context: int) -> None:
    size = memory.cache_size_tokens(context)
    assert size % 256 == 0 and context <= size < context + 256


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("FP16", "FP16"),
        ("fp16", "FP16"),
        ("Q4", "4,4"),
        ("q6", "6,6"),
        ("Q8", "8,8"),
        ("6,5", "6,5"),
        (" 5, 4 ", "5,4"),
        ("4,6", "4,6"),
    ],
)
def test_cache_modes_are_parsed_into_tabbyapi_spelling(text: str, label: str) -> None:
    assert memory.parse_cache_mode(text).label == label


def test_card_spelling_is_rejected_with_the_tabbyapi_spelling() -> None:
    with pytest.raises(BadInput) as caught:
        memory.parse_cache_mode("k5v4")
    assert "5,4" in caught.value.line()


@pytest.mark.parametrize("text", ["9,4", "1,1", "6", "6,5,4", "Q5", "int8", ""])
def test_bad_cache_modes_are_bad_input(text: str) -> None:
    with pytest.raises(BadInput):
        memory.parse_cache_mode(text)


def test_overhead_terms_each_apply_where_they_belong() -> None:
    terms = dataclasses.replace(
        PROFILE.memory_overhead,
        base_mib=500,
        resident_mib=30,
        chunk_mib_per_token=0.25,
        quant_cache_staging_mib=100,
        output_gpu_mib=40,
        tensor_parallel_mib=7,
        layer_spill_mib=900,
    )
    profile = dataclasses.replace(PROFILE, memory_overhead=terms)
    assert memory.overhead_mib(profile, FP16, 2048, holds_output=False) == 530 + 512
    assert memory.overhead_mib(profile, CacheMode(6, 5), 2048, holds_output=False) == 530 + 512 + 100
    assert memory.overhead_mib(profile, CacheMode(6, 5), 2048, holds_output=True) == 530 + 512 + 100 + 40
    assert memory.overhead_mib(profile, FP16, 1024, holds_output=True) == 530 + 256 + 40
    # tensor parallel: its own term on every GPU, no output term
    for holds_output in (False, True):
        assert memory.overhead_mib(profile, FP16, 2048, holds_output, split="tp") == 530 + 512 + 7
    # layer split: the spill on every GPU the loader moved past; the last GPU (the lm_head's) the output margin
    assert memory.overhead_mib(profile, FP16, 2048, holds_output=False, split="layer") == 530 + 512 + 900
    assert memory.overhead_mib(profile, FP16, 2048, holds_output=True, split="layer") == 530 + 512 + 40


@pytest.mark.parametrize(("total", "headroom"), [(24_576, 256), (32_607, 327), (143_771, 1438), (8_000, 256)])
def test_default_headroom_is_256_mib_or_one_percent(total: int, headroom: int) -> None:
    assert memory.default_headroom_mib(total) == headroom


def test_gpu_split_entry_is_the_torch_budget_in_gib_floored() -> None:
    base = PROFILE.memory_overhead.base_mib + PROFILE.memory_overhead.layer_spill_mib  # both outside the cap
    usable = 24_320
    entry = memory.layer_split_gib(usable, PROFILE)
    assert entry == int((usable - base) * 100 / 1024) / 100
    granted = memory.layer_split_usable_mib(usable, PROFILE)
    assert usable - 11 <= granted <= usable


def test_last_gpu_split_entry_keeps_only_the_context_and_the_output_margin_outside() -> None:
    terms = PROFILE.memory_overhead
    usable = 24_320
    entry = memory.layer_split_gib(usable, PROFILE, last=True)
    assert entry == int((usable - terms.base_mib - terms.output_gpu_mib) * 100 / 1024) / 100
    assert entry > memory.layer_split_gib(usable, PROFILE)  # no spill on the last GPU
    granted = memory.layer_split_usable_mib(usable, PROFILE, last=True)
    assert usable - 11 <= granted <= usable


def _check_fits(placement: memory.Placement) -> None:
    assert placement.fits
    assert all(load.free_after_mib >= 0 for load in placement.loads)


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_tensor_parallel_on_even_head_counts_splits_evenly(gpus: int) -> None:
    quant = PROFILE.quant("2bpw_H6")
    placement = memory.place_tensor_parallel(PROFILE, quant, CacheMode(6, 5), 65_536, [100_000] * gpus, CHUNK)
    _check_fits(placement)
    weights = [load.weights_mib for load in placement.loads]
    caches = [load.cache_mib for load in placement.loads]
    assert max(weights) - min(weights) <= 2
    assert max(caches) - min(caches) <= 1
    assert sum(caches) == pytest.approx(memory.cache_bytes(ARCH, CacheMode(6, 5), 65_536) / MIB, abs=gpus)
    assert sum(weights) == pytest.approx(memory.weights_bytes(ARCH, quant) / MIB, abs=gpus)


@pytest.mark.parametrize("gpus", [3, 5, 6, 7])
def test_tensor_parallel_evens_out_uneven_head_counts_over_the_layers(gpus: int) -> None:
    # 8 KV heads on 3 GPUs is 3/3/2 per layer; exllamav3 gives the GPU with fewer heads more experts.
    quant = PROFILE.quant("3bpw_H6")
    placement = memory.place_tensor_parallel(PROFILE, quant, CacheMode(5, 4), 32_768, [60_000] * gpus, CHUNK)
    totals = [load.weights_mib + load.cache_mib for load in placement.loads]
    per_head_layer = (
        memory.layer_weights(ARCH, quant)[-1].attention_bytes
        + memory.cache_bytes(ARCH, CacheMode(5, 4), 32_768, layers=1)
    ) / ARCH.num_key_value_heads
    assert max(totals) - min(totals) <= 2 * per_head_layer / MIB + 2
    caches = [load.cache_mib for load in placement.loads]
    assert max(caches) > min(caches)  # the KV heads themselves do not divide evenly


def test_tensor_parallel_splits_by_free_memory_on_mixed_gpus() -> None:
    placement = memory.place_tensor_parallel(
        PROFILE, PROFILE.quant("2bpw_H6"), CacheMode(5, 4), 32_768, [24_000, 24_000, 48_000], CHUNK
    )
    _check_fits(placement)
    small, _, large = (load.weights_mib for load in placement.loads)
    assert 1.8 < large / small < 2.2


def test_tensor_parallel_reports_the_total_shortfall() -> None:
    quant = PROFILE.quant("4bpw_H6")
    placement = memory.place_tensor_parallel(PROFILE, quant, CacheMode(5, 4), 32_768, [20_000] * 4, CHUNK)
    assert not placement.fits
    assert placement.short_by_mib == placement.need_mib - placement.has_mib
    assert placement.need_mib > memory.weights_bytes(ARCH, quant) / MIB


def test_layer_split_fills_gpus_in_order_and_puts_the_head_last() -> None:
    quant = PROFILE.quant("3bpw_H6")
    mode = CacheMode(6, 5)
    placement = memory.place_layers(PROFILE, quant, mode, 65_536, [40_000] * 4, CHUNK)
    _check_fits(placement)
    assert [load.index for load in placement.loads] == list(range(len(placement.loads)))
    block = memory.layer_weights(ARCH, quant)[-1]
    block_mib = (
        block.attention_bytes
        + block.mlp_bytes
        + block.shared_bytes
        + memory.cache_bytes(ARCH, mode, 65_536, layers=1)
    ) / MIB
    for load in placement.loads[:-1]:
        assert load.free_after_mib < block_mib  # a GPU is only left when the next block does not fit
    head_extra = memory.overhead_mib(PROFILE, mode, CHUNK, True, split="layer") - memory.overhead_mib(
        PROFILE, mode, CHUNK, False, split="layer"
    )
    assert placement.loads[-1].overhead_mib == placement.loads[0].overhead_mib + head_extra


def test_layer_split_uses_only_the_gpus_it_needs() -> None:
    placement = memory.place_layers(
        PROFILE, PROFILE.quant("2bpw_H6"), CacheMode(5, 4), 4096, [143_000] * 3, CHUNK
    )
    _check_fits(placement)
    assert len(placement.loads) == 1


def test_layer_split_shortfall_is_what_did_not_fit() -> None:
    quant = PROFILE.quant("8bpw_H8")
    placement = memory.place_layers(PROFILE, quant, CacheMode(5, 4), 32_768, [80_000] * 2, CHUNK)
    assert not placement.fits
    placed = sum(load.weights_mib + load.cache_mib for load in placement.loads)
    total = (memory.weights_bytes(ARCH, quant) + memory.cache_bytes(ARCH, CacheMode(5, 4), 32_768)) / MIB
    assert placement.short_by_mib == pytest.approx(total - placed, abs=4)


def _layer_overheads(mode: CacheMode) -> tuple[int, int]:
    inner = memory.overhead_mib(PROFILE, mode, CHUNK, holds_output=False, split="layer")
    last = memory.overhead_mib(PROFILE, mode, CHUNK, holds_output=True, split="layer")
    return inner, last


def test_layer_split_charges_the_spill_on_every_gpu_but_the_last() -> None:
    # exllamav3 leaves a failed module attempt only on GPUs it moved past (memory_calibration/RESULTS.md)
    mode = CacheMode(5, 4)
    placement = memory.place_layers(PROFILE, PROFILE.quant("3bpw_H6"), mode, 65_536, [40_000] * 4, CHUNK)
    _check_fits(placement)
    inner, last = _layer_overheads(mode)
    terms = PROFILE.memory_overhead
    assert last == math.ceil(
        terms.base_mib
        + terms.resident_mib
        + terms.chunk_mib_per_token * CHUNK
        + terms.quant_cache_staging_mib
        + terms.output_gpu_mib
    )
    assert [load.overhead_mib for load in placement.loads] == [inner] * (len(placement.loads) - 1) + [last]
    assert placement.loads[-1].usable_mib == memory.layer_split_usable_mib(40_000, PROFILE, last=True)
    assert all(
        load.usable_mib == memory.layer_split_usable_mib(40_000, PROFILE) for load in placement.loads[:-1]
    )


@given(st.integers(min_value=20_000, max_value=60_000))
def test_the_last_gpu_is_filled_to_its_usable_memory_less_the_no_spill_overhead(first_mib: int) -> None:
    # the smallest second GPU that completes the split has no room for a spill left over
    quant, mode, tokens = PROFILE.quant("2bpw_H6"), CacheMode(5, 4), 32_768
    _, last = _layer_overheads(mode)

    def fits(second_mib: int) -> bool:
        return memory.place_layers(PROFILE, quant, mode, tokens, [first_mib, second_mib], CHUNK).fits

    low, high = 1, 200_000
    assert fits(high)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    placement = memory.place_layers(PROFILE, quant, mode, tokens, [first_mib, low], CHUNK)
    *_, final = placement.loads
    assert final.index == 1 and final.overhead_mib == last
    assert (
        0 <= low - (final.weights_mib + final.cache_mib + last) <= 11
    )  # gpu_split rounds down by < 0.01 GiB


def test_a_gpu_that_takes_every_remaining_module_is_the_last_one() -> None:
    # GPU 1 could hold the rest only without the spill: it is the last GPU, GPU 2 stays unused
    quant, mode, tokens = PROFILE.quant("2bpw_H6"), CacheMode(5, 4), 32_768
    inner, last = _layer_overheads(mode)
    first, rest = memory.place_layers(PROFILE, quant, mode, tokens, [40_000, 200_000], CHUNK).loads
    second = rest.weights_mib + rest.cache_mib + last + 11 + (inner - last) // 2  # too small for a spill
    placement = memory.place_layers(PROFILE, quant, mode, tokens, [40_000, second, 200_000], CHUNK)
    _check_fits(placement)
    assert [load.index for load in placement.loads] == [0, 1]
    assert placement.loads[0] == first and placement.loads[1].overhead_mib == last

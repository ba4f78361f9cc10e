"""The batch-1 decode bound: bytes read per token from the profile, over datasheet bandwidth, in sequence for a
layer split and in parallel for tensor parallel; no number where a GPU's bandwidth is unknown."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import BadInput
from toolkit.facts.gpu_cards import card_bandwidth_gb_s, parse_bandwidth_table
from toolkit.facts.profiles import load_profile
from toolkit.plan.bandwidth import candidate_bounds, decode_bound, module_read_bytes
from toolkit.plan.memory import cache_bytes_per_token, parse_cache_mode
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import plan_with_details

PROFILE = load_profile("glm-4.7")
ARCH = PROFILE.architecture
MIB = 2**20


def bounds(spec: str, request: PlanRequest | None = None):
    inventory = parse_gpu_spec(spec)
    plan, details = plan_with_details(PROFILE, inventory, request or PlanRequest())
    return plan, details, candidate_bounds(PROFILE, inventory, details.candidates)


def test_bytes_per_token_match_the_slice_read_from_its_files():
    # benchmarks/serving_speed/RESULTS.md, from the safetensors headers of a GLM-4.7-shaped slice at 4 bpw, head 6
    # bits: a MoE layer reads 168.3 MiB per token (attention 65.1, router 1.6 in FP16, shared expert 11.3, 8/160 of
    # 1806 routed), a dense layer 155.2, the head 555.3; 15.62 GiB for GLM-4.7's 3 dense + 89 MoE layers.
    reads = module_read_bytes(ARCH, PROFILE.quant("4bpw_H6"))
    assert len(reads) == ARCH.num_hidden_layers + 1
    assert reads[0] / MIB == pytest.approx(155.2, rel=0.01)  # dense (first_k_dense_replace = 3)
    assert reads[3] / MIB == pytest.approx(168.3, rel=0.02)  # MoE: the profile counts the router at 4 bits
    assert reads[-1] / MIB == pytest.approx(555.3, rel=0.005)
    assert sum(reads) / 2**30 == pytest.approx(15.62, rel=0.01)
    assert sum(reads) < 0.1 * (ARCH.linear_params * 4 / 8)  # ~32B of 355B parameters are active


def test_one_gpu_reads_weights_and_the_whole_cache_at_its_datasheet_bandwidth():
    plan, _, (bound, *_) = bounds("H200")
    mode = parse_cache_mode(plan.cache_mode)
    assert (bound.quant, bound.split, bound.context) == (plan.quant, "single", plan.context)
    assert bound.cache_bytes_per_token == pytest.approx(
        cache_bytes_per_token(ARCH, mode) * plan.context, rel=1e-6
    )
    weights = sum(module_read_bytes(ARCH, PROFILE.quant(plan.quant)))
    assert bound.weights_bytes_per_token == weights
    assert bound.tokens_per_s == pytest.approx(4800e9 / (weights + bound.cache_bytes_per_token))


def test_tensor_parallel_reads_in_parallel_and_a_layer_split_in_sequence():
    request = {"quant": "2.10bpw-tuned", "context": 32768, "cache": "5,4"}
    _, _, (tp, *_) = bounds("8xRTX4090", PlanRequest(split="tp", **request))
    _, _, (layer, *_) = bounds("8xRTX4090", PlanRequest(split="layer", **request))
    _, _, (single, *_) = bounds("RTXPRO6000", PlanRequest(**request))
    total = layer.weights_bytes_per_token + layer.cache_bytes_per_token
    assert (tp.split, layer.split, single.split) == ("tp", "layer", "single")
    assert tp.weights_bytes_per_token == layer.weights_bytes_per_token == single.weights_bytes_per_token
    assert layer.tokens_per_s == pytest.approx(1008e9 / total, rel=1e-6)  # 8 x 1008 GB/s one after another
    assert 7 < tp.tokens_per_s / layer.tokens_per_s <= 8 * (1 + 1e-12)  # at once; the slowest share decides
    assert single.tokens_per_s == pytest.approx(1792e9 / total, rel=1e-6)


def test_unknown_bandwidth_gives_no_number():
    _, _, found = bounds("8x24GiB")
    assert found and all(b.tokens_per_s is None and "unknown bandwidth" in b.unknown for b in found)
    _, _, mixed = bounds("4xRTX4090,4x24GiB", PlanRequest(split="layer"))
    assert all(b.tokens_per_s is None for b in mixed)


def test_every_fitting_candidate_gets_a_bound_and_the_plan_comes_first():
    plan, details, found = bounds("2xH200")
    rejected_fits = {r.quant for r in plan.rejected if r.short_by_mib == 0}
    assert [b.quant for b in found] == [plan.quant] + [c.quant.branch for c in details.candidates[1:]]
    assert {b.quant for b in found[1:]} == rejected_fits
    assert all(b.tokens_per_s and b.tokens_per_s > 0 for b in found)
    singles = sorted((b for b in found[1:] if b.split == "single"), key=lambda b: b.weights_bytes_per_token)
    assert len(singles) > 1 and [b.tokens_per_s for b in singles] == sorted(
        (b.tokens_per_s for b in singles), reverse=True
    ), "same GPU, same context: fewer bytes, faster bound"


@pytest.mark.parametrize(
    ("name", "total_mib", "gb_s"),
    [
        ("NVIDIA H200", 143771, 4800),
        ("NVIDIA GeForce RTX 4090", 24564, 1008),
        ("NVIDIA GeForce RTX 3090 Ti", 24564, 1008),  # the longest card name wins over RTX3090
        ("NVIDIA H100 80GB HBM3", 81559, 3350),
        ("NVIDIA H100 PCIe", 81559, 2000),
        ("NVIDIA A100 80GB PCIe", 81920, 1935),
        ("NVIDIA A100-SXM4-40GB", 40960, None),  # an A100, but not the 80 GB card of the table
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 97887, 1792),
        ("NVIDIA RTX 6000 Ada Generation", 49140, 960),
        ("RTX5090", 32607, 1792),  # a --gpus card name
        ("24GiB", 24576, None),  # a --gpus size: no card
    ],
)
def test_card_bandwidth_from_nvml_names_and_specs(name, total_mib, gb_s):
    assert card_bandwidth_gb_s(name, total_mib) == gb_s


def test_a_shorter_context_reads_less_cache_so_its_bound_is_higher():
    inventory = parse_gpu_spec("H200")
    _, details = plan_with_details(PROFILE, inventory, PlanRequest())
    planned = details.candidates[0]
    at_plan = candidate_bounds(PROFILE, inventory, [planned])[0]
    short = decode_bound(PROFILE, inventory, planned.quant, planned.mode, 1024, planned.placement)
    assert short.weights_bytes_per_token == at_plan.weights_bytes_per_token
    assert (
        short.cache_bytes_per_token < at_plan.cache_bytes_per_token
        and short.tokens_per_s > at_plan.tokens_per_s
    )


@pytest.mark.parametrize("table", [{}, {"bandwidth_gb_s": {"H200": "fast"}}, {"bandwidth_gb_s": {"H200": 0}}])
def test_a_broken_bandwidth_table_names_the_field(table):
    with pytest.raises(BadInput) as caught:
        parse_bandwidth_table({"gpus": {"H200": 143771}, **table}, Path("/x/gpus.yaml"))
    assert "/x/gpus.yaml" in caught.value.line() and "bandwidth_gb_s" in caught.value.line()

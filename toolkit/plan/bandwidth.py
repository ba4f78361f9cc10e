"""An upper bound on batch-1 decode speed from first principles: bytes read per generated token over bandwidth.

Each generated token reads, once, the weights its forward pass touches -- in every block the attention; in a dense
block the whole MLP; in a MoE block the shared experts, the router and num_experts_per_tok of the n_routed_experts
routed experts; then the lm_head -- at the quant's bits (the memory model's decomposition, memory.layer_weights),
plus the whole KV cache at the planned context. A layer split reads its GPUs one after another (time = the sum
over GPUs of their bytes over their bandwidth); tensor parallel reads them at once (time = the slowest GPU's
share). Bandwidths are the cards' datasheet numbers (profiles/gpus.yaml). Nothing else is counted: no compute, no
kernel launches, no routing, no communication, no sampling, so real decode is slower -- on one H200, batch-1 decode
of a GLM-4.7-shaped MoE layer reached ~10 % of this bound (benchmarks/serving_speed/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..detect.inventory import GpuInventory
from ..facts.gpu_cards import card_bandwidth_gb_s
from ..facts.profiles import Architecture, ModelProfile, Quant
from .memory import CacheMode, Placement, cache_bytes, head_bytes, layer_weights
from .planner import Candidate

ASSUMPTIONS = (
    "upper bound on batch-1 decode: active weights (attention, shared expert, the routed experts a token uses, "
    "dense layers, lm_head at the quant's bits) + the whole KV cache at the context, read once per token at the "
    "cards' datasheet bandwidth; layer split reads GPUs in turn, tensor parallel at once; no compute, launch or "
    "communication time (measured on one H200: ~10 % of it per MoE layer, benchmarks/serving_speed)"
)


@dataclass(frozen=True)
class DecodeBound:
    """The bound for one candidate (quant, cache mode, split, context on these GPUs)."""

    quant: str
    split: str
    cache_mode: str
    context: int
    weights_bytes_per_token: int
    cache_bytes_per_token: int
    tokens_per_s: float | None  # None when a GPU's bandwidth is unknown
    unknown: str | None = None  # why there is no bound

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def module_read_bytes(arch: Architecture, quant: Quant) -> tuple[int, ...]:
    """Weight bytes a generated token reads in each module, in load order: the blocks, then the lm_head."""
    reads = []
    expert_params = 3 * arch.hidden_size * arch.moe_intermediate_size
    routed_params = arch.n_routed_experts * expert_params
    router_params = arch.hidden_size * arch.n_routed_experts
    for block in layer_weights(arch, quant):
        if block.shared_bytes:  # a MoE block: mlp_bytes holds the routed experts and the router at one scale
            bytes_per_param = block.mlp_bytes / (routed_params + router_params)
            used = router_params + routed_params * arch.num_experts_per_tok / arch.n_routed_experts
            reads.append(block.attention_bytes + block.shared_bytes + round(used * bytes_per_param))
        else:
            reads.append(block.attention_bytes + block.mlp_bytes)
    reads.append(head_bytes(arch, quant))
    return tuple(reads)


def _effective_split(placement: Placement) -> str:
    return "single" if placement.split == "layer" and len(placement.loads) == 1 else placement.split


def decode_bound(
    profile: ModelProfile,
    inventory: GpuInventory,
    quant: Quant,
    mode: CacheMode,
    context: int,
    placement: Placement,
) -> DecodeBound:
    """The batch-1 decode bound of a placement that fits (placement.loads index the inventory's GPUs)."""
    arch = profile.architecture
    reads = module_read_bytes(arch, quant)
    layer_cache = cache_bytes(arch, mode, context, layers=1)
    total_cache = layer_cache * arch.num_hidden_layers
    split = _effective_split(placement)
    bound = DecodeBound(quant.branch, split, mode.label, context, sum(reads), total_cache, None)
    gpus = [inventory.gpus[load.index] for load in placement.loads]
    bandwidths = [card_bandwidth_gb_s(gpu.name, gpu.total_mib) for gpu in gpus]
    missing = [gpu for gpu, bandwidth in zip(gpus, bandwidths) if bandwidth is None]
    if missing:
        what = missing[0].name if missing[0].name[:1].isalpha() else f"given as {missing[0].name}"
        return DecodeBound(
            **{**asdict(bound), "unknown": f"unknown bandwidth (GPU {missing[0].index}: {what})"}
        )
    seconds = _seconds(placement, reads, layer_cache, total_cache, [b * 1e9 for b in bandwidths if b])
    return DecodeBound(**{**asdict(bound), "tokens_per_s": 1.0 / seconds})


def _seconds(
    placement: Placement,
    reads: Sequence[int],
    layer_cache: int,
    total_cache: int,
    bytes_per_s: Sequence[float],
) -> float:
    """Time per token: layer split sums the GPUs' read times, tensor parallel takes the slowest GPU's."""
    blocks = len(reads) - 1  # the last module is the lm_head, which has no cache
    if placement.split == "tp":
        weights = sum(load.weights_mib for load in placement.loads) or 1
        cache = sum(load.cache_mib for load in placement.loads) or 1
        return max(
            (sum(reads) * load.weights_mib / weights + total_cache * load.cache_mib / cache) / speed
            for load, speed in zip(placement.loads, bytes_per_s)
        )
    return sum(
        sum(reads[m] + (layer_cache if m < blocks else 0) for m in load.modules) / speed
        for load, speed in zip(placement.loads, bytes_per_s)
    )


def candidate_bounds(
    profile: ModelProfile, inventory: GpuInventory, candidates: Sequence[Candidate]
) -> tuple[DecodeBound, ...]:
    """The bound of every candidate that fits: the plan's (at its context) and the other quants' (at the mode
    quants are compared at and the required context)."""
    return tuple(
        decode_bound(profile, inventory, c.quant, c.mode, c.context, c.placement) for c in candidates
    )


def bounds_dict(bounds: Sequence[DecodeBound]) -> dict[str, Any]:
    """The JSON form: what the number is, its assumptions, one entry per candidate that fits."""
    return {
        "label": "upper bound on batch-1 decode tokens/s (bytes read per token / memory bandwidth)",
        "assumptions": ASSUMPTIONS,
        "candidates": [bound.to_dict() for bound in bounds],
    }

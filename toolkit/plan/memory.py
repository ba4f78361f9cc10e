"""The VRAM model of an exllamav3 load: weights, KV cache, per-GPU overhead, and where each piece lands.

Facts and formulas: ../shared/facts/glm-4.7.md and exllamav3.md.

- Weights in VRAM = every quantized linear's trellis (bpw / 8 bytes per weight) and what exllamav3 stores beside it
  (scales, biases, multipliers, the FP16 router, norms) + the lm_head: layer_weights / head_bytes, exact.
  The embedding stays in system RAM. A bpw is assumed uniform over the linears of a quant (the tuned quants put
  attention and shared experts at higher bits; their total is right, only the TP split of it shifts slightly).
- KV cache of `cache_tokens` (a multiple of 256, the page size): FP16 = layers * kv_heads * head_dim * 4 bytes per
  token; quantized K at k bits and V at v bits = layers * kv_heads * head_dim * (k + v + 1) / 8 bytes per token.
- Per-GPU overhead (CUDA context, chunk-size transient, quantized-cache staging, output logits): one function,
  overhead_mib(), from the profile's memory_overhead terms, which benchmarks/memory_calibration fits on real loads.
- Tensor parallel follows exllamav3's TPAllocator (model/model_tp_alloc.py): component by component (attention
  with its cache slice by KV head, routed experts + router by expert, dense and shared MLPs by 128-wide channel,
  the lm_head by 128-wide vocabulary channel, split across all GPUs), each component is split in proportion to the
  memory still free on each GPU. So a GPU that got 3 of 8 heads gets fewer experts in the same layer, and uneven
  head counts (3, 5, 6, 7 GPUs) even out over the layers instead of the heaviest GPU deciding.
- Layer split follows exllamav3's autosplit loader (model/model_ls.py): blocks in order (each block's cache goes
  with it), GPU by GPU, a GPU taking blocks until the next one would exceed its gpu_split budget; the lm_head is the
  last module, so it lands on the last GPU used. A GPU the loader moved past keeps the failed attempt allocated
  (layer_spill_mib); the last GPU has no failed attempt and carries the output overhead instead, so a GPU that can
  take every remaining module with that smaller overhead is the last one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..errors import BadInput
from ..facts.profiles import Architecture, ModelProfile, Quant
from ..facts.runtime import CACHE_PAGE_TOKENS

MIB = 2**20
GIB = 2**30
MIN_HEADROOM_MIB = 256  # default headroom: max(256 MiB, 1 % of the GPU's total memory)
HEADROOM_FRACTION = 0.01
CHANNEL_WIDTH = 128  # exllamav3 splits Linear outputs in 128-wide channels for TP


@dataclass(frozen=True)
class CacheMode:
    """A KV-cache mode: FP16 (k_bits = v_bits = 16) or quantized K/V bit widths 2..8."""

    k_bits: int
    v_bits: int

    @property
    def quantized(self) -> bool:
        """FP16 needs no staging scratch; quantized modes do."""
        return self.k_bits < 16

    @property
    def label(self) -> str:
        """TabbyAPI's spelling: "FP16" or "k,v"."""
        return "FP16" if not self.quantized else f"{self.k_bits},{self.v_bits}"

    @property
    def bits_per_pair(self) -> int:
        """Bits stored per (K, V) element pair: 32 for FP16, k + v + 1 quantized (one FP16 scale per 32 values)."""
        return 32 if not self.quantized else self.k_bits + self.v_bits + 1


FP16 = CacheMode(16, 16)
_ALIASES = {"FP16": FP16, "Q4": CacheMode(4, 4), "Q6": CacheMode(6, 6), "Q8": CacheMode(8, 8)}


CACHE_MODE_CHARS = frozenset("0123456789, ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def parse_cache_mode(text: str) -> CacheMode:
    """Accept what TabbyAPI accepts: "FP16", "k,v" (integers 2..8) and the aliases Q4/Q6/Q8 (spaces ignored; any
    other whitespace, such as a trailing newline, is refused)."""
    if not isinstance(text, str) or not set(text) <= CACHE_MODE_CHARS:
        raise BadInput(f"unknown cache mode {text!r}", "use auto, FP16, Q4, Q6, Q8 or K,V bits such as 6,5")
    cleaned = text.upper().replace(" ", "")
    if cleaned in _ALIASES:
        return _ALIASES[cleaned]
    parts = cleaned.split(",")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        k_bits, v_bits = int(parts[0]), int(parts[1])
        if 2 <= k_bits <= 8 and 2 <= v_bits <= 8:
            return CacheMode(k_bits, v_bits)
        raise BadInput(f"cache mode {text!r}: K and V bits must be between 2 and 8", "e.g. --cache 6,5")
    card_style = cleaned.replace("K", "", 1).split("V") if cleaned.startswith("K") else []
    if len(card_style) == 2 and all(p.isdigit() for p in card_style):
        raise BadInput(
            f"cache mode {text!r} is the model card's spelling",
            f"TabbyAPI writes it --cache {card_style[0]},{card_style[1]}",
        )
    raise BadInput(f"unknown cache mode {text!r}", "use auto, FP16, Q4, Q6, Q8 or K,V bits such as 6,5")


def cache_size_tokens(context_tokens: int) -> int:
    """TabbyAPI cache_size for a context: rounded up to a multiple of the 256-token page."""
    return -(-context_tokens // CACHE_PAGE_TOKENS) * CACHE_PAGE_TOKENS


def cache_bytes(
    arch: Architecture,
    mode: CacheMode,
    cache_tokens: int,
    kv_heads: int | None = None,
    layers: int | None = None,
) -> int:
    """KV-cache bytes for cache_tokens, for all layers and heads unless told fewer."""
    heads = arch.num_key_value_heads if kv_heads is None else kv_heads
    layer_count = arch.num_hidden_layers if layers is None else layers
    return cache_tokens * layer_count * heads * arch.head_dim * mode.bits_per_pair // 8


def cache_bytes_per_token(arch: Architecture, mode: CacheMode) -> float:
    """Bytes per token of context (376,832 for GLM-4.7 at FP16; 11,776 * (k + v + 1) quantized)."""
    return arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * mode.bits_per_pair / 8


def weights_bytes(arch: Architecture, quant: Quant) -> int:
    """VRAM weights of a quant: every layer's stored tensors plus the lm_head (the embedding stays in RAM)."""
    blocks = layer_weights(arch, quant)
    return sum(b.attention_bytes + b.mlp_bytes + b.shared_bytes for b in blocks) + head_bytes(arch, quant)


# What exllamav3 stores beside each linear's trellis (bits / 8 per weight), as its quantization_config.json lists it
# (exact on the real files of a tiny GLM-4 MoE: tests/unit/quant/test_storage_fixtures.py; for GLM-4.7 the
# bpw formula alone counts ~0.66 GiB less than the files hold: tests/unit/quant/test_card_sizes.py).
FP16_BYTES = 2
FP32_BYTES = 4
MULTIPLIER_BYTES = 4  # the codebook multiplier, one int32 per linear
PAD = 128  # exllamav3 pads linear dimensions to multiples of 128


def linear_extra_bytes(n_in: int, n_out: int, bias: bool = False) -> int:
    """An EXL3 linear's bytes besides its trellis: suh fp16 [in], svh fp16 [out], the multiplier, a bias."""
    cols, rows = -(-n_in // PAD) * PAD, -(-n_out // PAD) * PAD
    return FP16_BYTES * (cols + rows + (rows if bias else 0)) + MULTIPLIER_BYTES


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weight bytes, grouped the way tensor parallel splits them."""

    attention_bytes: int  # q, k, v, o: split by KV head
    mlp_bytes: int  # dense MLP (by channel) or routed experts + router (by expert)
    mlp_channels: int
    shared_bytes: int  # shared experts (by channel); 0 on dense layers
    shared_channels: int


@lru_cache(maxsize=64)
def layer_weights(arch: Architecture, quant: Quant) -> tuple[LayerWeights, ...]:
    """Per-block stored bytes: the trellis at bpw / 8 per weight of every quantized linear, plus what exllamav3
    stores beside it (linear_extra_bytes, the unquantized FP16 router and its FP32 score bias, BF16 norms)."""
    hidden, head_dim, bits = arch.hidden_size, arch.head_dim, quant.bpw / 8
    counted = quant.bpw_basis == "trellis"  # else the bpw already holds the linears' extra bytes

    def linear_extra(n_in: int, n_out: int, bias: bool = False) -> int:
        return linear_extra_bytes(n_in, n_out, bias) if counted else 0

    q_out, kv_out = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    attention = hidden * (2 * q_out + 2 * kv_out)
    attention_extra = (
        linear_extra(hidden, q_out, arch.attention_bias)
        + 2 * linear_extra(hidden, kv_out, arch.attention_bias)
        + linear_extra(q_out, hidden)
        + (2 * FP16_BYTES * head_dim if arch.use_qk_norm else 0)
        + 2 * FP16_BYTES * hidden  # input and post-attention norms
    )

    def mlp_extra(inter: int) -> int:
        return 2 * linear_extra(hidden, inter) + linear_extra(inter, hidden)

    dense = 3 * hidden * arch.intermediate_size
    expert = 3 * hidden * arch.moe_intermediate_size
    router = arch.n_routed_experts * (hidden * FP16_BYTES + FP32_BYTES)
    shared_inter = arch.moe_intermediate_size * arch.n_shared_experts
    moe_channels = max(1, arch.moe_intermediate_size // CHANNEL_WIDTH)

    def block(mlp: int, mlp_channels: int, shared: int) -> LayerWeights:
        return LayerWeights(
            round(attention * bits) + attention_extra, mlp, mlp_channels, shared, moe_channels
        )

    dense_block = block(
        round(dense * bits) + mlp_extra(arch.intermediate_size),
        max(1, arch.intermediate_size // CHANNEL_WIDTH),
        0,
    )
    moe_block = block(
        round(arch.n_routed_experts * expert * bits)
        + arch.n_routed_experts * mlp_extra(arch.moe_intermediate_size)
        + router,
        arch.n_routed_experts,
        round(arch.n_shared_experts * expert * bits) + mlp_extra(shared_inter),
    )
    dense_layers = min(arch.first_k_dense_replace, arch.num_hidden_layers)
    return (dense_block,) * dense_layers + (moe_block,) * (arch.num_hidden_layers - dense_layers)


def head_bytes(arch: Architecture, quant: Quant) -> int:
    """The lm_head at head_bits (6 for "H6", 8 for "H8") with what it stores beside its trellis, and the final
    norm."""
    return (
        round(quant.head_bits * arch.head_params / 8)
        + linear_extra_bytes(arch.hidden_size, arch.vocab_size)
        + FP16_BYTES * arch.hidden_size
    )


def overhead_mib(
    profile: ModelProfile, cache_mode: CacheMode, chunk_size: int, holds_output: bool, split: str = "single"
) -> int:
    """Per-GPU VRAM beyond weights and cache: the one place the calibrated overhead terms are applied.

    Fitted on real loads (benchmarks/memory_calibration/RESULTS.md): base (outside torch) + resident + chunk
    transient is what every GPU needs; exllamav3's autosplit loader keeps a further 256 MiB free on the GPU it
    finishes on (output_gpu_mib: a single GPU, or the last GPU of a layer split, holds_output); tensor parallel
    costs tensor_parallel_mib more on every GPU; a layer split leaves the module that did not fit allocated on each
    GPU it moved past, and runs its transient above the gpu_split cap (layer_spill_mib, every GPU but the last).
    """
    terms = profile.memory_overhead
    mib = terms.base_mib + terms.resident_mib + terms.chunk_mib_per_token * chunk_size
    if cache_mode.quantized:
        mib += terms.quant_cache_staging_mib
    if split == "tp":
        mib += terms.tensor_parallel_mib
    elif holds_output:
        mib += terms.output_gpu_mib
    elif split == "layer":
        mib += terms.layer_spill_mib
    return math.ceil(mib)


def default_headroom_mib(total_mib: int) -> int:
    """Safety margin per GPU when none is given: 256 MiB or 1 % of the GPU's total memory, whichever is larger."""
    return max(MIN_HEADROOM_MIB, math.ceil(total_mib * HEADROOM_FRACTION))


def layer_split_gib(usable_mib: int, profile: ModelProfile, last: bool = False) -> float:
    """TabbyAPI gpu_split entry for a GPU: its torch budget in GiB, floored to 0.01.

    TabbyAPI passes gpu_split to exllamav3 as use_per_device, which multiplies by 1024**3 and caps torch's
    allocator there (weights, cache, resident statics, transients); the CUDA context and runtime (base_mib) sit
    outside that cap. So does, on a GPU the loader moves past, the layer spill (layer_spill_mib: what the GPU holds
    above the cap after exllamav3's failed attempt to place the next module there, plus its runtime transient), and
    on the last GPU the loader's free-memory margin (output_gpu_mib; benchmarks/memory_calibration/RESULTS.md).
    """
    hundredths = (usable_mib - outside_gpu_split_mib(profile, last)) * 100 // 1024
    return max(0, hundredths) / 100


def layer_split_usable_mib(usable_mib: int, profile: ModelProfile, last: bool = False) -> int:
    """The usable memory that the rounded gpu_split entry really grants (so the plan matches the loader)."""
    granted = (
        outside_gpu_split_mib(profile, last)
        + round(layer_split_gib(usable_mib, profile, last) * 100) * 1024 // 100
    )
    return min(usable_mib, granted)


def outside_gpu_split_mib(profile: ModelProfile, last: bool = False) -> int:
    """Per-GPU memory a layer split keeps out of gpu_split: the CUDA context, and the spill or the last GPU's margin."""
    terms = profile.memory_overhead
    return math.ceil(terms.base_mib + (terms.output_gpu_mib if last else terms.layer_spill_mib))


@dataclass(frozen=True)
class GpuLoad:
    """What one GPU would hold, in MiB (parts rounded up)."""

    index: int  # position in the usable list (the inventory order)
    usable_mib: int
    weights_mib: int
    cache_mib: int
    overhead_mib: int
    modules: range = range(0)  # layer split: the modules it holds (blocks in order, then the lm_head)

    @property
    def free_after_mib(self) -> int:
        """Usable memory left after the load; negative means it does not fit."""
        return self.usable_mib - self.weights_mib - self.cache_mib - self.overhead_mib


@dataclass(frozen=True)
class Placement:
    """Where a (quant, cache mode, cache size) lands under one split, and by how much it misses if it does."""

    split: str  # "tp" or "layer" (a layer split on one GPU is a single-GPU load)
    loads: tuple[GpuLoad, ...]  # the GPUs that hold something (TP: all of them)
    short_by_mib: int  # memory missing in total; 0 when it fits
    need_mib: int  # weights + cache + overhead over all GPUs it uses or would need
    has_mib: int  # usable memory of all GPUs

    @property
    def fits(self) -> bool:
        """True when every GPU's load stays within its usable memory."""
        return self.short_by_mib == 0


def _ceil_mib(nbytes: int) -> int:
    return -(-nbytes // MIB)


def _ratio_split(channels: int, weights: Sequence[int]) -> list[int]:
    """exllamav3 util.misc.ratio_split with chunk_size 1: proportional, largest residuals get the remainder."""
    total = sum(weights)
    ideal = [channels * w / total for w in weights]
    split = [int(x) for x in ideal]
    remainder = channels - sum(split)
    if remainder:
        order = sorted(range(len(ideal)), key=lambda i: -(ideal[i] - int(ideal[i])))
        for i in order[:remainder]:
            split[i] += 1
    return split


def place_tensor_parallel(
    profile: ModelProfile,
    quant: Quant,
    mode: CacheMode,
    cache_tokens: int,
    usable_mib: Sequence[int],
    chunk_size: int,
) -> Placement:
    """Emulate exllamav3's TP split (GPU 0 is the output device) and check each GPU against its usable memory."""
    arch = profile.architecture
    count = len(usable_mib)
    overheads = [
        overhead_mib(profile, mode, chunk_size, holds_output=i == 0, split="tp") for i in range(count)
    ]
    budgets = [(u - o) * MIB for u, o in zip(usable_mib, overheads)]
    weights = [0] * count
    cache = [0] * count
    used = [0] * count  # weights + cache, bytes
    fallback = [max(1, b) for b in budgets]  # exllamav3 inflates every budget by 10 % when all are full
    layer_cache = cache_bytes(arch, mode, cache_tokens, layers=1)
    heads = arch.num_key_value_heads

    def spread(total: int, channels: int, extra: int = 0) -> None:
        """Split one component (and its cache slice) by the memory still free on each GPU."""
        remaining = [b - u if b > u else 0 for b, u in zip(budgets, used)]
        for i, share in enumerate(_ratio_split(channels, remaining if any(remaining) else fallback)):
            if share:
                part = total * share // channels
                weights[i] += part
                used[i] += part
                if extra:
                    part = extra * share // channels
                    cache[i] += part
                    used[i] += part

    for block in layer_weights(arch, quant):
        spread(block.attention_bytes, heads, layer_cache)
        spread(block.mlp_bytes, block.mlp_channels)
        if block.shared_bytes:
            spread(block.shared_bytes, block.shared_channels)
    spread(head_bytes(arch, quant), max(1, arch.vocab_size // CHANNEL_WIDTH))
    loads = tuple(
        GpuLoad(i, usable_mib[i], _ceil_mib(weights[i]), _ceil_mib(cache[i]), overheads[i])
        for i in range(count)
    )
    short = sum(max(0, -load.free_after_mib) for load in loads)
    need = sum(load.weights_mib + load.cache_mib + load.overhead_mib for load in loads)
    return Placement("tp", loads, short, need, sum(usable_mib))


def place_layers(
    profile: ModelProfile,
    quant: Quant,
    mode: CacheMode,
    cache_tokens: int,
    usable_mib: Sequence[int],
    chunk_size: int,
) -> Placement:
    """Emulate exllamav3's autosplit: blocks in order, each GPU filled up to its gpu_split budget, lm_head last.

    On several GPUs each GPU's budget is what its rounded gpu_split entry grants (layer_split_usable_mib). A GPU
    that can take every remaining module with the last GPU's overhead (no spill, the output margin) is the last
    one; otherwise it is filled under the spill overhead and the loader moves on. GPU 0 taking everything is a
    single-GPU load (no gpu_split), so its whole usable memory counts.
    """
    arch = profile.architecture
    layer_cache = cache_bytes(arch, mode, cache_tokens, layers=1)
    inner = overhead_mib(profile, mode, chunk_size, holds_output=False, split="layer")
    last = overhead_mib(profile, mode, chunk_size, holds_output=True, split="layer")
    modules = [
        (b.attention_bytes + b.mlp_bytes + b.shared_bytes, layer_cache) for b in layer_weights(arch, quant)
    ]
    modules.append((head_bytes(arch, quant), 0))
    rest_weights = [0] * (len(modules) + 1)  # bytes from a position to the end
    rest_cache = [0] * (len(modules) + 1)
    for position in range(len(modules) - 1, -1, -1):
        rest_weights[position] = rest_weights[position + 1] + modules[position][0]
        rest_cache[position] = rest_cache[position + 1] + modules[position][1]
    loads: list[GpuLoad] = []
    position = 0
    for gpu, usable in enumerate(usable_mib):
        if position == len(modules):  # only when a profile's output margin exceeds its spill
            break
        last_budget = usable if gpu == 0 else layer_split_usable_mib(usable, profile, last=True)
        weights, cache = rest_weights[position], rest_cache[position]
        if _ceil_mib(weights) + _ceil_mib(cache) + last <= last_budget:
            held = range(position, len(modules))
            loads.append(GpuLoad(gpu, last_budget, _ceil_mib(weights), _ceil_mib(cache), last, held))
            need = sum(load.usable_mib - load.free_after_mib for load in loads)
            return Placement("layer", tuple(loads), 0, need, sum(usable_mib))
        final = gpu == len(usable_mib) - 1
        budget, overhead = (last_budget, last) if final else (layer_split_usable_mib(usable, profile), inner)
        weights, cache, first = 0, 0, position
        while position < len(modules):
            module_weights, module_cache = modules[position]
            if _ceil_mib(weights + module_weights) + _ceil_mib(cache + module_cache) + overhead > budget:
                break
            weights, cache, position = weights + module_weights, cache + module_cache, position + 1
        if weights or cache:
            held = range(first, position)
            loads.append(GpuLoad(gpu, budget, _ceil_mib(weights), _ceil_mib(cache), overhead, held))
    left = _ceil_mib(rest_weights[position] + rest_cache[position])
    need = sum(load.usable_mib - load.free_after_mib for load in loads) + (left + inner if left else 0)
    return Placement("layer", tuple(loads), left, need, sum(usable_mib))

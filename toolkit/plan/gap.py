"""The memory a published quant leaves unused, and the mix of two published branches that would fill it (pure).

- Budget: the largest VRAM weights that still fit at the required context with the plan's cache mode, split, chunk
  size and usable memory per GPU (headroom included) -- memory.py's model solved for the weights: a uniform quant
  with the chosen quant's head and a growing bpw, bisected to 16 MiB, placed like the plan (tensor parallel over the
  same GPUs, a layer split filling them in order, or the one GPU of a single-GPU plan).
- Proposal (profile `mix:`): when the chosen quant leaves at least mix.min_gap_gib of the budget unused and no larger
  branch fits, a mix of the chosen branch (lower) and a larger branch (upper) of the profile's one codebook.
  target = the budget rounded down to whole GiB minus mix.margin_gib, strictly between the two branches' sizes.
  Expected KL = log(KL(FP16||quant)) interpolated linearly in size between the two branches' points on the card: an
  estimate, and kl_basis says so and names the points. The upper is the larger branch whose interpolation promises
  the lowest KL at the target: the next point on the lower convex hull of the card's (size, log KL), which passes
  over a branch that a mix of its neighbours is expected to beat (for the issue's 4 x RTX 5090, 3bpw_H6 at 124 GiB
  lies above the line from 2.57bpw-tuned to 3.15bpw-tuned, so the mix goes towards 3.15bpw-tuned).
- Downloads: both branches, in GB as the hub shows them (VRAM weights on the card plus the embedding, 10^9 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..facts.profiles import ModelProfile, Quant
from .memory import GIB, MIB, CacheMode, place_layers, place_tensor_parallel, weights_bytes
from .plan import Download, MixProposal

RESOLUTION_BYTES = 16 * MIB  # the budget's bisection step


def uniform_quant(profile: ModelProfile, head_bits: int, weights: int) -> Quant:
    """A stand-in quant of `weights` VRAM bytes: uniform bpw over the linears, the given head (the stored bytes
    are linear in bpw, so two points of memory.weights_bytes invert them)."""
    arch = profile.architecture

    def at(bpw: float) -> Quant:
        return Quant("(budget)", bpw, head_bits, weights / GIB, 0.0, 0.0, 1.0, (0.0,))

    fixed = weights_bytes(arch, at(0.0))
    return at((weights - fixed) / (weights_bytes(arch, at(1.0)) - fixed))


def fits(
    profile: ModelProfile,
    quant: Quant,
    mode: CacheMode,
    cache_tokens: int,
    split: str,
    usable_mib: Sequence[int],
    chunk_size: int,
) -> bool:
    """The load fits as the plan places it: tp over every GPU, else in order (single: one GPU's list)."""
    place = place_tensor_parallel if split == "tp" else place_layers
    return place(profile, quant, mode, cache_tokens, usable_mib, chunk_size).fits


def weights_budget(
    profile: ModelProfile,
    quant: Quant,
    mode: CacheMode,
    cache_tokens: int,
    split: str,
    usable_mib: Sequence[int],
    chunk_size: int,
) -> int:
    """The largest weights (bytes, as memory.weights_bytes counts a quant) that fit with this cache and placement;
    at least the quant's own when it fits, 0 when even that does not."""
    low = weights_bytes(profile.architecture, quant)

    def holds(weights: int) -> bool:
        stand_in = uniform_quant(profile, quant.head_bits, weights)
        return fits(profile, stand_in, mode, cache_tokens, split, usable_mib, chunk_size)

    if not fits(profile, quant, mode, cache_tokens, split, usable_mib, chunk_size):
        return 0
    high = sum(usable_mib) * MIB  # weights never exceed all the memory there is
    if holds(high):
        return high
    while high - low > RESOLUTION_BYTES:
        middle = (low + high) // 2
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low


def interpolated_kl(lower: Quant, upper: Quant, size_gib: float) -> float:
    """KL(FP16||quant) at size_gib: log(KL) linear in size between the two branches' card points (an estimate)."""
    share = (size_gib - lower.size_gib) / (upper.size_gib - lower.size_gib)
    return math.exp(
        math.log(lower.kl_ref_quant) + share * (math.log(upper.kl_ref_quant) - math.log(lower.kl_ref_quant))
    )


def kl_basis(lower: Quant, upper: Quant) -> str:
    """How expected_kl was made, naming the card's points."""
    return (
        "estimate: log(KL) interpolated linearly in size between the card's measured points "
        f"{lower.branch} ({lower.size_gib:g} GiB, KL {lower.kl_ref_quant:.4f}) and {upper.branch} "
        f"({upper.size_gib:g} GiB, KL {upper.kl_ref_quant:.4f}); the mix itself is not measured"
    )


def download_gb(profile: ModelProfile, quant: Quant) -> float:
    """A branch's download in GB as the hub shows it: the card's VRAM weights plus the embedding, 10^9 bytes."""
    return round((quant.size_gib * GIB + profile.architecture.embedding_bytes) / 1e9, 1)


def propose_mix(
    profile: ModelProfile,
    quant: Quant,
    mode: CacheMode,
    cache_tokens: int,
    split: str,
    usable_mib: Sequence[int],
    chunk_size: int,
) -> MixProposal | None:
    """The mix that would fill what `quant` leaves unused at cache_tokens with this mode and placement, or None
    (the profile proposes no mixes, the gap is below mix.min_gap_gib, a larger branch fits, or none is larger)."""
    policy = profile.mix
    if policy is None:
        return None
    arch = profile.architecture
    budget = weights_budget(profile, quant, mode, cache_tokens, split, usable_mib, chunk_size)
    free_before = (budget - weights_bytes(arch, quant)) / GIB
    larger = [q for q in profile.quants if q.size_gib > quant.size_gib]
    if (
        free_before < policy.min_gap_gib
        or not larger
        or any(weights_bytes(arch, q) <= budget for q in larger)
    ):
        return None
    target = math.floor(budget / GIB) - policy.margin_gib
    options = [
        (interpolated_kl(quant, upper, target), upper.size_gib, upper)
        for upper in larger
        if quant.size_gib < target < upper.size_gib
    ]
    if not options:
        return None
    expected, _, upper = min(options, key=lambda option: option[:2])
    budget_gib = budget / GIB
    return MixProposal(
        lower=quant.branch,
        upper=upper.branch,
        target_gib=round(target, 2),
        budget_gib=round(budget_gib, 2),
        free_gib_before=round(free_before, 2),
        free_gib_after=round(budget_gib - target, 2),
        expected_kl=round(expected, 4),
        kl_basis=kl_basis(quant, upper),
        head_bits=quant.head_bits,
        downloads=(
            Download(quant.branch, download_gb(profile, quant)),
            Download(upper.branch, download_gb(profile, upper)),
        ),
    )

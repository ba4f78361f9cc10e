"""Choose the quant, KV-cache mode, split and context that give the best quality that fits, and say why.

The rules (pure: no NVML, and no I/O beyond reading profiles/tabbyapi.yaml when no pin is given):

- The stack (stack.py): TabbyAPI, exllamav3 and torch as pinned in profiles/tabbyapi.yaml, in the CUDA variant the
  driver runs (--cuda, --tabby-ref, --exllamav3 change it). Memory is modelled with the profile's calibration for
  the stack's exllamav3 version, measured through the pinned TabbyAPI; a stack without one is refused unless
  --allow-uncalibrated, which adds the profile's uncalibrated margin (max(700 MiB, 9 %) per GPU) to the headroom.

- Usable memory per GPU = free memory (NVML, or the whole card for a --gpus spec) minus the headroom:
  256 MiB or 1 % of the GPU's total, whichever is larger (--headroom-mib overrides it for every GPU).
- Objective: the lowest expected KL divergence among the quants that fit with at least the required context
  (--context N, `max` = the model's maximum, default the profile's serving.default_min_context). KL is the
  profile's kl_ref_quant, KL(P_FP16 || P_quant), the convention of exllamav3's eval/model_diff.py. Then the
  largest context that fits for that quant: the configured context is the request if one was given, else that
  maximum. --quant fixes the quant and only maximizes context.
- Cache mode `auto`: the ladder FP16, 8,8, 8,7, 7,7, 7,6, 6,6, 6,5, 5,5, 5,4, 4,4, 4,3, 3,3, 3,2, 2,2 (each step
  one bit per K/V pair less). The quant is chosen as if the cache were at the profile's serving.cache_floor, the
  lowest mode the model card recommends (5,4 for GLM-4.7: "k5v4" / "k6v5"). Then the chosen quant gets the highest mode of the ladder that still fits the required
  context, except that FP16 is taken only when it reaches the model's full context (8-bit K/V is practically
  lossless, so FP16's 2.1x memory buys nothing until memory is no constraint). Only when no quant fits at the floor
  with the required context does it go below the floor, and then only with the smallest quant, at the highest mode
  of the rest of the ladder that fits (4,4, 4,3, 3,3, 3,2, 2,2 below 5,4): below the card's floor the cache loses quality fast, so cache bits are never traded
  for quant bits there (this also keeps the choice monotone: more memory or less context never gives a worse
  quant). An explicit mode is honoured exactly: the best quant that fits with it.
- Split `auto`: one GPU is `single`. On several GPUs both tensor parallel (only up to one GPU per KV head) and layer
  split are tried; the better result wins (the lower-KL quant, then the higher-quality cache mode, then the longer
  maximum context) and a tie goes to tensor parallel, where every GPU works on every token. A layer split that
  ends up on one GPU is reported as `single`.
- Chunk size: quants and cache modes are tried at the profile's chunk_size (2048 for GLM-4.7) first. When the
  required context does not fit a quant at a tier's cheapest mode, the smaller chunk sizes of the profile's
  serving.chunk_fallbacks (1024, then 512) are tried for that quant before the next quant (or the tier below the
  floor), but only for placements the memory model is calibrated for at that size (single GPU for GLM-4.7): the
  prefill transient shrinks with the chunk (0.2353 MiB per token of chunk_size per GPU). Then the cache mode is
  chosen at that chunk size. With a context that fits at the default nothing changes.
- Every other quant is listed as a rejection with the number that decided it: the memory it lacks at the required
  context (at the default chunk_size), or the higher KL it would bring.
- Gap (gap.py): when the chosen quant leaves a meaningful part of the memory unused at the required context with the
  chosen cache mode and split, and no larger branch fits, the plan carries a mix proposal: the chosen branch and a
  larger one, a target size that fits, the estimated KL and the downloads. Not with --quant (the quant was chosen).
- Mix (mix_quant.py): `--quant mix:LOWER+UPPER@GIB` fixes a mix of two branches as the quant (placed as GIB GiB
  of weights, its KL the card-point estimate); `--mix` takes the planner's own proposal for these GPUs (planned
  as above, then placed as that mix). The plan names it (plan.mix); exit 2 when no mix is proposed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .. import validate
from ..detect.inventory import GpuInventory
from ..errors import BadInput, NoFit
from ..facts.profiles import ChunkFallback, ModelProfile, Quant
from ..facts.runtime import CACHE_PAGE_TOKENS
from ..facts.tabby_pin import CUDA_CHOICES, TabbyPin, load_tabby_pin
from .gap import propose_mix
from .memory import (
    FP16,
    GIB,
    MIB,
    CacheMode,
    Placement,
    cache_bytes_per_token,
    cache_size_tokens,
    default_headroom_mib,
    layer_split_gib,
    overhead_mib,
    parse_cache_mode,
    place_layers,
    place_tensor_parallel,
    weights_bytes,
)
from .mix_quant import default_recipe, is_mix_spec, parse_spec, planned_mix, spec_text, stand_in
from .plan import ChunkTrade, Expected, GpuAllocation, Plan, PlanRequest, Rejection, Stack
from .stack import choose_stack

CACHE_LADDER: tuple[CacheMode, ...] = (FP16,) + tuple(
    CacheMode(k, v)
    for k, v in (
        (8, 8),
        (8, 7),
        (7, 7),
        (7, 6),
        (6, 6),
        (6, 5),
        (5, 5),
        (5, 4),
        (4, 4),
        (4, 3),
        (3, 3),
        (3, 2),
        (2, 2),
    )
)
SPLIT_CHOICES = ("auto", "tp", "layer")
MAX_HEADROOM_MIB = 16 * 2**20  # no GPU has more memory than this (16 TiB)


@dataclass(frozen=True)
class Choice:
    """A quant, cache mode and split with its maximum cache size (tokens) on these GPUs."""

    quant: Quant
    mode: CacheMode
    split: str
    max_cache_tokens: int


class _Search:
    """Placements of (quant, mode, split, cache tokens) on one set of GPUs at one chunk_size, memoized.

    A smaller chunk_size than the profile's (a fallback) counts only placements its memory model was checked for:
    others are marked as not fitting.
    """

    def __init__(
        self,
        profile: ModelProfile,
        usable_mib: Sequence[int],
        splits: Sequence[str],
        fallback: ChunkFallback | None = None,
    ) -> None:
        self.profile = profile
        self.fallback = fallback
        self.calibrated = fallback.calibrated_splits if fallback else ("single", "tp", "layer")
        # checked on one GPU only: a layer split there is the first GPU taking everything, so place on it alone
        single_only = "layer" not in self.calibrated and "tp" not in self.calibrated
        self.usable_mib = list(usable_mib)[:1] if single_only else list(usable_mib)
        self.splits = tuple(s for s in splits if s != "tp" or "tp" in self.calibrated)
        self.chunk_size = fallback.chunk_size if fallback else profile.serving.chunk_size
        self.cap_tokens = cache_size_tokens(profile.architecture.max_position_embeddings)
        self._placements: dict[tuple[str, CacheMode, str, int], Placement] = {}

    def place(self, quant: Quant, mode: CacheMode, split: str, tokens: int) -> Placement:
        """Where the load lands; tp on all GPUs, layer/single filled in order."""
        key = (quant.branch, mode, split, tokens)
        if key not in self._placements:
            if split == "tp":
                placement = place_tensor_parallel(
                    self.profile, quant, mode, tokens, self.usable_mib, self.chunk_size
                )
            else:
                placement = place_layers(self.profile, quant, mode, tokens, self.usable_mib, self.chunk_size)
            effective = "single" if split == "layer" and len(placement.loads) == 1 else split
            if placement.fits and effective not in self.calibrated:
                placement = dataclasses.replace(placement, short_by_mib=1)  # not checked at this chunk size
            self._placements[key] = placement
        return self._placements[key]

    def _cheap_first(self) -> list[str]:
        """Layer placements cost a fraction of a TP emulation: try them first when any split will do."""
        return sorted(self.splits, key=lambda split: split == "tp")

    def best_placement(self, quant: Quant, mode: CacheMode, tokens: int) -> Placement:
        """A split that fits, or else the one that misses by the least."""
        placements = []
        for split in self._cheap_first():
            placement = self.place(quant, mode, split, tokens)
            if placement.fits:
                return placement
            placements.append(placement)
        return min(placements, key=lambda p: p.short_by_mib)

    def fits(self, quant: Quant, mode: CacheMode, tokens: int) -> bool:
        """True when some allowed split holds the load."""
        return any(self.place(quant, mode, split, tokens).fits for split in self._cheap_first())

    def _upper_pages(self, quant: Quant, mode: CacheMode, split: str) -> int:
        """Pages of cache that the total memory could hold at best (the whole cache must fit somewhere)."""
        gpus_with_overhead = len(self.usable_mib) if split == "tp" else 1
        spare = (
            sum(self.usable_mib)
            - gpus_with_overhead * overhead_mib(self.profile, mode, self.chunk_size, False)
        ) * MIB
        spare -= weights_bytes(self.profile.architecture, quant)
        return max(
            1, int(spare // (cache_bytes_per_token(self.profile.architecture, mode) * CACHE_PAGE_TOKENS))
        )

    def max_tokens(self, quant: Quant, mode: CacheMode, split: str) -> int:
        """Largest cache size (multiple of a page, up to the model's maximum) that fits; 0 if none.

        Starts at the total-memory bound and steps down in doubling strides, then bisects: the answer is
        usually within a few pages of the bound, so this takes a handful of placements instead of ten.
        """
        if not self.place(quant, mode, split, CACHE_PAGE_TOKENS).fits:
            return 0
        high = min(self.cap_tokens // CACHE_PAGE_TOKENS, self._upper_pages(quant, mode, split))
        if self.place(quant, mode, split, high * CACHE_PAGE_TOKENS).fits:
            return high * CACHE_PAGE_TOKENS
        low, stride = 1, 1
        while high - stride > 1:
            if self.place(quant, mode, split, (high - stride) * CACHE_PAGE_TOKENS).fits:
                low = high - stride
                break
            high, stride = high - stride, stride * 2
        high -= 1  # high does not fit; low does
        while low < high:
            middle = (low + high + 1) // 2
            if self.place(quant, mode, split, middle * CACHE_PAGE_TOKENS).fits:
                low = middle
            else:
                high = middle - 1
        return low * CACHE_PAGE_TOKENS

    def best_split(self, quant: Quant, mode: CacheMode, tokens: int) -> Choice | None:
        """Among splits fitting `tokens`, the one with the longest maximum context (ties go to tp)."""
        choices = [
            Choice(quant, mode, split, self.max_tokens(quant, mode, split))
            for split in self.splits
            if self.place(quant, mode, split, tokens).fits
        ]
        return max(choices, key=lambda c: (c.max_cache_tokens, c.split == "tp"), default=None)


def resolve_headroom(inventory: GpuInventory, request: PlanRequest) -> list[int]:
    """Per-GPU headroom: the request's, or the documented default."""
    if request.headroom_mib is not None:
        if request.headroom_mib < 0:
            raise BadInput(f"--headroom-mib {request.headroom_mib} is negative", "give 0 or more MiB")
        return [request.headroom_mib] * len(inventory.gpus)
    return [default_headroom_mib(gpu.total_mib) for gpu in inventory.gpus]


def required_context(profile: ModelProfile, request: PlanRequest) -> int:
    """The context a plan must reach: --context N, `max`, or the profile's default minimum."""
    maximum = profile.architecture.max_position_embeddings
    if request.context_max:
        return maximum
    if request.context is None:
        return min(profile.serving.default_min_context, maximum)
    if request.context < 1:
        raise BadInput(
            f"--context {request.context} is not a positive number of tokens", "e.g. --context 32768"
        )
    if request.context > maximum:
        raise BadInput(
            f"--context {request.context} is above {profile.name}'s maximum of {maximum} tokens",
            f"use --context {maximum} or --context max",
        )
    return request.context


def allowed_splits(profile: ModelProfile, gpu_count: int, split: str) -> tuple[str, ...]:
    """The splits to try: single on one GPU; tp only up to one GPU per KV head."""
    if split not in SPLIT_CHOICES:
        raise BadInput(f"unknown split {split!r}", "use auto, tp or layer")
    heads = profile.architecture.num_key_value_heads
    if gpu_count == 1:
        if split != "auto":
            raise BadInput(f"--split {split} needs at least 2 GPUs, the plan has 1", "drop --split")
        return ("layer",)
    if split == "tp" and gpu_count > heads:
        raise BadInput(
            f"tensor parallel splits {heads} KV heads, so it cannot use {gpu_count} GPUs",
            "use --split layer, or plan for fewer GPUs",
        )
    if split != "auto":
        return (split,)
    return ("tp", "layer") if gpu_count <= heads else ("layer",)


@dataclass(frozen=True)
class Candidate:
    """A quant that fits, where it lands and at which cache mode and context (for views such as the speed bound)."""

    quant: Quant
    mode: CacheMode
    context: int
    placement: Placement


@dataclass(frozen=True)
class PlanDetails:
    """What the planner saw besides the plan: the winner and every other quant that fits (at the cache mode quants
    are compared at, with the required context), and the chunk-size trade when the plan made one."""

    candidates: tuple[Candidate, ...]
    chunk_trade: ChunkTrade | None


def make_plan(
    profile: ModelProfile, inventory: GpuInventory, request: PlanRequest, pin: TabbyPin | None = None
) -> Plan:
    """Pick quant, cache mode, split and context for these GPUs and this stack (raises BadInput, NoFit, or
    EnvironmentMissing when the detected driver runs no image); pin defaults to profiles/tabbyapi.yaml."""
    return plan_with_details(profile, inventory, request, pin)[0]


def check_request(profile: ModelProfile, request: PlanRequest) -> None:
    """Every part of the request that does not depend on the GPUs (exit 2), so it can be checked before NVML."""
    required_context(profile, request)
    if request.headroom_mib is not None and request.headroom_mib < 0:
        raise BadInput(f"--headroom-mib {request.headroom_mib} is negative", "give 0 or more MiB")
    if request.headroom_mib is not None and request.headroom_mib > MAX_HEADROOM_MIB:
        raise BadInput(
            f"--headroom-mib {request.headroom_mib} is above {MAX_HEADROOM_MIB}", "give a GPU's MiB"
        )
    if request.split not in SPLIT_CHOICES:
        raise BadInput(f"unknown split {request.split!r}", "use auto, tp or layer")
    if request.cache.strip().lower() != "auto":
        parse_cache_mode(request.cache)
    if request.mix and request.quant is not None:
        raise BadInput(
            "--mix takes the planner's proposal; --quant fixes the quant",
            "pass one of them (a mix of your choice: --quant mix:LOWER+UPPER@GIB)",
        )
    if is_mix_spec(request.quant):
        parse_spec(profile, str(request.quant))
    elif request.quant is not None:
        profile.quant(request.quant)
    if request.mix and profile.mix is None:
        raise BadInput(
            f"--mix: profile {profile.name} proposes no mixes (it has no mix: section)", "drop --mix"
        )
    if request.cuda not in CUDA_CHOICES:
        raise BadInput(
            f"--cuda {request.cuda!r} is not one of {', '.join(CUDA_CHOICES)}", "use auto, 13 or 12"
        )
    if request.tabby_ref is not None:
        validate.git_ref(request.tabby_ref)
    if request.exllamav3 is not None:
        validate.package_version(request.exllamav3, "--exllamav3")


def plan_with_details(
    profile: ModelProfile, inventory: GpuInventory, request: PlanRequest, pin: TabbyPin | None = None
) -> tuple[Plan, PlanDetails]:
    """make_plan, plus the candidates that fit and the chunk-size trade (PlanDetails)."""
    check_request(profile, request)
    if not inventory.gpus:
        raise BadInput("the GPU inventory is empty", "give --gpus, e.g. --gpus 8x24GiB")
    if request.mix:
        request = _proposed_mix(profile, inventory, request, pin)
    stack = choose_stack(profile, pin or load_tabby_pin(), inventory, request)
    profile = stack.profile  # with the memory terms of the stack's calibration
    required = required_context(profile, request)
    headroom = [room + margin for room, margin in zip(resolve_headroom(inventory, request), stack.margin_mib)]
    splits = allowed_splits(profile, len(inventory.gpus), request.split)
    fixed_mode = None if request.cache.strip().lower() == "auto" else parse_cache_mode(request.cache)
    mix_spec = parse_spec(profile, request.quant) if is_mix_spec(request.quant) else None
    fixed_quant = (
        stand_in(profile, mix_spec) if mix_spec else profile.quant(request.quant) if request.quant else None
    )
    usable = [gpu.free_mib - room for gpu, room in zip(inventory.gpus, headroom)]
    search = _Search(profile, usable, splits)
    searches = [search] + [_Search(profile, usable, splits, f) for f in profile.serving.chunk_fallbacks]
    required_tokens = cache_size_tokens(required)
    by_kl = sorted(profile.quants, key=lambda q: q.kl_ref_quant)
    candidates = [fixed_quant] if fixed_quant else by_kl

    tiers = _tiers(profile, candidates, fixed_mode)
    compare_mode = tiers[0][1][-1]  # quants are compared at the floor (or at the explicit mode)
    winner: Choice | None = None
    chosen = search
    for tier_quants, tier_modes in tiers:
        cheapest = tier_modes[-1]
        found = next(
            ((q, s) for q in tier_quants for s in searches if s.fits(q, cheapest, required_tokens)), None
        )
        if found is not None:
            quant, chosen = found
            winner = _choose_mode(
                chosen, quant, tier_modes, required_tokens, fp16_needs_full_context=not fixed_mode
            )
            break
    if winner is None:
        raise NoFit(*_closest_option(search, profile, candidates, required, fixed_mode, fixed_quant))

    context = (
        required
        if (request.context is not None or request.context_max)
        else min(winner.max_cache_tokens, profile.architecture.max_position_embeddings)
    )
    cache_tokens = cache_size_tokens(context)
    placement = chosen.place(winner.quant, winner.mode, winner.split, cache_tokens)
    fixed_by = f"the mix {fixed_quant.branch}" if mix_spec else request.quant and f"--quant {request.quant}"
    rejected, fitting = _rejections(search, by_kl, winner, compare_mode, required_tokens, fixed_by)
    plan = _build_plan(
        profile,
        inventory,
        stack.stack,
        winner,
        placement,
        context,
        cache_tokens,
        headroom,
        usable,
        rejected,
        chosen.chunk_size,
    )
    if mix_spec is not None:
        plan = dataclasses.replace(plan, mix=planned_mix(profile, mix_spec, *default_recipe()))
    if fixed_quant is None:
        gpus = chosen.usable_mib[:1] if plan.split == "single" else chosen.usable_mib
        proposal = propose_mix(
            profile, winner.quant, winner.mode, required_tokens, plan.split, gpus, chosen.chunk_size
        )
        plan = dataclasses.replace(plan, mix_proposal=proposal)
    details = PlanDetails(
        candidates=(Candidate(winner.quant, winner.mode, context, placement),)
        + tuple(Candidate(q, compare_mode, required, p) for q, p in fitting),
        chunk_trade=_chunk_trade(search, chosen, winner, required, profile),
    )
    return plan, details


def _proposed_mix(
    profile: ModelProfile, inventory: GpuInventory, request: PlanRequest, pin: TabbyPin | None
) -> PlanRequest:
    """--mix: the request with the mix the planner proposes for these GPUs as its quant (exit 2 when none)."""
    plan = make_plan(profile, inventory, dataclasses.replace(request, mix=False), pin)
    proposal = plan.mix_proposal
    if proposal is None:
        gap = profile.mix.min_gap_gib if profile.mix else 0.0
        raise BadInput(
            f"--mix: no mix is proposed here: {plan.quant} leaves less than {gap:g} GiB of the weights budget "
            "unused at the required context, or no larger branch would fill it",
            f"deploy {plan.quant} (drop --mix), or name a mix: --quant mix:LOWER+UPPER@GIB",
        )
    quant = spec_text(proposal.lower, proposal.upper, proposal.target_gib)
    return dataclasses.replace(request, mix=False, quant=quant)


def _chunk_trade(
    default: _Search, chosen: _Search, winner: Choice, required: int, profile: ModelProfile
) -> ChunkTrade | None:
    """What a smaller chunk_size bought: the context the same quant and mode reach at the default (None: no trade)."""
    if chosen.fallback is None:
        return None
    reach = max(default.max_tokens(winner.quant, winner.mode, split) for split in default.splits)
    maximum = profile.architecture.max_position_embeddings
    return ChunkTrade(
        default_chunk_size=default.chunk_size,
        chunk_size=chosen.chunk_size,
        required_context=required,
        default_max_context=min(reach, maximum),
        max_context=min(winner.max_cache_tokens, maximum),
        prefill_vs_default=chosen.fallback.prefill_vs_default,
    )


def _tiers(
    profile: ModelProfile, candidates: Sequence[Quant], fixed_mode: CacheMode | None
) -> list[tuple[Sequence[Quant], tuple[CacheMode, ...]]]:
    """(quants, cache modes best first) to try in order; the cheapest mode of a tier decides which quant fits."""
    if fixed_mode:
        return [(candidates, (fixed_mode,))]
    # below the floor only the smallest quant: cache bits are given up there, never traded for quant bits
    smallest = min(candidates, key=lambda q: weights_bytes(profile.architecture, q))
    cut = CACHE_LADDER.index(cache_floor(profile)) + 1
    below = CACHE_LADDER[cut:]
    return [(candidates, CACHE_LADDER[:cut])] + ([((smallest,), below)] if below else [])


def cache_floor(profile: ModelProfile) -> CacheMode:
    """The profile's cache floor (serving.cache_floor) as a mode of the ladder."""
    floor = parse_cache_mode(profile.serving.cache_floor)
    if floor not in CACHE_LADDER:
        labels = ", ".join(mode.label for mode in CACHE_LADDER[1:])
        raise BadInput(
            f"profile {profile.name}: serving.cache_floor {profile.serving.cache_floor!r} is not a step of the "
            "cache ladder",
            f"use one of {labels}",
        )
    return floor


def _choose_mode(
    search: _Search,
    quant: Quant,
    tier: Sequence[CacheMode],
    required_tokens: int,
    fp16_needs_full_context: bool,
) -> Choice:
    """The highest mode of the tier that fits the required context (auto: FP16 only if it reaches the full one)."""
    for mode in tier:
        tokens = search.cap_tokens if mode == FP16 and fp16_needs_full_context else required_tokens
        choice = search.best_split(quant, mode, tokens)
        if choice is not None:
            return choice
    raise AssertionError("the tier's cheapest mode was checked to fit")  # pragma: no cover


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f}"


def _shortfall_reason(placement: Placement, tokens: int, mode: CacheMode) -> str:
    """'needs 187.4 GiB, has 184.0' or, when the total would fit, which GPU overflows."""
    where = f"at {tokens} tokens, cache {mode.label}, {placement.split}"
    if placement.need_mib > placement.has_mib:
        return f"needs {_gib(placement.need_mib)} GiB, has {_gib(placement.has_mib)} GiB ({where})"
    worst = min(placement.loads, key=lambda load: load.free_after_mib, default=None)
    if placement.split == "tp" and worst is not None:
        return (
            f"GPU {worst.index} needs {_gib(worst.usable_mib - worst.free_after_mib)} GiB, has "
            f"{_gib(worst.usable_mib)} GiB (heads and experts split unevenly; {where})"
        )
    return (
        f"{_gib(placement.short_by_mib)} GiB of blocks do not fit the GPUs in order although the total "
        f"({_gib(placement.need_mib)} of {_gib(placement.has_mib)} GiB) would ({where})"
    )


def _rejections(
    search: _Search,
    by_kl: Sequence[Quant],
    winner: Choice,
    probe_mode: CacheMode,
    required_tokens: int,
    fixed_by: str | None,
) -> tuple[tuple[Rejection, ...], tuple[tuple[Quant, Placement], ...]]:
    """Every quant but the winner, with the number that decided against it; and those of them that fit
    (fixed_by: what fixed the quant, "--quant X" or "the mix X")."""
    rejected = []
    fitting = []
    for quant in by_kl:
        if quant.branch == winner.quant.branch:
            continue
        placement = search.best_placement(quant, probe_mode, required_tokens)
        if not placement.fits:
            reason = _shortfall_reason(placement, required_tokens, probe_mode)
        elif fixed_by is not None:
            reason = f"fits, but {fixed_by} was requested"
        else:
            reason = (
                f"fits, but KL {quant.kl_ref_quant:.4f} > {winner.quant.kl_ref_quant:.4f} of "
                f"{winner.quant.branch}"
            )
        if placement.fits:
            fitting.append((quant, placement))
        rejected.append(Rejection(quant.branch, reason, placement.short_by_mib))
    return tuple(rejected), tuple(fitting)


def _closest_option(
    search: _Search,
    profile: ModelProfile,
    candidates: Sequence[Quant],
    required: int,
    fixed_mode: CacheMode | None,
    fixed_quant: Quant | None,
) -> tuple[str, str]:
    """The NoFit message and hint: the nearest thing that would fit (another cache mode, less context, a quant)."""
    required_tokens = cache_size_tokens(required)
    tiers = _tiers(profile, candidates, fixed_mode)
    last_mode = tiers[-1][1][-1]
    what = f"{fixed_quant.branch} does not fit" if fixed_quant else f"no {profile.name} quant fits"
    message = f"{what} at {required} tokens of context {'with' if fixed_mode else 'even with'} cache {last_mode.label}"
    if fixed_mode is not None:
        for mode in CACHE_LADDER:
            quant = next((q for q in candidates if search.fits(q, mode, required_tokens)), None)
            if quant is not None:
                return message, f"{quant.branch} fits with --cache {mode.label}"
    # Less context: the lowest-KL quant that still reaches a useful context (the profile's default minimum),
    # else the quant that reaches the most -- "2.10bpw-tuned fits with 1024 tokens" helps nobody.
    useful = min(required, profile.serving.default_min_context)
    options = [
        (quant, modes[-1], max(search.max_tokens(quant, modes[-1], split) for split in search.splits))
        for quants, modes in tiers
        for quant in quants
    ]
    options = [option for option in options if option[2]]
    if options:
        quant, mode, tokens = next((o for o in options if o[2] >= useful), max(options, key=lambda o: o[2]))
        return (
            message,
            f"{quant.branch} fits with up to {tokens} tokens at cache {mode.label}: try --context {tokens}",
        )
    if fixed_quant is not None:
        for quants, modes in _tiers(
            profile, sorted(profile.quants, key=lambda q: q.kl_ref_quant), fixed_mode
        ):
            quant = next((q for q in quants if search.fits(q, modes[-1], required_tokens)), None)
            if quant is not None:
                return message, f"{quant.branch} fits at {required} tokens: try --quant {quant.branch}"
    smallest = min(candidates, key=lambda q: weights_bytes(profile.architecture, q))
    placement = search.best_placement(smallest, last_mode, CACHE_PAGE_TOKENS)
    return message, (
        f"even {smallest.branch} with {CACHE_PAGE_TOKENS} tokens needs {_gib(placement.need_mib)} GiB, has "
        f"{_gib(placement.has_mib)} GiB: plan for more or larger GPUs"
    )


def _build_plan(
    profile: ModelProfile,
    inventory: GpuInventory,
    stack: Stack,
    winner: Choice,
    placement: Placement,
    context: int,
    cache_tokens: int,
    headroom: Sequence[int],
    usable: Sequence[int],
    rejected: tuple[Rejection, ...],
    chunk_size: int,
) -> Plan:
    """Assemble the hand-off: per-GPU numbers in MiB against each GPU's real usable memory."""
    gpus = inventory.gpus
    split = winner.split
    if split == "layer" and len(placement.loads) == 1:
        split = "single"
    per_gpu = tuple(
        GpuAllocation(
            index=gpus[load.index].index,
            total_mib=gpus[load.index].total_mib,
            usable_mib=usable[load.index],
            weights_mib=load.weights_mib,
            cache_mib=load.cache_mib,
            overhead_mib=load.overhead_mib,
            free_after_mib=usable[load.index] - load.weights_mib - load.cache_mib - load.overhead_mib,
        )
        for load in placement.loads
    )
    gpu_split = (
        [
            layer_split_gib(usable[load.index], profile, last=load is placement.loads[-1])
            for load in placement.loads
        ]
        if split == "layer"
        else None
    )
    quant = winner.quant
    return Plan(
        profile=profile.name,
        hf_repo=profile.hf_repo,
        quant=quant.branch,
        bpw=quant.bpw,
        weights_gib=round(weights_bytes(profile.architecture, quant) / GIB, 2),
        context=context,
        max_context=min(winner.max_cache_tokens, profile.architecture.max_position_embeddings),
        cache_size=cache_tokens,
        cache_mode=winner.mode.label,
        split=split,
        gpu_split=gpu_split,
        chunk_size=chunk_size,
        headroom_mib=max(headroom[load.index] for load in placement.loads),
        per_gpu=per_gpu,
        expected=Expected(kl=quant.kl_ref_quant, top1=quant.top1, ppl=quant.ppl),
        rejected=rejected,
        inventory=inventory,
        stack=stack,
    )

"""Plan: the planner's typed result, the hand-off to render and deploy (JSON round-trips exactly)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..detect.inventory import GpuInventory
from ..facts.profiles import UncalibratedMargin

SPLITS = ("single", "tp", "layer")


@dataclass(frozen=True)
class GpuAllocation:
    """What the plan puts on one GPU, in MiB."""

    index: int
    total_mib: int
    usable_mib: int
    weights_mib: int
    cache_mib: int
    overhead_mib: int
    free_after_mib: int


@dataclass(frozen=True)
class Expected:
    """The quality the chosen quant measured on the card (KL vs FP16, top-1 agreement, perplexity)."""

    kl: float
    top1: float
    ppl: float


@dataclass(frozen=True)
class Rejection:
    """A candidate quant that lost, with the number that decided it."""

    quant: str
    reason: str
    short_by_mib: int


@dataclass(frozen=True)
class Stack:
    """The serving stack the plan is for (profiles/tabbyapi.yaml) and the memory calibration it was sized with."""

    tabbyapi: str  # the TabbyAPI commit (full SHA when it is the pinned one) or tag the image builds
    exllamav3: str  # the exllamav3 version the image installs ("1.6.5")
    torch: str  # "2.9.0+cu128"
    cuda: str  # the CUDA variant of the image: "12" | "13"
    python: str  # "3.12"
    calibration: str  # the exllamav3 version whose measured memory terms sized the plan
    calibrated: bool  # False: the terms were measured on another stack (--allow-uncalibrated)
    uncalibrated_margin: UncalibratedMargin | None  # kept free on top of the headroom when not calibrated


@dataclass(frozen=True)
class Download:
    """A branch to download, in GB (10^9 bytes) as the hub shows it: VRAM weights plus the embedding."""

    branch: str
    gb: float


@dataclass(frozen=True)
class MixProposal:
    """A mix of two published branches that would fill the memory the chosen quant leaves unused at the required
    context (toolkit/plan/gap.py); advice, not part of what is deployed."""

    lower: str  # the chosen branch: the mix's base (its lm_head too, unless the recipe takes the upper's)
    upper: str  # the larger branch tensors are taken from
    target_gib: (
        float  # the mix's exact VRAM weights at most (the budget rounded down, minus the profile's margin)
    )
    budget_gib: float  # the largest weights that fit at the required context, cache mode and split
    free_gib_before: float  # the budget the chosen branch leaves unused
    free_gib_after: float  # what the mix at its target leaves
    expected_kl: float  # KL(FP16 || mix), an estimate (kl_basis says how it was made)
    kl_basis: str
    head_bits: int  # the lower's lm_head bits, which the mix keeps
    downloads: tuple[Download, ...]  # lower and upper

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class PlannedMix:
    """The mixed-precision quant a plan deploys (plan.quant is its name): assembled at fetch time from two published
    branches by a recipe of profiles/quant_mix.yaml (toolkit/plan/mix_quant.py; the commits are pinned at fetch)."""

    name: str  # the model folder and the served model id: mix-<lower>-<upper>-<target>GiB
    lower: str  # the smaller branch: the mix's base (its lm_head too)
    upper: str  # the larger branch tensors are taken from
    recipe: str  # a recipe of profiles/quant_mix.yaml
    recipe_sha256: str  # the hash of its units (toolkit.quant.recipe.Recipe.sha256), recorded in mix.json too
    target_gib: float  # VRAM weights at most: the memory plan's weights
    expected_kl: float  # KL(FP16 || mix), an estimate (kl_basis says how it was made)
    kl_basis: str
    head_bits: int  # the lower's lm_head bits, which the mix keeps
    downloads: tuple[Download, ...]  # lower and upper

    @property
    def spec(self) -> str:
        """The mix as `--quant` names it: mix:LOWER+UPPER@GIB."""
        return f"mix:{self.lower}+{self.upper}@{self.target_gib:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Everything needed to render and run one TabbyAPI deployment."""

    profile: str
    hf_repo: str
    quant: str
    bpw: float
    weights_gib: float
    context: int  # TabbyAPI max_seq_len
    max_context: int  # the largest context this quant fits with on these GPUs
    cache_size: int  # TabbyAPI cache_size: a multiple of 256, >= context
    cache_mode: str  # TabbyAPI spelling: "FP16" or "6,5"
    split: str  # single | tp | layer
    gpu_split: list[float] | None  # GB per GPU as TabbyAPI's gpu_split expects, or None
    chunk_size: int
    headroom_mib: int
    per_gpu: tuple[GpuAllocation, ...]
    expected: Expected
    rejected: tuple[Rejection, ...]
    inventory: GpuInventory
    stack: Stack
    mix_proposal: MixProposal | None = (
        None  # in the JSON only when there is one (older plans stay byte-identical)
    )
    mix: PlannedMix | None = (
        None  # the deployed quant is this mix (in the JSON only then; part of the digest)
    )

    @property
    def device_ids(self) -> list[str]:
        """The GPUs the container must get: UUIDs when known (stable across reboots), else indices."""
        by_index = {gpu.index: gpu for gpu in self.inventory.gpus}
        return [
            by_index[a.index].uuid or str(a.index) if a.index in by_index else str(a.index)
            for a in self.per_gpu
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the `deploy plan --json` contract."""
        data = asdict(self)
        data["inventory"] = self.inventory.to_dict()
        for optional in ("mix_proposal", "mix"):
            if data[optional] is None:
                del data[optional]
        return data

    def digest(self) -> str:
        """A stable hash of what the plan deploys (labels the image and the deployment): the mix proposal, advice
        that changes nothing the image or the container runs, is left out."""
        deployed = {key: value for key, value in self.to_dict().items() if key != "mix_proposal"}
        canonical = json.dumps(deployed, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from `deploy plan --json` output; a field of the wrong type (a number as text, a
        fraction where a count belongs, a boolean, NaN) is a TypeError or ValueError naming it, never coerced.
        What the values mean (the quant, the GPUs, the memory) is plan.check.check_plan's."""
        return cls(
            profile=_typed(data, "profile", str),
            hf_repo=_typed(data, "hf_repo", str),
            quant=_typed(data, "quant", str),
            bpw=_number(data, "bpw"),
            weights_gib=_number(data, "weights_gib"),
            context=_typed(data, "context", int),
            max_context=_typed(data, "max_context", int),
            cache_size=_typed(data, "cache_size", int),
            cache_mode=_typed(data, "cache_mode", str),
            split=_typed(data, "split", str),
            gpu_split=None
            if data["gpu_split"] is None
            else [_number({"gpu_split": x}, "gpu_split") for x in _typed(data, "gpu_split", (list, tuple))],
            chunk_size=_typed(data, "chunk_size", int),
            headroom_mib=_typed(data, "headroom_mib", int),
            per_gpu=tuple(
                GpuAllocation(**{name: _typed(a, name, int) for name in GpuAllocation.__dataclass_fields__})
                for a in _typed(data, "per_gpu", (list, tuple))
            ),
            expected=Expected(**data["expected"]),
            rejected=tuple(Rejection(**r) for r in data["rejected"]),
            inventory=GpuInventory.from_dict(data["inventory"]),
            stack=_stack(data["stack"]),
            mix_proposal=_mix_proposal(data.get("mix_proposal")),
            mix=_planned_mix(data.get("mix")),
        )


def _mix_proposal(data: Any) -> MixProposal | None:
    """The plan's mix proposal, each field of its type (plan.check.check_plan checks what they mean)."""
    if data is None:
        return None
    proposal = _typed({"mix_proposal": data}, "mix_proposal", dict)
    return MixProposal(
        lower=_typed(proposal, "lower", str),
        upper=_typed(proposal, "upper", str),
        target_gib=_number(proposal, "target_gib"),
        budget_gib=_number(proposal, "budget_gib"),
        free_gib_before=_number(proposal, "free_gib_before"),
        free_gib_after=_number(proposal, "free_gib_after"),
        expected_kl=_number(proposal, "expected_kl"),
        kl_basis=_typed(proposal, "kl_basis", str),
        head_bits=_typed(proposal, "head_bits", int),
        downloads=_downloads(proposal),
    )


def _downloads(owner: dict[str, Any]) -> tuple[Download, ...]:
    return tuple(
        Download(
            branch=_typed(d, "branch", str), gb=_number(_typed({"downloads": d}, "downloads", dict), "gb")
        )
        for d in _typed(owner, "downloads", (list, tuple))
    )


def _planned_mix(data: Any) -> PlannedMix | None:
    """The plan's mix, each field of its type (plan.check.check_plan checks what they mean)."""
    if data is None:
        return None
    mix = _typed({"mix": data}, "mix", dict)
    return PlannedMix(
        name=_typed(mix, "name", str),
        lower=_typed(mix, "lower", str),
        upper=_typed(mix, "upper", str),
        recipe=_typed(mix, "recipe", str),
        recipe_sha256=_typed(mix, "recipe_sha256", str),
        target_gib=_number(mix, "target_gib"),
        expected_kl=_number(mix, "expected_kl"),
        kl_basis=_typed(mix, "kl_basis", str),
        head_bits=_typed(mix, "head_bits", int),
        downloads=_downloads(mix),
    )


def _stack(data: Any) -> Stack:
    """The plan's serving stack, each field of its type (render validates what the strings may hold)."""
    stack = _typed({"stack": data}, "stack", dict)
    if not isinstance(stack.get("calibrated"), bool):
        raise TypeError("stack.calibrated must be true or false")
    margin = stack["uncalibrated_margin"]
    return Stack(
        tabbyapi=_typed(stack, "tabbyapi", str),
        exllamav3=_typed(stack, "exllamav3", str),
        torch=_typed(stack, "torch", str),
        cuda=_typed(stack, "cuda", str),
        python=_typed(stack, "python", str),
        calibration=_typed(stack, "calibration", str),
        calibrated=stack["calibrated"],
        uncalibrated_margin=None
        if margin is None
        else UncalibratedMargin(**_typed(stack, "uncalibrated_margin", dict)),
    )


def _typed(data: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    """data[key], which must be of `kind` (an int never a bool, at most 2^53)."""
    if not isinstance(data, dict):
        raise TypeError(f"expected an object holding {key}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and abs(value) > 2**53):
        name = kind.__name__ if isinstance(kind, type) else "list"
        raise TypeError(f"{key} must be {name}, got {value!r:.40}")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    """data[key] as a finite float (an int is fine)."""
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r:.40}")
    return float(value)


@dataclass(frozen=True)
class ChunkTrade:
    """Why a plan's chunk_size is below the profile's: the required context did not fit at the default, and the
    smaller prefill chunk's memory bought it (not part of the hand-off: plan.chunk_size is the decision)."""

    default_chunk_size: int
    chunk_size: int
    required_context: int
    default_max_context: (
        int  # what the chosen quant and cache mode reach at the default chunk_size (0: nothing)
    )
    max_context: int  # what they reach at chunk_size
    prefill_vs_default: tuple[float, ...]  # measured prefill speed at chunk_size over the default's, per run

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; None means "let the planner choose" (only unset things are filled in)."""

    context: int | None = None  # required minimum context; None = the profile's default minimum
    context_max: bool = False  # `--context max`: require the model's maximum context
    cache: str = "auto"  # "auto", "FP16" or "k,v"
    quant: str | None = None  # fix the quant (a branch, or a mix: mix:LOWER+UPPER@GIB) and maximize context
    mix: bool = False  # `--mix`: deploy the mix the planner proposes for these GPUs (plan.mix_proposal)
    split: str = "auto"  # auto | tp | layer
    headroom_mib: int | None = None  # per-GPU safety margin; None = the documented default
    cuda: str = "auto"  # CUDA variant of the image: auto (from the driver) | 13 | 12
    tabby_ref: str | None = None  # TabbyAPI commit or tag; None = the pinned one
    exllamav3: str | None = None  # exllamav3 version of the stack; None = the pinned one
    allow_uncalibrated: bool = False  # plan a stack without its own memory calibration (adds a margin)

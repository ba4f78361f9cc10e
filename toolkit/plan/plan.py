"""Plan: the planner's typed result, the hand-off to render and deploy (JSON round-trips exactly)."""

from __future__ import annotations

import hashlib
import json
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
        return data

    def digest(self) -> str:
        """A stable hash of the plan (labels the image and the deployment)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from `deploy plan --json` output (KeyError/TypeError on a malformed one)."""
        return cls(
            profile=data["profile"],
            hf_repo=data["hf_repo"],
            quant=data["quant"],
            bpw=float(data["bpw"]),
            weights_gib=float(data["weights_gib"]),
            context=int(data["context"]),
            max_context=int(data["max_context"]),
            cache_size=int(data["cache_size"]),
            cache_mode=str(data["cache_mode"]),
            split=data["split"],
            gpu_split=None if data["gpu_split"] is None else [float(x) for x in data["gpu_split"]],
            chunk_size=int(data["chunk_size"]),
            headroom_mib=int(data["headroom_mib"]),
            per_gpu=tuple(GpuAllocation(**a) for a in data["per_gpu"]),
            expected=Expected(**data["expected"]),
            rejected=tuple(Rejection(**r) for r in data["rejected"]),
            inventory=GpuInventory.from_dict(data["inventory"]),
            stack=_stack(data["stack"]),
        )


def _stack(data: dict[str, Any]) -> Stack:
    margin = data["uncalibrated_margin"]
    return Stack(
        tabbyapi=str(data["tabbyapi"]),
        exllamav3=str(data["exllamav3"]),
        torch=str(data["torch"]),
        cuda=str(data["cuda"]),
        python=str(data["python"]),
        calibration=str(data["calibration"]),
        calibrated=bool(data["calibrated"]),
        uncalibrated_margin=None if margin is None else UncalibratedMargin(**margin),
    )


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
    quant: str | None = None  # fix the quant and maximize context
    split: str = "auto"  # auto | tp | layer
    headroom_mib: int | None = None  # per-GPU safety margin; None = the documented default
    cuda: str = "auto"  # CUDA variant of the image: auto (from the driver) | 13 | 12
    tabby_ref: str | None = None  # TabbyAPI commit or tag; None = the pinned one
    exllamav3: str | None = None  # exllamav3 version of the stack; None = the pinned one
    allow_uncalibrated: bool = False  # plan a stack without its own memory calibration (adds a margin)

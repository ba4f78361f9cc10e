"""A quant's exact sizes as a report: per tensor group and per run of like layers, and the card's figure beside it.

The model card prints each branch's VRAM weights rounded to whole GiB (profiles/*.yaml size_gib), so an exact size
within half a GiB of it agrees; anything further is flagged (tests/unit/quant/test_card_sizes.py checks that
exllamav3's storage rules reproduce every uniform GLM-4.7 branch on the card within that rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..facts.profiles import ModelProfile
from .storage import RAM_GROUPS, QuantStorage

GIB = 2**30
CARD_ROUNDING_GIB = 0.5  # the card rounds sizes to whole GiB
LAYER_COLUMNS = ("attention", "shared_experts", "routed_gate_up", "routed_down", "dense_mlp")


@dataclass(frozen=True)
class CardCheck:
    """The card's size of a branch beside the exact size read from its files."""

    branch: str
    card_gib: float
    exact_gib: float

    @property
    def difference_gib(self) -> float:
        """Exact minus card."""
        return self.exact_gib - self.card_gib

    @property
    def agrees(self) -> bool:
        """Within the card's rounding to whole GiB."""
        return abs(self.difference_gib) <= CARD_ROUNDING_GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "branch": self.branch,
            "card_gib": self.card_gib,
            "exact_gib": round(self.exact_gib, 3),
            "difference_gib": round(self.difference_gib, 3),
            "tolerance_gib": CARD_ROUNDING_GIB,
            "agrees": self.agrees,
        }


def card_check(storage: QuantStorage, profile: ModelProfile, branch: str | None) -> CardCheck | None:
    """The comparison with the card's size of `branch`; None when the branch is not on the card."""
    quant = next((q for q in profile.quants if q.branch == branch), None)
    if quant is None:
        return None
    return CardCheck(quant.branch, quant.size_gib, storage.vram_bytes / GIB)


@dataclass(frozen=True)
class LayerRun:
    """Consecutive layers that store the same bytes at the same bits per group."""

    first: int
    last: int
    bytes_each: int
    bits: dict[str, float]  # group -> bits per weight

    @property
    def count(self) -> int:
        """Layers in the run."""
        return self.last - self.first + 1


def layer_runs(storage: QuantStorage) -> list[LayerRun]:
    """The layers, consecutive ones with equal bytes and bits merged (a uniform quant: dense layers, MoE layers)."""
    sizes = storage.by_layer()
    bits = storage.layer_group_bits()
    runs: list[LayerRun] = []
    for layer, size in sizes.items():
        layer_bits = bits.get(layer, {})
        last = runs[-1] if runs else None
        if last and last.last == layer - 1 and last.bytes_each == size and last.bits == layer_bits:
            runs[-1] = LayerRun(last.first, layer, size, layer_bits)
        else:
            runs.append(LayerRun(layer, layer, size, layer_bits))
    return runs


def sizes_report(storage: QuantStorage, source: dict[str, Any], card: CardCheck | None) -> dict[str, Any]:
    """The JSON form of `deploy quant sizes`: groups, layer runs, totals and the card comparison."""
    vram = storage.vram_bytes
    group_bits = storage.group_bits()
    groups = [
        {
            "group": group,
            "memory": "ram" if group in RAM_GROUPS else "vram",
            "bytes": size,
            "gib": round(size / GIB, 3),
            "share": None if group in RAM_GROUPS or not vram else round(size / vram, 4),
            "bits": None if group not in group_bits else round(group_bits[group], 3),
        }
        for group, size in storage.by_group().items()
    ]
    layers = [
        {
            "first": run.first,
            "last": run.last,
            "count": run.count,
            "bytes_each": run.bytes_each,
            "gib_each": round(run.bytes_each / GIB, 4),
            "bits": {group: round(value, 3) for group, value in run.bits.items()},
        }
        for run in layer_runs(storage)
    ]
    return {
        "source": source,
        "quant": {
            "bits": storage.bits,
            "head_bits": storage.head_bits,
            "codebook": storage.codebook,
            "version": storage.version,
            "architecture": storage.architecture,
            "modules": len(storage.modules),
        },
        "vram_bytes": vram,
        "vram_gib": round(vram / GIB, 3),
        "embedding_bytes": storage.embedding_bytes,
        "groups": groups,
        "layers": layers,
        "card": None if card is None else card.to_dict(),
    }

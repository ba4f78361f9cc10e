"""Parse `--gpus` specs ("8x24GiB", "4xRTX5090", "24GiB,24GiB,48GiB") into a GpuInventory for planning.

Grammar (case-insensitive, spaces ignored):

    spec  := group ("," group)*
    group := [COUNT "x"] (size | card)          COUNT in 1..64
    size  := NUMBER unit                         NUMBER may have a fraction: "23.5GiB"
    unit  := "GiB" (2^30 B) | "MiB" (2^20 B) | "GB" (10^9 B) | "MB" (10^6 B)
    card  := a name from profiles/gpus.yaml ("RTX5090", "H200", "RTX PRO 6000")

Sizes are converted to whole MiB, rounded down (24GB = 22888 MiB). A bare number or "G"/"M" is rejected because
it is ambiguous between decimal and binary units. A spec GPU is assumed empty: free = total (NVML's total for a
card), so the planner plans on its whole memory minus the headroom.
"""

from __future__ import annotations

import re

from ..errors import BadInput
from ..facts.gpu_cards import MAX_GPU_MIB, load_gpu_table, normalize_card_name
from .inventory import Gpu, GpuInventory

MAX_GPUS = 64
MAX_SPEC_CHARS = 1000  # 64 groups of a card name each
UNIT_BYTES = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6}
_GROUP = re.compile(r"^(?:(?P<count>\d+)x)?(?P<what>.+)\Z", re.IGNORECASE)
_SIZE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>[a-z]+)\Z", re.IGNORECASE)


def _size_mib(number: str, unit: str, group: str) -> int:
    """Exact unit conversion to whole MiB (rounded down)."""
    factor = UNIT_BYTES.get(unit.lower())
    if factor is None:
        raise BadInput(
            f"GPU spec {group!r}: unknown unit {unit!r}",
            "write GiB (2^30 bytes), MiB, GB (10^9 bytes) or MB, e.g. 24GiB",
        )
    whole, _, fraction = number.partition(".")
    scale = 10 ** len(fraction)
    mib = (int(whole + fraction) * factor) // (scale * 2**20)
    if not 0 < mib <= MAX_GPU_MIB:
        raise BadInput(
            f"GPU spec {group!r}: {mib} MiB is not a plausible GPU memory size",
            "give each GPU's memory, e.g. 24GiB",
        )
    return mib


def _group(group: str, table: dict[str, tuple[str, int]]) -> tuple[int, str, int]:
    """One comma-separated group -> (count, name, MiB)."""
    match = _GROUP.match(group)
    if not match or not group:
        raise BadInput(f"GPU spec {group!r} is empty", "e.g. --gpus 8x24GiB, 4xRTX5090 or 24GiB,48GiB")
    if re.fullmatch(r"\d+x", group, re.IGNORECASE):
        raise BadInput(f"GPU spec {group!r} names no GPU", f"e.g. {group}24GiB or {group}RTX4090")
    count = int(match["count"]) if match["count"] else 1
    what = match["what"]
    card = table.get(normalize_card_name(what))
    if card is not None:
        return count, card[0], card[1]
    size = _SIZE.match(what)
    if size:
        return count, what, _size_mib(size["number"], size["unit"], group)
    if re.fullmatch(r"\d+(?:\.\d+)?", what):
        raise BadInput(
            f"GPU spec {group!r} has no unit", f"write {what}GiB (2^30 bytes) or {what}GB (10^9 bytes)"
        )
    known = ", ".join(sorted({name for name, _ in table.values()}))
    raise BadInput(f"unknown GPU {what!r} in --gpus", f"use a size such as 24GiB or one of: {known}")


def parse_gpu_spec(spec: str, table: dict[str, tuple[str, int]] | None = None) -> GpuInventory:
    """Turn a --gpus spec into an inventory of empty GPUs (free = total), numbered 0..n-1 in spec order."""
    table = load_gpu_table() if table is None else table
    if len(spec) > MAX_SPEC_CHARS or re.search(r"\d{13}", spec):
        raise BadInput(
            f"GPU spec {spec[:40]!r}... is too long (or has a number of 13 digits or more)",
            "e.g. --gpus 8x24GiB, 4xRTX5090 or 24GiB,24GiB,48GiB",
        )
    compact = re.sub(r"\s+", "", spec)
    if not compact:
        raise BadInput("empty --gpus spec", "e.g. --gpus 8x24GiB, 4xRTX5090 or 24GiB,24GiB,48GiB")
    gpus: list[Gpu] = []
    for group in compact.split(","):
        count, name, mib = _group(group, table)
        if not 1 <= count <= MAX_GPUS or len(gpus) + count > MAX_GPUS:
            raise BadInput(
                f"GPU spec {spec!r} asks for {len(gpus) + count} GPUs",
                f"plan for 1 to {MAX_GPUS} GPUs per host",
            )
        first = len(gpus)
        gpus.extend(Gpu(index=first + i, name=name, total_mib=mib, free_mib=mib) for i in range(count))
    return GpuInventory(gpus=tuple(gpus), source="spec", extra={"spec": spec})

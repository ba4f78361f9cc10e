"""The GPU card table (profiles/gpus.yaml): memory of common cards as NVML reports it, and their memory bandwidth,
looked up by name."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from ..errors import BadInput
from .paths import PROFILES_DIR

GPU_TABLE = PROFILES_DIR / "gpus.yaml"
MAX_GPU_MIB = 16 * 2**20  # 16 TiB: anything larger is a typo


def normalize_card_name(name: str) -> str:
    """Card names match case-insensitively with spaces, dashes and underscores removed."""
    return re.sub(r"[\s_-]", "", name).lower()


def parse_gpu_table(data: Any, source: Path) -> dict[str, tuple[str, int]]:
    """Validate the GPU table's YAML: {normalized name: (display name, total MiB)}."""

    def fail(field: str, problem: str) -> BadInput:
        return BadInput(f"GPU table {source}: field {field!r} {problem}", "fix the GPU table file")

    if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict) or not data["gpus"]:
        raise fail("gpus", "must be a non-empty mapping of card name to total MiB")
    table: dict[str, tuple[str, int]] = {}
    for name, mib in data["gpus"].items():
        if not isinstance(name, str) or not normalize_card_name(name):
            raise fail(f"gpus.{name}", "must be a card name")
        if isinstance(mib, bool) or not isinstance(mib, int) or not 0 < mib <= MAX_GPU_MIB:
            raise fail(f"gpus.{name}", f"must be a positive integer of MiB, got {mib!r}")
        table[normalize_card_name(name)] = (name, mib)
    return table


@lru_cache(maxsize=4)
def load_gpu_table(path: Path = GPU_TABLE) -> dict[str, tuple[str, int]]:
    """Read and validate profiles/gpus.yaml once per process."""
    try:
        data = yaml.load(
            path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        )
    except OSError as exc:
        raise BadInput(
            f"GPU table {path} cannot be read ({exc.strerror})", "restore profiles/gpus.yaml"
        ) from None
    except yaml.YAMLError:
        raise BadInput(f"GPU table {path} is not valid YAML", "fix the GPU table file") from None
    return parse_gpu_table(data, path)


def parse_bandwidth_table(data: Any, source: Path) -> dict[str, float]:
    """The bandwidth_gb_s mapping of the GPU table: {normalized card name: GB/s}."""
    raw = data.get("bandwidth_gb_s") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise BadInput(
            f"GPU table {source}: field 'bandwidth_gb_s' must map card names to GB/s",
            "fix the GPU table file",
        )
    table: dict[str, float] = {}
    for name, gb_s in raw.items():
        if (
            not isinstance(name, str)
            or isinstance(gb_s, bool)
            or not isinstance(gb_s, (int, float))
            or gb_s <= 0
        ):
            raise BadInput(
                f"GPU table {source}: field 'bandwidth_gb_s.{name}' must be a positive number of GB/s, got "
                f"{gb_s!r}",
                "fix the GPU table file",
            )
        table[normalize_card_name(name)] = float(gb_s)
    return table


@lru_cache(maxsize=4)
def load_bandwidth_table(path: Path = GPU_TABLE) -> dict[str, float]:
    """Read the bandwidth mapping of profiles/gpus.yaml once per process."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raise BadInput(f"GPU table {path} cannot be read", "restore profiles/gpus.yaml") from None
    return parse_bandwidth_table(data, path)


MEMORY_MATCH = 0.02  # a detected GPU's total memory must be within 2 % of the card's to borrow its bandwidth


def card_bandwidth_gb_s(name: str, total_mib: int, path: Path = GPU_TABLE) -> float | None:
    """The memory bandwidth of a GPU from its name: a card name exactly (a --gpus card), else the longest card
    name inside an NVML name ("NVIDIA GeForce RTX 4090" -> RTX4090) whose table memory, where the table has it,
    matches the GPU's (an A100 40GB is not the A100 80GB). None when unknown (a --gpus size such as 24GiB)."""
    bandwidths = load_bandwidth_table(path)
    memories = load_gpu_table(path)
    wanted = normalize_card_name(name)
    if wanted in bandwidths:
        return bandwidths[wanted]
    matches = sorted((key for key in bandwidths if key in wanted), key=len, reverse=True)
    for key in matches[:1]:
        card = memories.get(key)
        if card is None or abs(card[1] - total_mib) <= MEMORY_MATCH * card[1]:
            return bandwidths[key]
    return None

"""The GPU card table (profiles/gpus.yaml): memory of common cards as NVML reports it, looked up by name."""

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

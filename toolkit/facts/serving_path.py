"""The serving-path KL bound per cache mode (profiles/serving_path.yaml): measured data in, the KL threshold out.

A deployment reference is exllamav3 computing the deployed weights in-process; what TabbyAPI serves from the same
weights differs from it only by the serving path (paged cache in the server's cache mode, batched one-token jobs,
the build). The YAML holds, per cache mode, what that difference measured; bound() applies the file's one rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import BadInput
from .paths import PROFILES_DIR

SERVING_PATH_FILE = PROFILES_DIR / "serving_path.yaml"
# bound = max(BOUND_FACTOR x ci95_high, ci95_high + BOUND_MARGIN_NATS): the rule the YAML's header justifies.
BOUND_FACTOR = 1.5
BOUND_MARGIN_NATS = 0.002
_MODE = re.compile(r"^(FP16|[2-8],[2-8])$")


@dataclass(frozen=True)
class ModeMeasurement:
    """What serving the referenced weights with one cache mode read: mean KL and its upper 95 % bound."""

    cache_mode: str
    mean: float
    ci95_high: float
    source: str

    @property
    def bound(self) -> float:
        """The KL check's threshold for this mode (the rule above)."""
        return max(BOUND_FACTOR * self.ci95_high, self.ci95_high + BOUND_MARGIN_NATS)


@dataclass(frozen=True)
class ServingPathBound:
    """The threshold for one planned cache mode and split, with where it comes from (shown with the check)."""

    value: float
    source: str


@dataclass(frozen=True)
class ServingPath:
    """The table: measured cache modes, whether the values are provisional, and what they were measured with."""

    status: str  # "measured" | "provisional"
    measured_with: str
    modes: tuple[ModeMeasurement, ...]

    def bound(self, cache_mode: str, split: str | None = None) -> ServingPathBound:
        """The bound for a canonical cache mode ("FP16", "5,4"); unmeasured modes borrow a lower-precision row."""
        if not _MODE.match(cache_mode):
            raise BadInput(
                f"cache mode {cache_mode!r} is not TabbyAPI's canonical spelling", "e.g. FP16 or 5,4"
            )
        rows = sorted(self.modes, key=lambda m: precision_bits(m.cache_mode), reverse=True)
        exact = next((m for m in rows if m.cache_mode == cache_mode), None)
        below = [m for m in rows if precision_bits(m.cache_mode) <= precision_bits(cache_mode)]
        row = exact or (below[0] if below else rows[-1])
        notes = [f"serving-path bound for cache {cache_mode}: {row.bound:.4g} nats"]
        if exact is None:
            how = (
                "fewer bits, looser"
                if below
                else "more bits: below every measured mode, may fail a healthy one"
            )
            notes.append(f"cache {cache_mode} not measured, using {row.cache_mode}'s row ({how})")
        notes.append(f"measured {row.mean:.4g}, 95% CI high {row.ci95_high:.4g}")
        if split not in (None, "single"):
            notes.append(f"measured on one GPU, split {split} not measured")
        if self.status != "measured":
            notes.append(f"{self.status.upper()} values")
        notes.append(row.source)
        return ServingPathBound(row.bound, "; ".join(notes))


def precision_bits(cache_mode: str) -> int:
    """Bits per K/V element pair that order the modes: 32 for FP16, k + v for "k,v"."""
    if cache_mode == "FP16":
        return 32
    k_bits, v_bits = cache_mode.split(",")
    return int(k_bits) + int(v_bits)


@lru_cache(maxsize=4)
def load_serving_path(path: Path = SERVING_PATH_FILE) -> ServingPath:
    """Read and check the table; a broken file is bad input naming the field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise BadInput(f"cannot read {path}: {error}", "restore profiles/serving_path.yaml") from None
    if not isinstance(data, dict) or data.get("status") not in ("measured", "provisional"):
        raise BadInput(f"{path}: status must be measured or provisional", "fix the file")
    raw_modes = data.get("cache_modes")
    if not isinstance(raw_modes, dict) or not raw_modes:
        raise BadInput(f"{path}: cache_modes is empty", "fix the file")
    modes = []
    for mode, row in raw_modes.items():
        if not _MODE.match(str(mode)) or not isinstance(row, dict):
            raise BadInput(f"{path}: cache mode {mode!r} must be FP16 or K,V with a mapping", "fix the file")
        try:
            mean, high = float(row["mean"]), float(row["ci95_high"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path}: {mode} needs numeric mean and ci95_high", "fix the file") from None
        if not 0 <= mean <= high:
            raise BadInput(f"{path}: {mode} needs 0 <= mean <= ci95_high", "fix the file")
        modes.append(ModeMeasurement(str(mode), mean, high, str(row.get("source") or path.name)))
    return ServingPath(str(data["status"]), str(data.get("measured_with") or ""), tuple(modes))

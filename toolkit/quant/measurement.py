"""A measurement file of exllamav3's measure step, checked against the sources it is to be used with.

exllamav3's conversion/measure_model writes, per group of modules, the KL change and the bit change of taking
the group from each higher-bitrate quant ({base, alts, base_kld, groups: [{layers, candidates: [{dkld, dbits}]}]});
its optimizer spends a bit budget greedily by KL gain per bit. The bit changes are exact for the quants it measured,
so they are compared with these sources' stored bytes: a measurement of other quants would size the mix wrongly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from .. import inputs
from ..errors import BadInput
from .recipe import Source

MEASUREMENT_BYTES = 64 * inputs.MIB
_HINT = "measure these sources with exllamav3's measure step, or leave --measurement out to use a recipe"


@dataclass(frozen=True)
class Measurement:
    """A checked measurement: its bytes (copied as they are for the entry point), hash and group count."""

    path: Path
    data: bytes
    groups: int
    layers: frozenset[str]  # every module the measurement covers
    # Modules of groups whose every candidate measured no KL change: exllamav3's greedy only takes a group that
    # lowers KL, so it never spends bits there (1.6.5's measure step reports 0.0 for routed-expert groups).
    flat_layers: frozenset[str]

    @property
    def sha256(self) -> str:
        """What the manifest records."""
        return hashlib.sha256(self.data).hexdigest()


def read_measurement(path: Path, sources: list[Source]) -> Measurement:
    """The file at path, if it measured exactly these sources (lowest first); else exit 2 naming the difference."""
    data = inputs.read_bytes(path, "--measurement", MEASUREMENT_BYTES)
    document = inputs.parse_json(inputs.decode(data, "--measurement", path), "--measurement", path)
    groups = document.get("groups") if isinstance(document, dict) else None
    if not isinstance(groups, list) or not groups or not _finite(document.get("base_kld")):
        raise BadInput(f"--measurement {path} is not a measurement (groups, base_kld)", _HINT)
    base = sources[0][1]
    alternatives = len(sources) - 1
    claimed: set[str] = set()
    flat: set[str] = set()
    for index, group in enumerate(groups):
        layers = group.get("layers") if isinstance(group, dict) else None
        candidates = group.get("candidates") if isinstance(group, dict) else None
        if not isinstance(layers, list) or not layers or not isinstance(candidates, list):
            raise BadInput(f"--measurement {path}: group {index} has no layers or candidates", _HINT)
        for key in layers:
            module = base.modules.get(key) if isinstance(key, str) else None
            if module is None or module.bits is None:
                raise BadInput(
                    f"--measurement {path}: group {index} names {str(key)[:80]!r}, not a quantized module here",
                    _HINT,
                )
            if key in claimed:
                raise BadInput(f"--measurement {path}: {key} is in two groups", _HINT)
            claimed.add(key)
        if len(candidates) != alternatives:
            raise BadInput(
                f"--measurement {path} measured {len(candidates)} higher quant(s), {alternatives} are given",
                _HINT,
            )
        for (sid, storage), candidate in zip(sources[1:], candidates):
            dbits = candidate.get("dbits") if isinstance(candidate, dict) else None
            if not _finite(dbits) or not _finite(candidate.get("dkld")):
                raise BadInput(f"--measurement {path}: group {index} has a malformed candidate", _HINT)
            expected = 8 * sum(storage.modules[k].n_bytes - base.modules[k].n_bytes for k in layers)
            if dbits != expected:
                raise BadInput(
                    f"--measurement {path} was made from other quants: group {index} from {sid} adds "
                    f"{dbits} bits there, {expected} bits with these sources",
                    _HINT,
                )
        if all(candidate["dkld"] == 0 for candidate in candidates):
            flat.update(layers)
    return Measurement(path, data, len(groups), frozenset(claimed), frozenset(flat))


def measured_range(sources: list[Source], measurement: Measurement) -> tuple[int, int]:
    """VRAM bytes of the base, and of the base with every measured module from the highest source."""
    base, top = sources[0][1], sources[-1][1]
    extra = sum(top.modules[k].n_bytes - base.modules[k].n_bytes for k in measurement.layers)
    return base.vram_bytes, base.vram_bytes + extra


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""The instrument's own limit: how many requests/s and streamed tokens/s this load generator can take at all,
measured against a server that answers instantly (benchmarks/bench_ceiling/), stored as data with its machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..facts.paths import PROFILES_DIR
from .metrics import LevelMetrics

CEILING_FILE = PROFILES_DIR / "bench_ceiling.yaml"
MARGIN = 2.0  # a measurement within 2x of the ceiling may be the client's limit, not the server's


@dataclass(frozen=True)
class Ceiling:
    """The measured ceiling: requests/s (one-token answers) and streamed tokens/s (one token per event)."""

    requests_per_s: float
    streamed_tokens_per_s: float
    machine: str
    measured: str
    record: str

    def to_dict(self) -> dict[str, Any]:
        """As stored."""
        return asdict(self)


def load_ceiling(path: Path | None = None) -> Ceiling | None:
    """The stored ceiling (CEILING_FILE), or None when it was never measured (the run then cannot warn, and says
    so)."""
    path = path or CEILING_FILE
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return Ceiling(
        requests_per_s=float(data["requests_per_s"]),
        streamed_tokens_per_s=float(data["streamed_tokens_per_s"]),
        machine=str(data["machine"]),
        measured=str(data["measured"]),
        record=str(data["record"]),
    )


def ceiling_warning(ceiling: Ceiling, metrics: LevelMetrics) -> str | None:
    """A warning when a level's request rate or streamed-event rate is within MARGIN of the ceiling.

    Events, not tokens, cost the client work (one parse per event), and the ceiling was measured at one token
    per event, so a level's event rate is compared with the ceiling's tokens/s.
    """
    reasons = []
    if metrics.request_throughput * MARGIN >= ceiling.requests_per_s:
        reasons.append(
            f"{metrics.request_throughput:.1f} requests/s vs a ceiling of {ceiling.requests_per_s:.0f}"
        )
    if metrics.chunk_throughput * MARGIN >= ceiling.streamed_tokens_per_s:
        reasons.append(
            f"{metrics.chunk_throughput:.0f} streamed events/s vs a ceiling of "
            f"{ceiling.streamed_tokens_per_s:.0f}"
        )
    if not reasons:
        return None
    return (
        f"within {MARGIN:g}x of the load generator's own ceiling ({'; '.join(reasons)}; measured on "
        f"{ceiling.machine}): this level may measure the client, not the server"
    )

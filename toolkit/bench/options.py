"""The benchmark's settings, parsed from the command line's strings so that bad input is one line (exit 2)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import BadInput
from .metrics import SLO_METRICS

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_CONCURRENCY = (1, 2, 4, 8)
PROMPTS_PER_CONCURRENCY = 4  # default requests per level: 4 per concurrent slot, so every slot is reused
DURATION_PROMPTS_PER_CONCURRENCY = 64  # with --duration the time ends a level; this only bounds it
MAX_CONCURRENCY = 1024
MAX_REQUESTS_PER_LEVEL = 100_000


@dataclass(frozen=True)
class BenchRequest:
    """Everything one `deploy bench` run does; the key is kept out of repr so it can never be printed."""

    url: str
    api_key: str | None = field(default=None, repr=False)
    endpoint: str = "completions"
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    input_len: int = 1024
    output_len: int = 128
    num_prompts: int | None = None
    duration_s: float | None = None
    warmup: int = 2
    slo_ms: dict[str, float] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    model: str | None = None
    seed: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The streaming endpoint's path."""
        return ENDPOINTS[self.endpoint]

    def requests_at(self, concurrency: int) -> int:
        """The request bound of one level: --num-prompts, else 4 per concurrent slot (64 with --duration)."""
        if self.num_prompts is not None:
            return self.num_prompts
        per_slot = DURATION_PROMPTS_PER_CONCURRENCY if self.duration_s else PROMPTS_PER_CONCURRENCY
        return per_slot * concurrency

    def max_requests(self) -> int:
        """The most generation requests this run can send (warm-up included): it never sends more."""
        return self.warmup + sum(self.requests_at(c) for c in self.concurrency)


def parse_int(flag: str, text: str, low: int, high: int) -> int:
    """A whole number in [low, high] or bad input naming the flag."""
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"{flag} {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise BadInput(f"{flag} must be between {low} and {high}, got {value}")
    return value


def parse_seconds(flag: str, text: str) -> float:
    """A positive finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"{flag} {text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{flag} must be a positive number of seconds, got {text}")
    return value


def parse_concurrency(text: str) -> tuple[int, ...]:
    """A comma-separated sweep such as 1,2,4,8: distinct levels, kept in the order given."""
    levels = [parse_int("--concurrency", part.strip(), 1, MAX_CONCURRENCY) for part in text.split(",")]
    if len(set(levels)) != len(levels):
        raise BadInput(f"--concurrency {text!r} repeats a level", "give each level once, e.g. 1,2,4,8")
    return tuple(levels)


def parse_slo(text: str) -> dict[str, float]:
    """`ttft:MS,tpot:MS[,e2el:MS]` (vLLM's --goodput names), milliseconds, each at most once."""
    slo: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in SLO_METRICS:
            raise BadInput(
                f"--slo {part.strip()!r} is not NAME:MS",
                f"names are {', '.join(SLO_METRICS)}, e.g. --slo ttft:2000,tpot:100",
            )
        if name in slo:
            raise BadInput(f"--slo names {name} twice")
        try:
            limit = float(value)
        except ValueError:
            raise BadInput(f"--slo {name}:{value!r} is not a number of milliseconds") from None
        if not (math.isfinite(limit) and limit > 0):
            raise BadInput(f"--slo {name} must be a positive number of milliseconds, got {value}")
        slo[name] = limit
    return slo


METADATA_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}\Z")


def parse_metadata(items: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs recorded with the result (vLLM's --metadata), e.g. tabbyapi=e632af4 exllamav3=1.4.2."""
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not METADATA_KEY.match(key):
            raise BadInput(
                f"--metadata {item!r} is not KEY=VALUE", "e.g. --metadata tabbyapi=e632af4 exllamav3=1.4.2"
            )
        metadata[key] = value
    return metadata

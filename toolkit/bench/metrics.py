"""Per-request measurements and the per-level statistics `vllm bench serve` reports, as pure functions.

Definitions follow vLLM's calculate_metrics: TTFT = send to first streamed text; E2EL = send to end of stream;
TPOT = (E2EL - TTFT) / (output tokens - 1) per request; ITL = the gaps between successive text-bearing chunks
(a chunk can carry several tokens, so ITL is per chunk, TPOT per token); throughputs over the level's wall time;
goodput = requests per second meeting every SLO (a request with one output token has TPOT 0).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; times in seconds, start relative to the level's start."""

    ok: bool
    start_s: float
    latency_s: float
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    text_chunks: int = 0
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tokens_from_usage: bool = False
    error: str | None = None

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first; 0 with one token or fewer (vLLM's goodput rule)."""
        if self.ttft_s is None or self.output_tokens <= 1:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Distribution:
    """Mean, median, population standard deviation and percentiles of one latency metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: tuple[tuple[int, float], ...]

    def percentile_ms(self, q: int) -> float:
        """The recorded q-th percentile."""
        return dict(self.percentiles_ms)[q]


def distribution(values_s: Sequence[float], percentiles: Sequence[int] = PERCENTILES) -> Distribution | None:
    """Statistics of values given in seconds; None when there are none (reported as null, never as 0)."""
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    return Distribution(
        mean_ms=statistics.fmean(ms),
        median_ms=statistics.median(ms),
        std_ms=statistics.pstdev(ms),
        percentiles_ms=tuple((q, percentile(ms, q)) for q in percentiles),
    )


def max_concurrent(records: Sequence[RequestRecord]) -> int:
    """Peak number of successful requests in flight at once (half-open intervals: an end precedes a start)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.start_s + r.latency_s, -1) for r in records])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Every SLO given (ttft, tpot, e2el in ms) is met by this successful request."""
    measured = {"ttft": record.ttft_s or 0.0, "tpot": record.tpot_s, "e2el": record.latency_s}
    return all(measured[name] * 1000 <= limit for name, limit in slo_ms.items())


@dataclass(frozen=True)
class LevelMetrics:
    """One concurrency level: counts, token totals, throughputs and the four latency distributions."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    text_chunks: int
    tokens_from_usage: bool
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    chunk_throughput: float
    request_goodput: float | None
    max_concurrent_requests: int
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2el: Distribution | None
    errors: dict[str, int] = field(default_factory=dict)


def level_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ms: dict[str, float] | None = None,
    percentiles: Sequence[int] = PERCENTILES,
) -> LevelMetrics:
    """Aggregate a level's records over its wall time (vLLM's calculate_metrics, failures counted apart)."""
    done = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    total_input = sum(r.prompt_tokens or 0 for r in done)
    total_output = sum(r.output_tokens for r in done)
    good = sum(1 for r in done if meets_slo(r, slo_ms)) if slo_ms else None
    errors = Counter(r.error or "unknown error" for r in records if not r.ok)
    return LevelMetrics(
        duration_s=duration_s,
        completed=len(done),
        failed=len(records) - len(done),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        text_chunks=sum(r.text_chunks for r in done),
        tokens_from_usage=bool(done) and all(r.tokens_from_usage for r in done),
        request_throughput=len(done) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        chunk_throughput=sum(r.text_chunks for r in done) / duration,
        request_goodput=None if good is None else good / duration,
        max_concurrent_requests=max_concurrent(done),
        ttft=distribution([r.ttft_s for r in done if r.ttft_s is not None], percentiles),
        tpot=distribution(
            [r.tpot_s for r in done if r.output_tokens > 1 and r.ttft_s is not None], percentiles
        ),
        itl=distribution([gap for r in done for gap in r.itl_s], percentiles),
        e2el=distribution([r.latency_s for r in done], percentiles),
        errors=dict(errors.most_common()),
    )

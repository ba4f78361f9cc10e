"""The benchmark's result as values, and as JSON with the field names of `vllm bench serve --save-result`
(one object per concurrency level inside a sweep object), so dashboards that read vLLM's files read these."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .. import __version__
from .ceiling import Ceiling
from .metrics import PERCENTILES, Distribution, LevelMetrics

VLLM_BACKEND = {"completions": "openai", "chat": "openai-chat"}  # vLLM's --backend names for these endpoints


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _distribution_fields(
    name: str, dist: Distribution | None, percentiles: tuple[int, ...]
) -> dict[str, Any]:
    """mean_<name>_ms, median_<name>_ms, std_<name>_ms, p<q>_<name>_ms (null when nothing was measured)."""
    fields: dict[str, Any] = {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None}
    fields.update({f"p{q}_{name}_ms": None for q in percentiles})
    if dist is not None:
        fields.update(
            {
                f"mean_{name}_ms": dist.mean_ms,
                f"median_{name}_ms": dist.median_ms,
                f"std_{name}_ms": dist.std_ms,
            }
        )
        fields.update({f"p{q}_{name}_ms": value for q, value in dist.percentiles_ms})
    return fields


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level: how many requests it had, sent, and what they measured."""

    concurrency: int
    num_prompts: int
    sent: int
    metrics: LevelMetrics
    ceiling_warning: str | None = None

    def summary_line(self) -> str:
        """One line for the progress log."""
        m = self.metrics
        ttft = f", TTFT median {m.ttft.median_ms:.0f} ms" if m.ttft else ""
        tpot = f", TPOT median {m.tpot.median_ms:.1f} ms" if m.tpot else ""
        return (
            f"concurrency {self.concurrency}: {m.completed} ok, {m.failed} failed in {m.duration_s:.1f} s, "
            f"{m.output_throughput:.1f} output tokens/s{ttft}{tpot}"
        )


@dataclass(frozen=True)
class BenchResult:
    """A whole sweep."""

    url: str
    endpoint: str
    model_id: str | None
    input_len: int
    output_len: int
    input_exact: bool
    prompt_overhead_tokens: int
    warmup: int
    slo_ms: dict[str, float]
    duration_bound_s: float | None
    request_timeout_s: float
    server_parameters: dict[str, Any]
    ceiling: Ceiling | None
    tokenizer_requests: int
    max_requests: int
    deadline_s: float
    levels: tuple[LevelResult, ...]
    warnings: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    percentiles: tuple[int, ...] = PERCENTILES
    date: str = field(default_factory=_now)

    def level_dict(self, level: LevelResult) -> dict[str, Any]:
        """One level with vLLM's names (duration, completed, ..., p99_e2el_ms), then this tool's extras."""
        m = level.metrics
        data: dict[str, Any] = {
            "date": self.date,
            "endpoint_type": VLLM_BACKEND[self.endpoint],
            "backend": VLLM_BACKEND[self.endpoint],
            "label": None,
            "model_id": self.model_id,
            "tokenizer_id": None,
            "num_prompts": level.num_prompts,
            "request_rate": "inf",
            "burstiness": 1.0,
            "max_concurrency": level.concurrency,
            "duration": m.duration_s,
            "completed": m.completed,
            "failed": m.failed,
            "total_input_tokens": m.total_input_tokens,
            "total_output_tokens": m.total_output_tokens,
            "request_throughput": m.request_throughput,
            "request_goodput": m.request_goodput,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
            "max_concurrent_requests": m.max_concurrent_requests,
        }
        for name in ("ttft", "tpot", "itl", "e2el"):
            data.update(_distribution_fields(name, getattr(m, name), self.percentiles))
        data.update(
            {
                "input_len": self.input_len,
                "output_len": self.output_len,
                "sent": level.sent,
                "output_tokens_counted_from": "usage" if m.tokens_from_usage else "chunks",
                "streamed_chunks": m.text_chunks,
                "streamed_chunk_throughput": m.chunk_throughput,
                "errors_by_message": m.errors,
                "instrument_ceiling_warning": level.ceiling_warning,
            }
        )
        return data

    def to_dict(self) -> dict[str, Any]:
        """The sweep object: what was asked and of whom, then `levels`, one vLLM-shaped object each."""
        return {
            "date": self.date,
            "tool": f"glm-deploy {__version__} bench",
            "metadata": self.metadata,
            "base_url": self.url,
            "endpoint_type": VLLM_BACKEND[self.endpoint],
            "model_id": self.model_id,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "input_len_exact": self.input_exact,
            "prompt_overhead_tokens": self.prompt_overhead_tokens,
            "num_warmups": self.warmup,
            "goodput_config": self.slo_ms or None,
            "duration_bound_s": self.duration_bound_s,
            "request_timeout_s": self.request_timeout_s,
            "max_requests": self.max_requests,
            "deadline_s": self.deadline_s,
            "tokenizer_requests": self.tokenizer_requests,
            "server_parameters": self.server_parameters,
            "instrument_ceiling": self.ceiling.to_dict() if self.ceiling else None,
            "warnings": list(self.warnings) + [w for w in (lv.ceiling_warning for lv in self.levels) if w],
            "max_concurrency": [lv.concurrency for lv in self.levels],
            "levels": [self.level_dict(level) for level in self.levels],
        }

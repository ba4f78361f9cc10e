"""deploy bench's statistics: vLLM's definitions of TTFT, TPOT, ITL, E2EL, throughput and goodput."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.bench.metrics import RequestRecord, level_metrics, percentile


def test_percentile_is_numpys_linear_interpolation():
    rng = np.random.default_rng(7)
    for size in (1, 2, 5, 37, 200):
        values = list(rng.exponential(1.0, size))
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def _record(start: float, ttft: float, latency: float, tokens: int, chunks: int, **kwargs) -> RequestRecord:
    gap = (latency - ttft) / max(chunks - 1, 1)
    return RequestRecord(
        ok=True,
        start_s=start,
        latency_s=latency,
        ttft_s=ttft,
        itl_s=(gap,) * (chunks - 1),
        text_chunks=chunks,
        prompt_tokens=100,
        output_tokens=tokens,
        tokens_from_usage=True,
        **kwargs,
    )


def test_level_metrics_follow_vllm_definitions():
    records = [
        _record(0.0, 0.2, 1.2, tokens=11, chunks=11),  # TPOT (1.2 - 0.2) / 10 = 100 ms
        _record(0.5, 0.4, 2.4, tokens=21, chunks=11),  # two tokens per chunk: TPOT 100 ms, ITL 200 ms
        RequestRecord(ok=False, start_s=1.0, latency_s=0.1, error="HTTP 503: busy"),
    ]
    m = level_metrics(records, duration_s=4.0, slo_ms={"ttft": 300, "tpot": 150})
    assert (m.completed, m.failed, m.errors) == (2, 1, {"HTTP 503: busy": 1})
    assert (m.total_input_tokens, m.total_output_tokens) == (200, 32)
    assert m.request_throughput == pytest.approx(0.5) and m.output_throughput == pytest.approx(8.0)
    assert m.total_token_throughput == pytest.approx(58.0)
    assert m.tpot.mean_ms == pytest.approx(100.0)
    assert m.itl.median_ms == pytest.approx(150.0) and m.itl.percentile_ms(99) == pytest.approx(
        200.0, rel=0.01
    )
    assert m.ttft.mean_ms == pytest.approx(300.0) and m.e2el.median_ms == pytest.approx(1800.0)
    assert m.request_goodput == pytest.approx(
        0.25
    )  # the second request's TTFT (400 ms) misses the 300 ms SLO
    assert m.max_concurrent_requests == 2  # [0, 1.2) and [0.5, 2.9) overlap


def test_nothing_measured_is_null_not_zero():
    m = level_metrics([RequestRecord(ok=False, start_s=0, latency_s=1, error="x")], duration_s=1.0)
    assert m.ttft is None and m.tpot is None and m.itl is None and m.e2el is None
    assert m.request_goodput is None and m.completed == 0 and not m.tokens_from_usage


def test_one_token_answers_have_no_tpot_but_meet_a_tpot_slo():
    m = level_metrics([_record(0.0, 0.05, 0.05, tokens=1, chunks=1)], 1.0, slo_ms={"tpot": 1})
    assert m.tpot is None and m.request_goodput == pytest.approx(1.0)

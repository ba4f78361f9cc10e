"""The serving-path bound per cache mode: measured data (profiles/serving_path.yaml) and its one rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.errors import BadInput
from toolkit.facts.serving_path import (
    BOUND_FACTOR,
    BOUND_MARGIN_NATS,
    ServingPath,
    load_serving_path,
    precision_bits,
)

ROOT = Path(__file__).resolve().parents[3]


def test_serving_path_bounds_follow_the_one_rule_and_say_where_they_come_from(tmp_path):
    table = load_serving_path()
    assert {"FP16", "8,8", "5,4", "2,2"} <= {r.cache_mode for r in table.modes}
    for row in table.modes:
        assert row.bound == max(BOUND_FACTOR * row.ci95_high, row.ci95_high + BOUND_MARGIN_NATS)
        assert row.source.startswith("benchmarks/") and (ROOT / row.source.split()[0]).is_file()
    fp16 = next(r for r in table.modes if r.cache_mode == "FP16")
    exact = table.bound("FP16", "single")
    assert exact.value == fp16.bound and "not measured" not in exact.source
    assert (table.status == "provisional") == ("PROVISIONAL" in exact.source)
    borrowed = table.bound("8,7", "tp")
    assert "cache 8,7 not measured" in borrowed.source and "split tp not measured" in borrowed.source
    assert (
        borrowed.value >= table.bound("8,8").value
    )  # a row with fewer bits than asked: looser, never tighter
    by_bits = sorted(table.modes, key=lambda r: precision_bits(r.cache_mode), reverse=True)
    assert [r.bound for r in by_bits] == sorted(r.bound for r in table.modes)  # fewer bits, more KL allowed
    only_fp16 = ServingPath("measured", "", (fp16,))
    below = only_fp16.bound("5,4")
    assert below.value == fp16.bound and "below every measured mode" in below.source
    with pytest.raises(BadInput):
        table.bound("k5v4")
    broken = tmp_path / "serving_path.yaml"
    broken.write_text("status: provisional\ncache_modes:\n  FP16: {mean: 0.2, ci95_high: 0.1}\n")
    with pytest.raises(BadInput, match="mean <= ci95_high"):
        load_serving_path(broken)

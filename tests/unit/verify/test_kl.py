"""The top-K KL estimator against exact full-vocabulary KL on synthetic distributions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from toolkit.verify.kl import (
    bootstrap_mean_ci,
    collision_counts,
    full_kl,
    position_kl,
    side_from_entries,
    summarize,
    truncated_side,
)

VOCAB = 600


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _pair(rng: np.random.Generator, noise: float, sharpness: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """A reference distribution and a perturbed ("quantized") one over VOCAB ids."""
    logits = rng.normal(0, sharpness, VOCAB)
    return _log_softmax(logits), _log_softmax(logits + rng.normal(0, noise, VOCAB))


def _pieces(colliding: int) -> list[str]:
    """Decoded strings per id; the last `colliding` ids all decode to U+FFFD like byte-level BPE pieces."""
    return [f"t{i}" for i in range(VOCAB - colliding)] + ["\ufffd"] * colliding


@pytest.mark.parametrize("colliding", [0, 40])
@pytest.mark.parametrize("k", [1, 5, 20, 50, 200])
def test_estimate_never_exceeds_full_vocabulary_kl(k, colliding):
    rng = np.random.default_rng(k * 7 + colliding)
    pieces = _pieces(colliding)
    counts = collision_counts(pieces)
    for noise in (0.05, 0.3, 1.0, 3.0):
        for _ in range(20):
            ref, served = _pair(rng, noise)
            estimate = position_kl(
                truncated_side(ref, pieces, k, counts), truncated_side(served, pieces, k, counts), counts
            )
            assert estimate <= full_kl(ref, served) + 1e-9


def test_estimate_converges_to_full_kl_as_k_grows():
    rng = np.random.default_rng(1)
    pieces = _pieces(0)
    pairs = [_pair(rng, 0.5) for _ in range(50)]
    exact = np.mean([full_kl(r, s) for r, s in pairs])
    gaps = []
    for k in (5, 20, 50, 150, VOCAB):
        estimate = np.mean(
            [position_kl(truncated_side(r, pieces, k), truncated_side(s, pieces, k)) for r, s in pairs]
        )
        gaps.append(exact - estimate)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(gaps)), gaps
    assert gaps[0] > 0.01 * exact
    assert gaps[-1] == pytest.approx(0.0, abs=1e-9)


def test_identical_distributions_give_zero_even_with_collisions_collapsed_like_tabbyapi():
    rng = np.random.default_rng(2)
    pieces = _pieces(60)
    counts = collision_counts(pieces)
    for _ in range(30):
        ref, _ = _pair(rng, 0.0)
        ref_side = truncated_side(ref, pieces, 50, counts, keyed_like_tabbyapi=False)
        served_side = truncated_side(ref, pieces, 50, counts, keyed_like_tabbyapi=True)
        assert position_kl(ref_side, served_side, counts) == pytest.approx(0.0, abs=1e-12)
        assert ref_side.top1 == served_side.top1


def test_colliding_entries_are_summed_and_exact_only_when_all_ids_are_reported():
    counts = {"\ufffd": 3}
    side = side_from_entries(
        [("a", math.log(0.5)), ("\ufffd", math.log(0.2)), ("\ufffd", math.log(0.1))], counts
    )
    assert side.probs["\ufffd"] == pytest.approx(0.3)
    assert "\ufffd" not in side.exact and "a" in side.exact
    complete = side_from_entries(
        [("\ufffd", math.log(0.2)), ("\ufffd", math.log(0.1)), ("\ufffd", math.log(0.05))], counts
    )
    assert complete.probs["\ufffd"] == pytest.approx(0.35) and "\ufffd" in complete.exact


def test_merged_colliding_bucket_matches_exact_coarse_grained_kl():
    """When every id of a colliding string is reported on both sides, the summed bucket is the true bucket."""
    p = np.array([0.4, 0.1, 0.15, 0.05, 0.3])
    q = np.array([0.3, 0.2, 0.05, 0.15, 0.3])
    pieces = ["a", "x", "x", "x", "b"]
    counts = collision_counts(pieces)

    def entries(probs: np.ndarray) -> list[tuple[str, float]]:
        return [(pieces[i], math.log(probs[i])) for i in np.argsort(-probs)]

    estimate = position_kl(
        side_from_entries(entries(p), counts), side_from_entries(entries(q), counts), counts
    )
    buckets_p, buckets_q = np.array([0.4, 0.3, 0.3]), np.array([0.3, 0.4, 0.3])
    assert estimate == pytest.approx(float(np.sum(buckets_p * np.log(buckets_p / buckets_q))))


def test_disjoint_top_k_sets_give_a_large_kl_not_zero():
    """A served distribution that shares nothing with the reference's top-K must not look perfect."""
    ref = _log_softmax(np.r_[np.full(10, 5.0), np.zeros(VOCAB - 10)])
    served = _log_softmax(np.r_[np.zeros(10), np.full(10, 5.0), np.zeros(VOCAB - 20)])
    pieces = _pieces(0)
    estimate = position_kl(truncated_side(ref, pieces, 10), truncated_side(served, pieces, 10))
    # All the report allows: the reference's 0.72 must fit in the served side's unreported 0.28.
    assert estimate > 0.3
    assert estimate <= full_kl(ref, served)


def test_water_filling_is_the_minimum_over_feasible_served_distributions():
    """No served distribution consistent with the report has a smaller coarse-grained KL than the estimate."""
    rng = np.random.default_rng(3)
    pieces = _pieces(0)
    ref, served = _pair(rng, 2.0)
    k = 8
    ref_side, served_side = truncated_side(ref, pieces, k), truncated_side(served, pieces, k)
    estimate = position_kl(ref_side, served_side)
    known = [s for s in ref_side.probs if s in served_side.probs]
    unknown = [s for s in ref_side.probs if s not in served_side.probs]
    assert unknown, "the test needs reference strings missing from the served top-K"
    p_known = np.array([ref_side.probs[s] for s in known])
    q_known = np.array([served_side.probs[s] for s in known])
    p_unknown = np.array([ref_side.probs[s] for s in unknown])
    p_other = 1 - p_known.sum() - p_unknown.sum()
    free = 1 - q_known.sum()
    q_rest = sum(served_side.probs.values()) - q_known.sum()
    for _ in range(2000):
        q_unknown = rng.uniform(0, served_side.cap, len(unknown))
        if q_unknown.sum() > free - q_rest:
            continue
        q_other = free - q_unknown.sum()
        value = (
            np.sum(p_known * np.log(p_known / q_known))
            + np.sum(p_unknown * np.log(p_unknown / q_unknown))
            + p_other * math.log(p_other / q_other)
        )
        assert value >= estimate - 1e-9


def test_served_minus_1000_logprob_counts_as_zero_probability():
    side = side_from_entries([("a", 0.0), ("b", -1000.0)])
    assert side.probs["b"] == 0.0
    assert position_kl(side_from_entries([("a", math.log(0.5)), ("b", math.log(0.5))]), side) > 10


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(4)
    values = rng.exponential(0.1, 160)
    groups = np.repeat(np.arange(40), 4)
    low, high = bootstrap_mean_ci(values, groups)
    assert (low, high) == bootstrap_mean_ci(values, groups)
    assert low < values.mean() < high
    summary = summarize(values, groups, [True] * 120 + [False] * 40)
    assert summary.positions == 160 and summary.top1_agreement == pytest.approx(0.75)
    assert summary.median <= summary.p99 <= summary.max == pytest.approx(values.max())


def test_clustered_bootstrap_is_wider_when_positions_of_a_prompt_move_together():
    rng = np.random.default_rng(5)
    per_prompt = rng.exponential(0.1, 40)
    values = np.repeat(per_prompt, 4) + rng.normal(0, 0.001, 160)
    clustered = bootstrap_mean_ci(values, np.repeat(np.arange(40), 4))
    independent = bootstrap_mean_ci(values, np.arange(160))
    assert clustered[1] - clustered[0] > 1.5 * (independent[1] - independent[0])

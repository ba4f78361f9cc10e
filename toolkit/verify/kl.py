"""KL(reference || served) from truncated top-K logprobs keyed by decoded strings: a guaranteed lower bound.

What a top-K API gives at one position is, per side, a few (decoded string, logprob) entries. Two things are
missing: the tail beyond K, and -- because TabbyAPI keys its top-K dict by decoded strings built with a dict
comprehension -- the mass of ids whose string collides with another id's (the dict keeps one of them).

How this estimator treats them (docs/verify.md says the same in prose):
- Buckets are decoded strings. Entries of one string on one side are summed (merging colliding ids consistently);
  a string's bucket is *exact* on a side when every vocabulary id that decodes to it was reported there
  (`vocab_counts` says how many ids share a string; strings not listed have one id).
- The partition is: every string that is exact on the reference side, plus one "other" bucket holding everything
  else (the tail beyond K, inexact strings, served strings the reference did not report) -- on both sides.
- A reference string missing from the served top-K has an unknown served probability, bounded by the served
  side's smallest reported probability times the number of ids sharing the string (an id outside the top-K is
  less likely than every id inside it), and all of them together by the served mass outside what was reported
  (served entries that fall into "other" stay there). Among all served distributions consistent with what was
  reported, the estimator takes the one that minimises the KL (water-filling the served free mass in proportion
  to the reference, under those caps).
- The coarse-grained KL is <= the full-vocabulary KL by the data-processing inequality, and the true served
  distribution is among those minimised over, so the figure is a LOWER BOUND on KL(P_ref || P_served) over the
  full vocabulary. The gap shrinks as K grows (the tail and the caps shrink); benchmarks/spotcheck_gpu measures it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

# Probabilities below this are treated as this (a served -1000.0 logprob means -inf: KL is then huge, not inf).
PROB_FLOOR = 1e-30
# What a real log-probability may exceed 0 by (float rounding of log_softmax), and what the reported
# probabilities of one position may sum to beyond 1 (float32 rounding of up to a few hundred terms is ~1e-5).
LOGPROB_TOLERANCE = 1e-4
MASS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Side:
    """One side's view of one position: probability per decoded string, the exact strings, a per-id cap."""

    probs: dict[str, float]
    exact: frozenset[str]
    cap: float
    top1: str | None


def distribution_problem(entries: Iterable[tuple[str, object]]) -> str | None:
    """Why these (string, logprob) entries are not log-probabilities of one distribution, or None when they are.

    Each value must be a finite number <= 0 (within LOGPROB_TOLERANCE) and the reported probabilities together
    <= 1 (within MASS_TOLERANCE). Anything else -- 0.0 everywhere, +inf, NaN, text, a distribution shifted
    upward -- is not something a model reported, and must not reach the KL estimator, which would read it as a
    perfect match.
    """
    mass = 0.0
    count = 0
    for key, value in entries:
        count += 1
        shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"the logprob of {shown} is {_brief(value)}, not a number"
        if isinstance(value, int):
            if value > 0:
                return f"the logprob of {shown} is {_brief(value)}, above 0 (a probability above 1)"
            value = float(value) if value > -(10**6) else -math.inf
        if not math.isfinite(value):
            return f"the logprob of {shown} is {value}, not a finite number"
        if value > LOGPROB_TOLERANCE:
            return f"the logprob of {shown} is {value:.6g}, above 0 (a probability above 1)"
        mass += math.exp(min(value, 0.0))
    if count == 0:
        return "no entries"
    if mass > 1.0 + MASS_TOLERANCE:
        return f"the reported probabilities sum to {mass:.6g}, more than 1"
    return None


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def side_from_entries(
    entries: Iterable[tuple[str, float]], vocab_counts: Mapping[str, int] | None = None
) -> Side:
    """Merge (string, logprob) entries by summing per string; exact = all ids of that string were reported.

    The entries must be log-probabilities (distribution_problem() is None). Top-1 is the string of the largest
    single value: the order an answer lists its entries in proves nothing. The one exception is a string several
    ids decode to (vocab_counts > 1) listed first: a TabbyAPI dict keeps the first position of such a string but
    the last (smallest) of its values, so there the first position is the better witness of the argmax.
    """
    entries = list(entries)
    counts = vocab_counts or {}
    probs: dict[str, float] = {}
    seen: dict[str, int] = {}
    smallest = 1.0
    top1: str | None = None
    best = -math.inf
    for key, logprob in entries:
        value = min(float(logprob), 0.0)
        p = math.exp(value) if value > -1000.0 else 0.0
        probs[key] = probs.get(key, 0.0) + p
        seen[key] = seen.get(key, 0) + 1
        smallest = min(smallest, p)
        if top1 is None or value > best:
            top1, best = key, value
    if entries and counts.get(entries[0][0], 1) > 1:
        top1 = entries[0][0]
    exact = frozenset(k for k, n in seen.items() if n >= counts.get(k, 1))
    return Side(probs=probs, exact=exact, cap=smallest if probs else 1.0, top1=top1)


def _waterfill(
    p_unknown: np.ndarray, caps: np.ndarray, p_other: float, q_rest: float, free: float
) -> tuple[np.ndarray, float]:
    """Served probabilities of the unknown buckets and of "other" that minimise the KL given what was reported.

    Constraints: q_u <= cap_u, q_other >= q_rest (served entries that fall into "other" are in it), and
    sum(q_u) + q_other == free. The minimiser is q_u = min(cap_u, lam p_u), q_other = max(q_rest, lam p_other)
    for the lam that spends `free` exactly; that function of lam is monotone, so bisection finds it.
    """
    if len(p_unknown) == 0:
        return p_unknown, free
    if p_other <= 0 and caps.sum() + q_rest <= free:
        return caps.copy(), free - caps.sum()

    def spent(lam: float) -> float:
        return float(np.minimum(caps, lam * p_unknown).sum()) + max(q_rest, lam * p_other)

    low, high = 0.0, 1.0
    while spent(high) < free and high < 1e300:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) < free else (low, middle)
    q = np.minimum(caps, high * p_unknown)
    return q, max(0.0, free - float(q.sum()))


def _term(p: float, q: float) -> float:
    return 0.0 if p <= 0 else p * (math.log(p) - math.log(max(q, PROB_FLOOR)))


def position_kl(reference: Side, served: Side, vocab_counts: Mapping[str, int] | None = None) -> float:
    """Lower bound on KL(reference || served) at one position (see the module docstring)."""
    counts = vocab_counts or {}
    known = [k for k in reference.exact if k in served.probs and k in served.exact]
    unknown = [k for k in reference.exact if k not in served.probs and reference.probs[k] > 0]
    p_known = sum(reference.probs[k] for k in known)
    p_unknown = np.array([reference.probs[k] for k in unknown], dtype=float)
    p_other = max(0.0, 1.0 - p_known - float(p_unknown.sum()))
    q_known = sum(served.probs[k] for k in known)
    free = max(0.0, 1.0 - q_known)
    q_rest = min(free, max(0.0, sum(served.probs.values()) - q_known))
    caps = np.array([served.cap * counts.get(k, 1) for k in unknown], dtype=float)
    q_unknown, q_other = _waterfill(p_unknown, caps, p_other, q_rest, free)
    total = sum(_term(reference.probs[k], served.probs[k]) for k in known)
    total += sum(_term(float(p), float(q)) for p, q in zip(p_unknown, q_unknown))
    total += _term(p_other, q_other)
    return max(0.0, total)


def full_kl(reference_logprobs: np.ndarray, served_logprobs: np.ndarray) -> float:
    """Exact full-vocabulary KL(reference || served) from two log-softmax vectors (exllamav3's convention)."""
    p = np.exp(reference_logprobs)
    return float(np.sum(p * (reference_logprobs - served_logprobs)))


def truncated_side(
    logprobs: np.ndarray,
    pieces: list[str],
    k: int,
    vocab_counts: Mapping[str, int] | None = None,
    keyed_like_tabbyapi: bool = True,
) -> Side:
    """What a top-K API reports for a full distribution; keyed_like_tabbyapi keeps only the last colliding entry."""
    order = np.argsort(-logprobs, kind="stable")[:k]
    entries = [(pieces[i], float(logprobs[i])) for i in order]
    if keyed_like_tabbyapi:
        entries = list({key: value for key, value in entries}.items())
    return side_from_entries(entries, vocab_counts)


def collision_counts(pieces: Iterable[str]) -> dict[str, int]:
    """Strings that more than one vocabulary id decodes to, with how many ids share each."""
    counts: dict[str, int] = {}
    for piece in pieces:
        counts[piece] = counts.get(piece, 0) + 1
    return {piece: n for piece, n in counts.items() if n > 1}


@dataclass(frozen=True)
class KlSummary:
    """Per-position KL values summarised; ci95 is a prompt-clustered bootstrap interval of the mean."""

    mean: float
    ci95: tuple[float, float]
    median: float
    p99: float
    max: float
    positions: int
    top1_agreement: float

    def as_dict(self) -> dict[str, object]:
        """The `kl` object of `deploy verify --json` (top1_agreement is reported beside it)."""
        return {
            "mean": self.mean,
            "ci95": list(self.ci95),
            "median": self.median,
            "p99": self.p99,
            "max": self.max,
            "positions": self.positions,
        }


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20260101


def bootstrap_mean_ci(
    values: np.ndarray, groups: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95% interval of the mean, resampling whole prompts (positions of one prompt are correlated)."""
    labels, index = np.unique(groups, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(labels))
    sizes = np.bincount(index, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(labels), size=(resamples, len(labels)))
    means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(values: Iterable[float], groups: Iterable[int], top1_matches: Iterable[bool]) -> KlSummary:
    """Mean, bootstrap CI, median, p99, max and top-1 agreement of per-position KL values."""
    kl = np.asarray(list(values), dtype=float)
    group = np.asarray(list(groups))
    matches = np.asarray(list(top1_matches), dtype=float)
    if kl.size == 0:
        raise ValueError("no positions to summarise")
    return KlSummary(
        mean=float(kl.mean()),
        ci95=bootstrap_mean_ci(kl, group),
        median=float(np.median(kl)),
        p99=float(np.percentile(kl, 99)),
        max=float(kl.max()),
        positions=int(kl.size),
        top1_agreement=float(matches.mean()),
    )

"""Replicas of one class must serve the same distributions: a consistency check that needs no reference.

Replicas of a class run the same weights with the same settings and build, so their teacher-forced next-token
distributions may differ only by serving noise. Each replica's top-K is read over HTTP at the shipped prompts'
positions (prefixes chosen once, through the first replica's tokenizer, and sent as the same strings to all),
with its tokenizer identity; then the pairwise KL (both directions, the larger counts) is compared with the
serving-path bound of the class's cache mode. The largest group of replicas that all agree is the reference when
it is a strict majority, and every replica outside it is named (a wrong cache mode, model or build); without a
majority every replica of a disagreeing pair is named.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from ..verify.client import ServerError, TabbyClient
from ..verify.kl import distribution_problem, position_kl, side_from_entries
from ..verify.reference import (
    POSITIONS_PER_PROMPT,
    RECORD_TOP_K,
    TOKENIZER_PROBE,
    Prompt,
    choose_prefixes,
    probe_identity,
)

Entries = list[tuple[str, float]]
MAX_EXACT_GROUP = 12  # up to this many replicas the largest agreeing group is found exactly


@dataclass(frozen=True)
class ReplicaSample:
    """One replica's answers: tokenizer identity and top-K per position (None where it gave none)."""

    name: str
    url: str
    probe_sha256: str | None
    positions: tuple[Entries | None, ...]
    error: str | None = None
    invalid: str | None = None  # why its answers are not log-probabilities (the replica is then named)


@dataclass(frozen=True)
class PairKl:
    """Mean KL between two replicas over the positions both answered: the larger of the two directions."""

    a: str
    b: str
    mean: float
    positions: int
    agree: bool


@dataclass(frozen=True)
class ClassConsistency:
    """A class's verdict: the pairs, the bound, and the replicas named with why."""

    class_name: str
    replicas: tuple[str, ...]
    bound: float
    bound_source: str
    pairs: tuple[PairKl, ...]
    named: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No replica named."""
        return not self.named

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "class": self.class_name,
            "replicas": list(self.replicas),
            "passed": self.passed,
            "bound": self.bound,
            "bound_source": self.bound_source,
            "pairs": [
                {"a": p.a, "b": p.b, "mean_kl": p.mean, "positions": p.positions, "agree": p.agree}
                for p in self.pairs
            ],
            "named": self.named,
            "skipped": self.skipped,
        }


def sample_replicas(
    replicas: Sequence[tuple[str, str]],
    api_key: str | None,
    prompts: Sequence[Prompt],
    top_k: int = RECORD_TOP_K,
    timeout_s: float = 60.0,
    deadline: float | None = None,
) -> list[ReplicaSample]:
    """(name, url) of each replica -> its samples at the same prefixes (chosen with the first that answers).

    Every request ends by `deadline` (time.monotonic()); a replica whose answers are not log-probabilities
    is sampled with `invalid` saying where, and compare() names it.
    """
    prefixes: list[list[str]] | None = None
    samples = []
    for name, url in replicas:
        with closing(TabbyClient(url, api_key, timeout_s=timeout_s, deadline=deadline)) as client:
            try:
                if prefixes is None:
                    prefixes = [
                        [cut for cut, _ in choose_prefixes(p.text, client.encode, POSITIONS_PER_PROMPT)]
                        for p in prompts
                    ]
                probe = probe_identity(client.encode(TOKENIZER_PROBE))
                answers: list[Entries | None] = []
                for cuts in prefixes:
                    answers += client.next_token_logprobs(cuts, top_k) if cuts else []
            except ServerError as error:
                samples.append(ReplicaSample(name, url, None, (), error=str(error)))
                continue
        invalid = next(
            (
                f"position {number}: {problem}"
                for number, entries in enumerate(answers, 1)
                if entries is not None and (problem := distribution_problem(entries)) is not None
            ),
            None,
        )
        samples.append(ReplicaSample(name, url, probe, tuple(answers), invalid=invalid))
    return samples


def pair_kl(a: ReplicaSample, b: ReplicaSample) -> tuple[float, int]:
    """Mean over shared positions of max(KL(a||b), KL(b||a)) per direction; (inf, 0) when none is shared."""
    forward, backward = [], []
    for left, right in zip(a.positions, b.positions):
        if left is None or right is None:
            continue
        side_a, side_b = side_from_entries(left), side_from_entries(right)
        forward.append(position_kl(side_a, side_b))
        backward.append(position_kl(side_b, side_a))
    if not forward:
        return float("inf"), 0
    return max(sum(forward) / len(forward), sum(backward) / len(backward)), len(forward)


def compare(class_name: str, samples: Sequence[ReplicaSample], bound: float, source: str) -> ClassConsistency:
    """Pairwise KL within the bound; name the replicas outside the agreeing majority (or every disagreeing one)."""
    skipped = {s.name: f"not sampled: {s.error}" for s in samples if s.error}
    named: dict[str, str] = {
        s.name: f"its answers are not log-probabilities ({s.invalid})" for s in samples if s.invalid
    }
    usable = [s for s in samples if not s.error and not s.invalid]
    probes = [s.probe_sha256 for s in usable]
    common = max(set(probes), key=probes.count) if probes else None
    if probes.count(common) * 2 > len(probes):
        for s in usable:
            if s.probe_sha256 != common:
                named[s.name] = "its tokenizer encodes the probe differently from the other replicas'"
        usable = [s for s in usable if s.probe_sha256 == common]
    pairs = []
    for a, b in itertools.combinations(usable, 2):
        mean, positions = pair_kl(a, b)
        pairs.append(PairKl(a.name, b.name, mean, positions, mean <= bound))
    disagree = [p for p in pairs if not p.agree]
    if disagree:
        group = _largest_agreeing_group([s.name for s in usable], pairs)
        if len(group) * 2 > len(usable):
            for s in usable:
                if s.name not in group:
                    worst = max(
                        (p for p in pairs if s.name in (p.a, p.b) and ({p.a, p.b} - {s.name}) <= group),
                        key=lambda p: p.mean,
                    )
                    named[s.name] = (
                        f"disagrees with the {len(group)} agreeing replicas (KL up to {worst.mean:.4g} > "
                        f"{bound:.4g}): another model, cache mode or build"
                    )
        else:
            for p in disagree:
                for one, other in ((p.a, p.b), (p.b, p.a)):
                    named.setdefault(
                        one,
                        f"disagrees with {other} (KL {p.mean:.4g} > {bound:.4g}) and no majority of the class "
                        "agrees; compare each with a deployment reference (`deploy verify --reference`)",
                    )
    return ClassConsistency(
        class_name, tuple(s.name for s in samples), bound, source, tuple(pairs), named, skipped
    )


def _largest_agreeing_group(names: list[str], pairs: Sequence[PairKl]) -> set[str]:
    """The largest set of replicas that agree pairwise (exact for small classes, greedy beyond)."""
    agree = {frozenset((p.a, p.b)) for p in pairs if p.agree}

    def clique(group: Sequence[str]) -> bool:
        return all(frozenset(pair) in agree for pair in itertools.combinations(group, 2))

    if len(names) <= MAX_EXACT_GROUP:
        for size in range(len(names), 0, -1):
            for group in itertools.combinations(names, size):
                if clique(group):
                    return set(group)
    chosen: list[str] = []
    for name in sorted(names, key=lambda n: -sum(1 for pair in agree if n in pair)):
        if clique([*chosen, name]):
            chosen.append(name)
    return set(chosen)

"""One readiness model: what /v1/model must report for an endpoint to count as serving what was planned.

`deploy up` waits until it holds (deploy/readiness.py); `deploy verify`, `deploy auto` and `deploy cluster verify`
check it (checks.py). Both read the same answer the same way: cache modes compare by meaning, so "5,4", "5, 4" and
TabbyAPI's aliases ("Q4" is "4,4") are equal and FP16 matches in any case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BadInput
from ..plan.memory import parse_cache_mode
from ..redact import printable


@dataclass(frozen=True)
class Expectations:
    """What the live server must be serving (None: not checked); from flags, a plan or a deployment's state."""

    model_id: str | None = None
    cache_mode: str | None = None
    context: int | None = None
    quant: str | None = None
    reasoning_markers: tuple[str, ...] | None = None  # None: the profile's reasoning start and end tokens


def served_model(card: dict[str, Any]) -> dict[str, Any]:
    """The fields of a /v1/model answer that readiness looks at, as plain values: text as inert text (at most
    200 characters), token counts as integers; anything else a server sends shows as its (shortened) repr."""
    parameters = card.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    return {
        "id": _text(card.get("id")),
        "cache_mode": _text(parameters.get("cache_mode")),
        "max_seq_len": _count(parameters.get("max_seq_len")),
        "cache_size": _count(parameters.get("cache_size")),
    }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return printable(value if isinstance(value, str) else repr(value), 200)


def _count(value: Any) -> int | str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63):
        return value
    return printable(repr(value), 60)


def same_cache_mode(reported: Any, expected: str) -> bool:
    """Equal cache modes by meaning; a spelling TabbyAPI would not accept is compared as text."""
    try:
        return parse_cache_mode(str(reported)) == parse_cache_mode(expected)
    except BadInput:
        return str(reported).replace(" ", "").upper() == expected.replace(" ", "").upper()


def model_problems(card: dict[str, Any], expect: Expectations) -> list[str]:
    """How a /v1/model answer differs from the expectations (empty: ready)."""
    served = served_model(card)
    problems = []
    if expect.model_id is not None and served["id"] != expect.model_id:
        problems.append(f"model id is {served['id']!r}, expected {expect.model_id!r}")
    if expect.cache_mode is not None and not same_cache_mode(served["cache_mode"], expect.cache_mode):
        problems.append(f"cache_mode is {served['cache_mode']!r}, expected {expect.cache_mode!r}")
    if expect.context is not None and served["max_seq_len"] != expect.context:
        problems.append(f"max_seq_len is {served['max_seq_len']}, expected {expect.context}")
    return problems

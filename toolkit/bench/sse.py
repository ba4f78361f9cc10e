"""Server-sent events as OpenAI-compatible servers stream them, and the fields of a chunk a benchmark needs."""

from __future__ import annotations

import json
from dataclasses import dataclass


class SseParser:
    """Incremental parser: feed bytes as they arrive, get the data of every complete event.

    Lines end in LF or CRLF (sse-starlette, TabbyAPI's framing, writes CRLF); comment lines (": ping") and the
    event/id/retry fields are skipped; an event's data lines are joined with LF, as the SSE specification says.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of each event completed by this chunk (an event ends at a blank line)."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[str] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace"))
        return events

    def close(self) -> list[str]:
        """At the end of the stream: an event whose blank line never came still counts."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        self._buffer = b""
        return events


@dataclass(frozen=True)
class Chunk:
    """What one streamed event says: text arrived, token usage, a finish, an error, or the [DONE] marker."""

    has_text: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False


DONE = Chunk(done=True)
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls")


def _has_text(choice: dict) -> bool:
    """A completion choice's text, or a chat delta's content, reasoning or tool-call fragment."""
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(delta.get(name) for name in TEXT_FIELDS)


def _count(usage: dict, key: str) -> int | None:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_chunk(data: str) -> Chunk:
    """Interpret one event's data: an OpenAI-style chunk, TabbyAPI's in-stream {"error": ...}, or [DONE]."""
    if data.strip() == "[DONE]":
        return DONE
    try:
        payload = json.loads(data)
    except ValueError:
        return Chunk(error=f"a streamed event is not JSON: {data[:80]!r}")
    if not isinstance(payload, dict):
        return Chunk(error="a streamed event is not a JSON object")
    error = payload.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        return Chunk(error=str(message)[:300])
    choices = payload.get("choices")
    choices = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    usage = payload.get("usage")
    finish = next((str(c["finish_reason"]) for c in choices if c.get("finish_reason")), None)
    return Chunk(
        has_text=any(_has_text(c) for c in choices),
        prompt_tokens=_count(usage, "prompt_tokens") if isinstance(usage, dict) else None,
        completion_tokens=_count(usage, "completion_tokens") if isinstance(usage, dict) else None,
        finish_reason=finish,
    )

"""The test server's streaming, which deploy bench is tested against: TabbyAPI's shapes (../shared/facts/tabbyapi.md:
usage in the last chunk, several tokens per event possible, errors inside a 200 stream), and its pacing."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.tabby_test_server import testing
from tests.tabby_test_server.server import ERROR_TRIGGER

KEY = "stream-test-key-21c0"


@pytest.fixture()
def server(tmp_path):
    running = testing.start(
        tmp_path,
        api_key=KEY,
        model={"reasoning": True},
        test_server={"first_token_delay_s": 0.1, "token_delay_s": 0.02},
    )
    yield running
    running.stop()


def stream(server, path: str, body: dict) -> tuple[httpx.Response, bytes, list[float]]:
    """The raw stream and the arrival time of each read."""
    times, raw = [], b""
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{server.url}{path}", json={"stream": True, **body}, headers={"X-API-Key": KEY}, timeout=30
    ) as response:
        for piece in response.iter_raw():
            raw += piece
            times.append(time.monotonic() - started)
    return response, raw, times


def events(raw: bytes) -> list:
    assert raw.endswith(b"\r\n\r\n") and b"\n\n" not in raw.replace(b"\r\n", b""), "CRLF framing"
    frames = [frame for frame in raw.decode().split("\r\n\r\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames)
    return [frame[6:] if frame[6:] == "[DONE]" else json.loads(frame[6:]) for frame in frames]


def test_completion_stream_has_tabbyapis_shape_and_usage_last(server):
    response, raw, times = stream(
        server,
        "/v1/completions",
        {
            "prompt": "The river",
            "max_tokens": 6,
            "ban_eos_token": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    *chunks, last, done = events(raw)
    assert done == "[DONE]" and len(chunks) == 6
    assert all(c["object"] == "text_completion" and c["id"].startswith("chatcmpl-") for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["text"] for c in chunks)
    assert last["choices"][0] == {"index": 0, "text": "", "finish_reason": "length"}
    assert last["usage"]["completion_tokens"] == 6 and last["usage"]["prompt_tokens"] == 3
    assert times[0] >= 0.1 and times[-1] >= 0.1 + 5 * 0.02, "tokens arrive as paced"


def test_chat_stream_splits_reasoning_and_omits_usage_unless_asked(server):
    _, raw, _ = stream(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    )
    *chunks, finish, done = events(raw)
    assert done == "[DONE]" and not any("usage" in c for c in chunks + [finish])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "reasoning_content" in deltas[0] and "content" in deltas[-1]
    assert finish["choices"][0]["finish_reason"] in ("length", "stop") and finish["choices"][0]["delta"] == {}


def test_generation_error_is_an_event_in_a_200_stream_and_overflow_a_400_before_it(server):
    response, raw, _ = stream(server, "/v1/completions", {"prompt": f"x {ERROR_TRIGGER}", "max_tokens": 4})
    assert response.status_code == 200
    assert events(raw) == [
        {
            "error": {
                "message": "Completion aborted. Please check the server console.",  # as TabbyAPI streams it
                "trace": None,
            }
        }
    ]
    response, raw, _ = stream(server, "/v1/completions", {"prompt": "x" * 5000, "max_tokens": 5})
    assert response.status_code == 400 and b"context_length_exceeded" in raw


def test_several_tokens_per_event(tmp_path):
    running = testing.start(tmp_path, api_key=KEY, test_server={"tokens_per_chunk": 3})
    try:
        _, raw, _ = stream(
            running,
            "/v1/completions",
            {"prompt": "a", "max_tokens": 7, "ignore_eos": True, "stream_options": {"include_usage": True}},
        )
    finally:
        running.stop()
    *chunks, last, _ = events(raw)
    assert len(chunks) == 3 and last["usage"]["completion_tokens"] == 7  # 3 + 3 + 1 tokens

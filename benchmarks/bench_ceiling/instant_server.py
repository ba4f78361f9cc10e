"""An OpenAI-compatible streaming server that answers instantly: the far end for measuring `deploy bench` itself.

Raw asyncio HTTP/1.1 (keep-alive, chunked transfer, one write per response), no framework, responses prebuilt
per (endpoint, max_tokens), so the server costs as little CPU as possible and the client's own limit shows.
Endpoints, with TabbyAPI's shapes: GET /v1/model, POST /v1/token/encode (one token per whitespace-separated
word), POST /v1/completions and /v1/chat/completions with stream: true (one token per event, usage in the last
event, then [DONE], CRLF framing as sse-starlette writes it). No auth: it binds 127.0.0.1 only.

    python3 benchmarks/bench_ceiling/instant_server.py --port 5999
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json

MODEL_CARD = {
    "id": "instant",
    "object": "model",
    "parameters": {"max_seq_len": 1 << 24, "max_batch_size": None},
}


def _http(status: str, content_type: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response with chunked transfer (one data chunk, then the terminator)."""
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n"
        "connection: keep-alive\r\n\r\n"
    ).encode()
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"


@functools.lru_cache(maxsize=64)
def stream_response(chat: bool, max_tokens: int) -> bytes:
    """The complete SSE answer of max_tokens one-token events, built once per shape."""
    if chat:
        token = _event(
            {
                "id": "chatcmpl-i",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "instant",
                "choices": [{"index": 0, "delta": {"content": " x"}, "finish_reason": None}],
            }
        )
        last = {
            "id": "chatcmpl-i",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "instant",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        }
    else:
        token = _event(
            {
                "id": "chatcmpl-i",
                "object": "text_completion",
                "created": 0,
                "model_name": "instant",
                "choices": [{"index": 0, "text": " x", "finish_reason": None}],
            }
        )
        last = {
            "id": "chatcmpl-i",
            "object": "text_completion",
            "created": 0,
            "model_name": "instant",
            "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
        }
    last["usage"] = {"prompt_tokens": 0, "completion_tokens": max_tokens, "total_tokens": max_tokens}
    body = token * max_tokens + _event(last) + b"data: [DONE]\r\n\r\n"
    return _http("200 OK", "text/event-stream; charset=utf-8", body)


def answer(method: str, path: str, body: bytes) -> bytes:
    """The response to one request."""
    if method == "GET" and path == "/v1/model":
        return _http("200 OK", "application/json", json.dumps(MODEL_CARD).encode())
    if method == "POST" and path == "/v1/token/encode":
        request = json.loads(body)
        text = request["text"] if isinstance(request["text"], str) else request["text"][0]["content"]
        count = len(text.split())
        return _http(
            "200 OK", "application/json", json.dumps({"tokens": [1] * count, "length": count}).encode()
        )
    if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
        request = json.loads(body)
        return stream_response(path.endswith("chat/completions"), int(request["max_tokens"]))
    return _http("404 Not Found", "application/json", b'{"detail":"Not Found"}')


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests on one keep-alive connection until the client closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            writer.write(answer(method, path, body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:port until killed; print one line when ready."""
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"instant server on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """`--port N`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()

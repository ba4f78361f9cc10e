"""The endpoint side of a benchmark: httpx clients bound to the one --url, the probe, the server's tokenizer,
and one streamed request timed chunk by chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..errors import BadInput, EnvironmentMissing
from . import shaping
from .metrics import RequestRecord
from .sse import SseParser, read_chunk

CONNECT_TIMEOUT_S = 10.0
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
MODEL_PATHS = ("/v1/model", "/v1/models")  # TabbyAPI's model card, then the OpenAI model list


@dataclass(frozen=True)
class ServerInfo:
    """What the endpoint told us before the benchmark: its model id, whether it tokenizes, its load settings."""

    model_id: str | None
    tokenizer: bool
    model_path: str = MODEL_PATHS[0]
    parameters: dict[str, Any] = field(default_factory=dict)


def make_client(url: str, api_key: str | None, timeout_s: float, connections: int) -> httpx.AsyncClient:
    """A client that can only talk to `url`: no proxy from the environment, no redirects followed.

    The load generator gives each worker its own one-connection client: httpcore checks every idle connection of
    a pool for every request it places, so one shared pool costs more per request the more workers share it.
    """
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers={"X-API-Key": api_key} if api_key else {},
        timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        trust_env=False,
        follow_redirects=False,
    )


def error_detail(response: httpx.Response) -> str:
    """A short error text: FastAPI's detail, an OpenAI-style error message, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("error")
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        if detail is not None:
            return str(detail)[:200]
    return str(body)[:200]


async def probe(http: httpx.AsyncClient, url: str, model: str | None) -> ServerInfo:
    """The model card (or list) and whether POST /v1/token/encode counts tokens; exit 4 when unreachable or
    without a model, exit 2 when the key is refused."""
    try:
        response = await http.get(MODEL_PATHS[0])
        path = MODEL_PATHS[0]
        if response.status_code == 404:
            response = await http.get(MODEL_PATHS[1])
            path = MODEL_PATHS[1]
    except httpx.HTTPError as error:
        raise EnvironmentMissing(
            f"cannot reach {url} ({type(error).__name__}: {error})", "start the server, or check --url"
        ) from None
    if response.status_code in (401, 403):
        raise BadInput(
            f"{url} rejected the API key (HTTP {response.status_code}: {error_detail(response)})",
            "pass --api-key-file (a key file or api_tokens.yml) or set DEPLOY_API_KEY",
        )
    if response.status_code == 503:
        raise EnvironmentMissing(
            f"{url} has no model loaded ({error_detail(response)})",
            "wait for the model load to finish (`deploy verify --wait`)",
        )
    model_id, parameters = None, {}
    try:
        data = response.json() if response.status_code == 200 else {}
    except ValueError:
        data = {}
    if isinstance(data, dict) and isinstance(data.get("data"), list) and data["data"]:
        first = data["data"][0]
        model_id = first.get("id") if isinstance(first, dict) else None
    elif isinstance(data, dict):
        model_id = data.get("id")
        parameters = data["parameters"] if isinstance(data.get("parameters"), dict) else {}
    try:
        await count_tokens(http, "completions", PROBE_TEXT)
        tokenizer = True
    except (httpx.HTTPError, ValueError):
        tokenizer = False
    return ServerInfo(
        model_id=model or (str(model_id) if model_id else None),
        tokenizer=tokenizer,
        model_path=path,
        parameters=parameters,
    )


async def count_tokens(http: httpx.AsyncClient, endpoint: str, text: str) -> int:
    """The server's token count of a prompt (POST /v1/token/encode); ValueError when it gives none."""
    response = await http.post("/v1/token/encode", json=shaping.encode_body(endpoint, text))
    if response.status_code != 200:
        raise ValueError(f"/v1/token/encode: HTTP {response.status_code}")
    data = response.json()
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if isinstance(tokens, list):
        return len(tokens)
    raise ValueError("/v1/token/encode: no token list in the answer")


async def stream_request(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], started: float, level_start: float
) -> RequestRecord:
    """Send one streamed request and time its text-bearing chunks (perf_counter at each network read).

    The stream is read to its end even after [DONE] (the connection is then reused); E2EL ends at [DONE].
    """
    first = last = end = None
    gaps: list[float] = []
    chunks = 0
    prompt_tokens = completion_tokens = None
    finished = False
    error = None
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return RequestRecord(
                ok=False,
                start_s=started - level_start,
                latency_s=time.perf_counter() - started,
                error=f"HTTP {response.status_code}: {error_detail(response)}",
            )
        parser = SseParser()
        async for raw in response.aiter_bytes():
            now = time.perf_counter()
            for data in parser.feed(raw):
                if error is not None or finished:
                    break
                chunk = read_chunk(data)
                error = chunk.error
                if chunk.has_text:
                    chunks += 1
                    if last is not None:
                        gaps.append(now - last)
                    first = first or now
                    last = now
                if chunk.completion_tokens is not None:
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                if chunk.done:
                    finished, end = True, now
        if error is None and not finished and any(read_chunk(data).done for data in parser.close()):
            finished = True
    end = end or time.perf_counter()
    if error is None and not finished:
        error = "the stream ended without [DONE]"
    if error is None and not chunks:
        error = "the stream carried no text"
    return RequestRecord(
        ok=error is None,
        start_s=started - level_start,
        latency_s=end - started,
        ttft_s=None if first is None else first - started,
        itl_s=tuple(gaps),
        text_chunks=chunks,
        prompt_tokens=prompt_tokens,
        output_tokens=chunks if completion_tokens is None else completion_tokens,
        tokens_from_usage=completion_tokens is not None,
        error=error,
    )

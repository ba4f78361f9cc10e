"""A small TabbyAPI HTTP client: only the endpoints verification may rely on, with TabbyAPI's shapes and quirks.

Endpoints (../shared/facts/tabbyapi.md): GET /health (no auth), GET /v1/model, POST /v1/completions,
POST /v1/chat/completions, POST /v1/token/encode. The key travels as X-API-Key and is never printed or logged.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from .. import inputs, redact
from ..errors import BadInput
from .limits import MAX_ANSWER_BYTES, REQUEST_TIMEOUT_S

API_KEY_ENV = "DEPLOY_API_KEY"

# Neutral samplers sent explicitly with every distribution request: TabbyAPI's override presets (e.g.
# safe_defaults: temperature 0.8, top_p 0.9) only fill fields a request omits (tabbyapi.md). exllamav3 reports
# softmax of the raw logits anyway; these keep the generated token irrelevant to what is measured.
NEUTRAL_SAMPLERS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
RETRIES_WITHOUT_LOGPROBS = 3
# A key travels as an HTTP header: printable ASCII without spaces, as TabbyAPI's generated keys are.
KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
MAX_KEY_CHARS = 4096


class ServerError(Exception):
    """The server could not be reached or answered with an error; `status` is None when unreachable."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(redact.printable(message, 1000))
        self.status = status
        self.body = body


def check_url(url: str, example: str = "http://127.0.0.1:5000", flag: str = "--url") -> str:
    """An http(s) URL with a host, a valid port and no credentials, query or fragment (bad input, exit 2).

    Credentials in a URL (user:pass@) would be echoed and stored; the key goes in --api-key-file instead. The
    URL is never echoed when it carries credentials.
    """
    hint = f"e.g. {flag} {example}"
    if not isinstance(url, str) or any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise BadInput(f"{flag} {redact.printable(url, 80)} is not an http(s) URL of plain ASCII", hint)
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise BadInput(f"{flag} {url!r} is not a valid URL (host or port)", hint) from None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise BadInput(f"{flag} carries credentials (user:password@)", "pass the API key with --api-key-file")
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise BadInput(f"{flag} {url!r} is not an http(s) URL with a host", hint)
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise BadInput(f"{flag} {url!r} has a query or fragment", hint)
    if port is not None and not 1 <= port <= 65535:
        raise BadInput(f"{flag} {url!r} has port {port}, outside 1-65535", hint)
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise BadInput(f"{flag} {url!r} is not a valid URL", hint) from None
    return url


def checked_key(key: str, source: str) -> str:
    """A key an HTTP header can carry, registered for redaction; anything else is refused without echoing it."""
    redact.register(key)
    if not key or len(key) > MAX_KEY_CHARS or not set(key) <= KEY_CHARS:
        raise BadInput(
            f"the API key in {source} holds characters an HTTP header cannot carry (control characters, spaces "
            "or non-ASCII)",
            "the key is printable ASCII without spaces; check the file",
        )
    return key


def read_api_key(path: str | None) -> str | None:
    """The key from a plain file, from TabbyAPI's api_tokens.yml (its api_key), or from $DEPLOY_API_KEY."""
    if path is None:
        key = os.environ.get(API_KEY_ENV) or None
        return checked_key(key, f"${API_KEY_ENV}") if key else None
    what = "--api-key-file"
    text = inputs.read_text(path, what, inputs.KEY_FILE_BYTES, "pass a readable key file or api_tokens.yml")
    text = text.strip()
    if not text:
        raise BadInput(f"{what} {path} is empty", "put the API key (or api_tokens.yml) in it")
    if ":" in text:
        try:
            data = inputs.parse_yaml(text, what, path)
        except BadInput:
            data = None
        if isinstance(data, dict):
            for value in data.values():  # api_key and admin_key: both are secrets
                for item in value if isinstance(value, list) else [value]:
                    redact.register(item if isinstance(item, str) else None)
            key = data.get("api_key")
            if isinstance(key, list) and key:
                key = key[0]
            if not isinstance(key, str) or not key:
                raise BadInput(f"{what} {path} has no api_key", "use TabbyAPI's api_tokens.yml or a key file")
            return checked_key(key, f"{what} {path}")
    return checked_key(text.splitlines()[0].strip(), f"{what} {path}")


def _detail(data: bytes) -> str:
    """FastAPI's {"detail": ...} message, TabbyAPI's OpenAI-shaped {"error": {"message", "code"}} (context
    overflow), or the start of the body, as one inert line."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return redact.printable(data[:200].decode("utf-8", "replace"), 200)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        code = error.get("code") or error.get("type") or "error"
        return redact.printable(f"{error['message']} ({code})", 300)
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        text = "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
        )
    else:
        text = str(detail) if detail is not None else str(body)
    return redact.printable(text, 300)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, read whole (within the size cap and the deadline)."""

    status_code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AnswerTooLarge(Exception):
    """The answer (as sent, or inflated) exceeded MAX_ANSWER_BYTES."""


def _raw_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The body as sent, chunk by chunk, stopping past the cap (an in-memory answer, as a mock transport gives,
    is taken whole)."""
    received = 0
    try:
        for raw in response.iter_raw():
            received += len(raw)
            if received > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
            yield raw
    except httpx.StreamConsumed:
        yield response.content


def _read_body(response: httpx.Response) -> bytes:
    """The body, inflated here (gzip/deflate) as a stream that stops at the cap; other encodings are refused."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        raise httpx.DecodingError(f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32) if encoding not in ("", "identity") else None
    chunks: list[bytes] = []
    size = 0
    for raw in _raw_chunks(response):
        pending = raw
        while pending:
            if inflater is None:
                chunk, pending = pending, b""
            else:
                try:
                    chunk = inflater.decompress(pending, MAX_ANSWER_BYTES + 1 - size)
                except zlib.error:
                    raise httpx.DecodingError("the compressed answer is not valid") from None
                pending = inflater.unconsumed_tail
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class Health:
    """GET /health: status code and the issues TabbyAPI reports when unhealthy."""

    status_code: int
    issues: tuple[str, ...]


class TabbyClient:
    """Synchronous client with a per-request timeout and an overall deadline, answers capped in size.

    Each request runs in a daemon thread that the caller waits on for at most min(timeout_s, time left before
    `deadline`): a server that trickles its answer (or its headers) a byte at a time cannot hold the caller past
    either. Redirects are not followed (the key must not travel to another address).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        deadline: float | None = None,
    ) -> None:
        headers = {"Accept-Encoding": "identity"}
        if api_key:
            headers["X-API-Key"] = checked_key(api_key, "the API key")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.deadline = deadline  # time.monotonic() after which no request may run
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport, follow_redirects=False
        )
        self._stuck = False
        self.server_seconds = 0.0

    def close(self) -> None:
        """Release the connection pool (left to the process's end when a request is still stuck in a thread)."""
        if not self._stuck:
            self._http.close()

    def time_left(self) -> float | None:
        """Seconds until the overall deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        left = self.time_left()
        if left is not None and left <= 0:
            raise ServerError(f"{method} {path} not sent: the overall deadline (--timeout) has passed")
        limit = self.timeout_s if left is None else min(self.timeout_s, left)
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                with self._http.stream(method, path, json=body) as response:
                    outcome["answer"] = Answer(response.status_code, _read_body(response))
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = error

        started = time.monotonic()
        worker = threading.Thread(target=fetch, name=f"tabby {method} {path}", daemon=True)
        worker.start()
        worker.join(limit)
        self.server_seconds += time.monotonic() - started
        if worker.is_alive():
            self._stuck = True
            overall = left is not None and left <= self.timeout_s
            raise ServerError(
                f"{method} {path} timed out after {limit:.0f} s"
                + (" (the overall deadline, --timeout)" if overall else "")
            )
        error = outcome.get("error")
        if isinstance(error, AnswerTooLarge):
            raise ServerError(f"{method} {path}: the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB")
        if isinstance(error, httpx.TimeoutException):
            raise ServerError(f"{method} {path} timed out after {self.timeout_s:.0f} s") from None
        if isinstance(error, httpx.HTTPError):
            raise ServerError(f"cannot reach {self.url} ({type(error).__name__}: {error})") from None
        if error is not None:
            raise error
        return outcome["answer"]

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._request(method, path, body)
        if response.status_code != 200:
            detail = _detail(response.body)
            if response.status_code == 401:
                raise ServerError(
                    f"{path}: 401 {detail} -- the API key was missing or rejected; pass "
                    f"--api-key-file (a key file or api_tokens.yml) or set {API_KEY_ENV}",
                    401,
                    detail,
                )
            raise ServerError(f"{path}: HTTP {response.status_code} {detail}", response.status_code, detail)
        try:
            data = response.json()
        except (ValueError, RecursionError):
            raise ServerError(f"{path}: the answer is not JSON", 200) from None
        if not isinstance(data, dict):
            raise ServerError(f"{path}: the answer is not a JSON object", 200)
        return data

    def health(self) -> Health:
        """GET /health; a 503 carries TabbyAPI's issues (sticky until restart)."""
        response = self._request("GET", "/health")
        issues: tuple[str, ...] = ()
        try:
            body = response.json()
            raw = body.get("issues") if isinstance(body, dict) else None
            if isinstance(raw, list):
                issues = tuple(
                    redact.printable(i.get("description", i) if isinstance(i, dict) else i, 300)
                    for i in raw[:20]
                )
        except (ValueError, RecursionError):
            pass
        return Health(status_code=response.status_code, issues=issues)

    def model(self) -> dict[str, Any]:
        """GET /v1/model: {"id", "parameters": {max_seq_len, cache_size, cache_mode, ...}}; 503 before load."""
        return self._json("GET", "/v1/model")

    def generate_one_token(self) -> None:
        """POST /v1/completions for one token: proves the server can generate now (ServerError when not)."""
        self._json(
            "POST",
            "/v1/completions",
            {"prompt": "Hello", "max_tokens": 1, "stream": False, **NEUTRAL_SAMPLERS},
        )

    def encode(self, text: str, add_bos_token: bool = False) -> list[int]:
        """POST /v1/token/encode of a string, with the same BOS and special-token choice as the completions."""
        data = self._json(
            "POST",
            "/v1/token/encode",
            {"text": text, "add_bos_token": add_bos_token, "encode_special_tokens": True},
        )
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerError("/v1/token/encode: no token list in the answer", 200)
        return tokens

    def next_token_logprobs(
        self,
        prefixes: list[str],
        top_k: int,
        add_bos_token: bool = False,
        retries: int = RETRIES_WITHOUT_LOGPROBS,
    ) -> list[list[tuple[str, Any]] | None]:
        """Top-K (decoded string, logprob as sent) of the token after each prefix: one request, one-token completions.

        TabbyAPI accepts a list of prompts and runs them as concurrent jobs (batched by exllamav3), which cuts
        server time; choices come back with their index. Keys are decoded strings (collisions already collapsed).
        Values are passed on as the server sent them: the caller checks that they are log-probabilities
        (kl.distribution_problem). A choice without logprobs (a generation that ended at once, e.g. on a sampled EOS) is asked again alone,
        up to RETRIES_WITHOUT_LOGPROBS times; None when it still has none.
        """
        body = {
            "prompt": prefixes,
            "max_tokens": 1,
            "logprobs": top_k,
            "stream": False,
            "add_bos_token": add_bos_token,
            **NEUTRAL_SAMPLERS,
        }
        data = self._json("POST", "/v1/completions", body)
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prefixes):
            raise ServerError(
                f"/v1/completions: expected {len(prefixes)} choices, got "
                f"{len(choices) if isinstance(choices, list) else 'none'}",
                200,
            )
        result: list[list[tuple[str, Any]] | None] = [None] * len(prefixes)
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise ServerError("/v1/completions: a choice is not an object", 200)
            index = choice.get("index", position)
            if not isinstance(index, int) or not 0 <= index < len(prefixes):
                raise ServerError(f"/v1/completions: choice index {index!r} is out of range", 200)
            logprobs = choice.get("logprobs")
            tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
            top = tops[0] if isinstance(tops, list) and tops else None
            if isinstance(top, dict) and top:
                result[index] = [(str(key), value) for key, value in top.items()]
        if retries > 0:
            for index, entries in enumerate(result):
                if entries is None:
                    result[index] = self.next_token_logprobs(
                        [prefixes[index]], top_k, add_bos_token, retries - 1
                    )[0]
        return result

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """POST /v1/chat/completions (non-streaming); returns the first choice's message."""
        data = self._json(
            "POST",
            "/v1/chat/completions",
            {"messages": messages, "max_tokens": max_tokens, "stream": False, **NEUTRAL_SAMPLERS},
        )
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ServerError("/v1/chat/completions: no choices in the answer", 200)
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise ServerError("/v1/chat/completions: the choice has no message", 200)
        return message

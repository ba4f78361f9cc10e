"""A small TabbyAPI HTTP client: only the endpoints verification may rely on, with TabbyAPI's shapes and quirks.

Endpoints (../shared/facts/tabbyapi.md): GET /health (no auth), GET /v1/model, POST /v1/completions,
POST /v1/chat/completions, POST /v1/token/encode. The key travels as X-API-Key and is never printed or logged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from ..errors import BadInput

API_KEY_ENV = "DEPLOY_API_KEY"

# Neutral samplers sent explicitly with every distribution request: TabbyAPI's override presets (e.g.
# safe_defaults: temperature 0.8, top_p 0.9) only fill fields a request omits (tabbyapi.md). exllamav3 reports
# softmax of the raw logits anyway; these keep the generated token irrelevant to what is measured.
NEUTRAL_SAMPLERS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
RETRIES_WITHOUT_LOGPROBS = 3


class ServerError(Exception):
    """The server could not be reached or answered with an error; `status` is None when unreachable."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def check_url(url: str, example: str = "http://127.0.0.1:5000") -> None:
    """Refuse a --url that is not http(s) before any request is sent (bad input, exit 2)."""
    if not url.startswith(("http://", "https://")):
        raise BadInput(f"--url {url!r} is not an http(s) URL", f"e.g. --url {example}")


def read_api_key(path: str | None) -> str | None:
    """The key from a plain file, from TabbyAPI's api_tokens.yml (its api_key), or from $DEPLOY_API_KEY."""
    if path is None:
        return os.environ.get(API_KEY_ENV) or None
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise BadInput(
            f"cannot read --api-key-file {path}: {error.strerror}", "pass a readable file"
        ) from None
    if not text:
        raise BadInput(f"--api-key-file {path} is empty", "put the API key (or api_tokens.yml) in it")
    if ":" in text:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            key = data.get("api_key")
            if isinstance(key, list) and key:
                key = key[0]
            if not isinstance(key, str) or not key:
                raise BadInput(
                    f"--api-key-file {path} has no api_key", "use TabbyAPI's api_tokens.yml or a key file"
                )
            return key
    return text.splitlines()[0].strip()


def _detail(response: httpx.Response) -> str:
    """FastAPI's {"detail": ...} message, TabbyAPI's OpenAI-shaped {"error": {"message", "code"}} (context
    overflow), or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return f"{error['message']} ({error.get('code') or error.get('type') or 'error'})"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        return "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
        )
    return str(detail) if detail is not None else str(body)[:200]


@dataclass(frozen=True)
class Health:
    """GET /health: status code and the issues TabbyAPI reports when unhealthy."""

    status_code: int
    issues: tuple[str, ...]


class TabbyClient:
    """Synchronous client; one httpx connection pool; timeouts generous enough for a loaded GPU server."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)
        self.server_seconds = 0.0

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        started = time.monotonic()
        try:
            return self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise ServerError(f"{method} {path} timed out after {self._http.timeout.read} s") from None
        except httpx.HTTPError as error:
            raise ServerError(f"cannot reach {self.url} ({type(error).__name__}: {error})") from None
        finally:
            self.server_seconds += time.monotonic() - started

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._request(method, path, body)
        if response.status_code != 200:
            detail = _detail(response)
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
        except ValueError:
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
            issues = tuple(str(i.get("description", i)) if isinstance(i, dict) else str(i) for i in raw or ())
        except ValueError:
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
    ) -> list[list[tuple[str, float]] | None]:
        """Top-K (decoded string, logprob) of the token after each prefix: one request, one-token completions.

        TabbyAPI accepts a list of prompts and runs them as concurrent jobs (batched by exllamav3), which cuts
        server time; choices come back with their index. Keys are decoded strings (collisions already collapsed).
        A choice without logprobs (a generation that ended at once, e.g. on a sampled EOS) is asked again alone,
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
        result: list[list[tuple[str, float]] | None] = [None] * len(prefixes)
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise ServerError("/v1/completions: a choice is not an object", 200)
            index = choice.get("index", position)
            if not isinstance(index, int) or not 0 <= index < len(prefixes):
                raise ServerError(f"/v1/completions: choice index {index!r} is out of range", 200)
            top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
            if isinstance(top, dict) and top:
                result[index] = [(str(key), float(value)) for key, value in top.items()]
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

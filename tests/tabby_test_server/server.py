"""A TabbyAPI-compatible HTTP test server over the tiny numpy model (stdlib http.server + numpy + yaml only).

Shapes follow TabbyAPI main e632af4 (endpoints/OAI/types/*.py, endpoints/core/router.py, common/auth.py):
401 {"detail": ...} without a valid key, /v1/model 503 before a model is loaded, /health 503 after any generation
error and until restart, top-K logprobs keyed by decoded strings built with a dict comprehension (colliding
pieces keep the last, i.e. smallest, entry), reasoning split into reasoning_content when model.reasoning is true.

Streaming (`stream: true`) answers server-sent events framed as sse-starlette frames them (CRLF), with TabbyAPI's
chunk shapes (endpoints/OAI/utils/completion.py, chat_completion.py): a completion chunk is
{"id": "chatcmpl-..", "object": "text_completion", "choices": [{"index", "text", "finish_reason"}], "created",
"model_name"}, a chat chunk {"object": "chat.completion.chunk", "choices": [{"index", "delta", "finish_reason"}],
"model"}; with `stream_options.include_usage` the finish is held back and a last chunk carries it with `usage`;
then `[DONE]`. A generation error inside a stream is an error event (HTTP 200) and no `[DONE]`, as in TabbyAPI.

Test hooks (documented in README.md): a prompt or message containing ERROR_TRIGGER fails the generation and makes
/health 503 for good while later requests are served (as measured on TabbyAPI e632af4); fail_generations makes
every generation fail (a server that cannot generate, /v1/model still 200); pacing (first_token_delay_s,
token_delay_s, tokens_per_chunk) for speed-measurement tests; settings in config.yml's `test_server:` section or
GLM_TEST_SERVER_* env vars.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from .model import EOS_ID, THINK_END_ID, THINK_ID, TinyModel

ERROR_TRIGGER = "<<glm-test-server:generation-error>>"
# A failed generation inside a stream: TabbyAPI's get_generator_error text (seen on an H200,
# benchmarks/gpu_stack/RESULTS.md section 3); a non-streamed one is a 503 naming the request.
STREAM_ABORTED = "{what} aborted. Please check the server console."
OOM_MESSAGE = "Insufficient VRAM in split for model and cache"
REASONING_TOKENS = 8


class ApiError(Exception):
    """An HTTP error answered as FastAPI does: {"detail": message}."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail

    def body(self) -> dict[str, Any]:
        """The JSON answer."""
        return {"detail": self.detail}


class ContextLengthError(ApiError):
    """TabbyAPI's context overflow (common/errors.py): 400 with the OpenAI error shape, not {"detail": ...}."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)

    def body(self) -> dict[str, Any]:
        """{"error": {message, type, param, code: context_length_exceeded}}."""
        return {
            "error": {
                "message": self.detail,
                "type": "invalid_request_error",
                "param": None,
                "code": "context_length_exceeded",
            }
        }


@dataclass(frozen=True)
class ModelSettings:
    """The `model:` section that /v1/model reports and generation obeys."""

    name: str
    max_seq_len: int
    cache_size: int
    cache_mode: str
    max_batch_size: int
    chunk_size: int
    reasoning: bool
    reasoning_start_token: str
    reasoning_end_token: str
    start_in_reasoning: str  # auto | always | never


@dataclass(frozen=True)
class Pacing:
    """Simulated GPU timing: token j of a generation is ready first_token_delay_s + j * token_delay_s after the
    generation starts; a stream sends tokens_per_chunk tokens per event (TabbyAPI can put several in one)."""

    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    tokens_per_chunk: int = 1


@dataclass
class ServerState:
    """What the handler threads share: settings, keys, the loaded model (None while loading) and health issues."""

    settings: ModelSettings | None
    api_keys: frozenset[str]
    admin_key: str
    disable_auth: bool
    think: bool
    pacing: Pacing = Pacing()
    fail_generations: bool = False  # a server that cannot generate (test_server.fail_generations)
    reasoning_parser: str = "tabby"  # tabby | none | no-end (test_server.reasoning_parser)
    model: TinyModel | None = None
    issues: list[dict[str, str]] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)  # requests per "METHOD /path", for tests that count
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_issue(self, description: str) -> None:
        """Record a generation error: /health stays 503 until restart, like TabbyAPI's HealthManager."""
        with self.lock:
            self.issues.append({"time": datetime.now(timezone.utc).isoformat(), "description": description})


def _check_key(state: ServerState, headers: Any) -> None:
    """TabbyAPI's check_api_key: X-API-Key, else Authorization: Bearer; admin keys are valid API keys."""
    if state.disable_auth:
        return
    valid = state.api_keys | {state.admin_key}
    x_api_key = headers.get("x-api-key")
    authorization = headers.get("authorization")
    if x_api_key:
        if x_api_key not in valid:
            raise ApiError(401, "Invalid API key")
        return
    if authorization:
        parts = authorization.split(" ")
        if len(parts) < 2 or parts[0].lower() != "bearer" or parts[1] not in valid:
            raise ApiError(401, "Invalid API key")
        return
    raise ApiError(401, "Please provide an API key")


def _loaded(state: ServerState) -> TinyModel:
    """TabbyAPI's check_model_container: 503 while no model is loaded."""
    if state.model is None or state.settings is None:
        raise ApiError(503, "No models are currently loaded.")
    return state.model


def _validation_error(location: str, message: str) -> ApiError:
    """A 422 shaped like FastAPI's request validation errors."""
    return ApiError(422, [{"type": "value_error", "loc": ["body", location], "msg": message}])


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _validation_error(key, f"must be a number between {low} and {high}")
    return float(value)


def _sample(logprobs: np.ndarray, body: dict[str, Any], rng: np.random.Generator) -> int:
    """Pick a token with temperature / top_k / top_p / min_p; temperature 0 is greedy."""
    temperature = _number(body, "temperature", 1.0, 0, 10)
    if temperature == 0:
        return int(np.argmax(logprobs))
    probs = np.exp((logprobs - logprobs.max()) / temperature)
    order = np.argsort(-probs, kind="stable")
    top_k = int(_number(body, "top_k", 0, -1, 1e9))
    keep = np.ones(len(probs), dtype=bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p < 1.0:
        cumulative = np.cumsum(probs[order]) / probs.sum()
        keep[order[np.searchsorted(cumulative, top_p) + 1 :]] = False
    min_p = _number(body, "min_p", 0.0, 0, 1)
    keep &= probs >= min_p * probs.max()
    probs = np.where(keep, probs, 0.0)
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _top_entries(model: TinyModel, logprobs: np.ndarray, k: int) -> list[tuple[int, str, float]]:
    """Top-k (id, piece, logprob) in descending probability, as exllamav3's return_top_tokens gives them."""
    order = np.argsort(-logprobs, kind="stable")[:k]
    return [(int(i), model.tokenizer.pieces[int(i)], float(logprobs[i])) for i in order]


@dataclass(frozen=True)
class Steering:
    """What a chat template imposes on sampling: tokens emitted at given steps, tokens never sampled, and the
    first step at which the model may stop (EOS)."""

    forced: dict[int, int] = field(default_factory=dict)
    banned: tuple[int, ...] = ()
    stop_from: int = 0


def chat_steering(think: bool, max_tokens: int) -> Steering:
    """GLM-4.7's shape: its template opens <think> in the prompt, so the model writes reasoning, </think>, content.

    The markers are structural: </think> is placed, never sampled (nor is <think>), and EOS cannot end the
    reasoning or come first in the content, so every chat answer with at least 2 tokens of room is reasoning,
    </think> and content (at least one token of it from 3 tokens of room): what comes back as reasoning_content
    and content then depends on the reasoning parser and start_in_reasoning, as in TabbyAPI, not on what a low-bit
    model happens to sample. </think> comes at step min(REASONING_TOKENS, max_tokens // 2), at least 1
    (REASONING_TOKENS without max_tokens).
    """
    markers = (THINK_ID, THINK_END_ID)
    if not think:
        return Steering(banned=markers, stop_from=1)
    close = min(REASONING_TOKENS, max(max_tokens // 2, 1)) if max_tokens else REASONING_TOKENS
    return Steering(forced={close: THINK_END_ID}, banned=markers, stop_from=close + 2)


def check_context(settings: ModelSettings, prompt_tokens: int) -> None:
    """TabbyAPI's validate_context_requirements with its defaults (output chunking on: a job first allocates
    prompt - 1 + chunk_size tokens, rounded up to 256-token pages); a longer max_tokens is not an error, the
    generation ends at max_seq_len."""
    if prompt_tokens > settings.max_seq_len:
        raise ContextLengthError(
            f"Prompt length {prompt_tokens} exceeds the available context size of {settings.max_seq_len} tokens"
        )
    required = -(-(prompt_tokens - 1 + settings.chunk_size) // 256) * 256
    if required > settings.cache_size:
        raise ContextLengthError(
            f"Initial job allocation requires {required} cache tokens, which exceeds the available context "
            f"size of {settings.cache_size} tokens"
        )


@dataclass
class Generation:
    """One generated sequence with the per-token logprob records TabbyAPI builds (chat format)."""

    ids: list[int]
    records: list[dict[str, Any]]
    finish_reason: str


def _max_tokens(state: ServerState, prompt_ids: list[int], body: dict[str, Any]) -> int:
    """max_tokens validated like TabbyAPI (a 422 for a bad value, a 400 before any token when it overflows)."""
    settings = state.settings
    assert settings is not None
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
    ):
        raise _validation_error("max_tokens", "must be a non-negative integer")
    check_context(settings, len(prompt_ids))
    if not max_tokens:
        max_tokens = settings.max_seq_len - len(prompt_ids) - 1
    return max_tokens


def _generate(
    state: ServerState,
    prompt_ids: list[int],
    body: dict[str, Any],
    top_k: int,
    steering: Steering = Steering(),
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Sample up to max_tokens tokens as steered (a completion is not steered; a chat is, chat_steering), paced
    by state.pacing; on_token sees each token when it is ready. ban_eos_token (alias ignore_eos) bans EOS. The
    generation ends at max_seq_len (TabbyAPI: a larger max_tokens is no error)."""
    model = _loaded(state)
    settings = state.settings
    assert settings is not None
    max_tokens = _max_tokens(state, prompt_ids, body)
    ban_eos = bool(body.get("ban_eos_token", body.get("ignore_eos", False)))
    rng = np.random.default_rng(len(prompt_ids))
    ids: list[int] = []
    records: list[dict[str, Any]] = []
    finish_reason = "length"
    started = time.monotonic()
    for step in range(min(max_tokens, settings.max_seq_len - len(prompt_ids))):
        logprobs = model.logprobs(prompt_ids + ids)
        token = steering.forced.get(step)
        if token is None:
            blocked = list(steering.banned) + ([EOS_ID] if ban_eos or step < steering.stop_from else [])
            allowed = logprobs.copy()
            allowed[blocked] = -np.inf
            token = _sample(allowed, body, rng)
        if token == EOS_ID:
            finish_reason = "stop"
            break
        ids.append(token)
        record: dict[str, Any] = {
            "token": model.tokenizer.pieces[token],
            "token_id": token,
            "logprob": float(logprobs[token]),
            "top_logprobs": [],
        }
        if top_k > 0:
            record["top_logprobs"] = [
                {"token": piece, "token_id": i, "logprob": lp}
                for i, piece, lp in _top_entries(model, logprobs, top_k)
            ]
        records.append(record)
        ready = started + state.pacing.first_token_delay_s + step * state.pacing.token_delay_s
        time.sleep(max(0.0, ready - time.monotonic()))
        if on_token is not None:
            on_token(token)
    return Generation(ids=ids, records=records, finish_reason=finish_reason)


def _fail_if_triggered(state: ServerState, text: str, what: str) -> None:
    """A failed generation as TabbyAPI answers it (503, an issue on /health for good, the next request served);
    triggered by ERROR_TRIGGER in the prompt, or every time when the server cannot generate (fail_generations:
    as measured with the GPU's memory taken by another process, benchmarks/gpu_stack/RESULTS.md section 3)."""
    if state.fail_generations:
        state.add_issue("OutOfMemoryError: CUDA out of memory (test server: fail_generations)")
    elif ERROR_TRIGGER in text:
        state.add_issue("RuntimeError: test server: generation error requested by the prompt")
    else:
        return
    raise ApiError(
        503,
        f"{what} {uuid.uuid4().hex} aborted. Maybe the model was unloaded? Please check the server console.",
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class EventSink:
    """The SSE side of one response: 200 and text/event-stream headers before the first event, then one
    `data: ...` frame per event, CRLF-separated as sse-starlette writes them (TabbyAPI's EventSourceResponse)."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.handler = handler
        self.started = False

    def send(self, data: dict[str, Any] | str) -> None:
        """One event; a dict is serialized like TabbyAPI's json.dumps(..., ensure_ascii=False)."""
        if not self.started:
            self.handler.send_response(200)
            self.handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.handler.send_header("Cache-Control", "no-store")
            self.handler.end_headers()
            self.started = True
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self.handler.wfile.write(f"data: {text}\r\n\r\n".encode())
        self.handler.wfile.flush()


@dataclass
class StreamedChoice:
    """One choice being streamed: tokens waiting for their chunk, and which delta field they go to."""

    index: int
    delta_field: str
    pending: list[int] = field(default_factory=list)


def _stream_usage(
    prompt_tokens: int, completion_tokens: int, prompt_time: float, total_time: float
) -> dict[str, Any]:
    """TabbyAPI's UsageStats (endpoints/OAI/types/common.py), as sent in the last chunk of a stream."""
    completion_time = max(total_time - prompt_time, 0.0)
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_time": prompt_time,
        "prompt_tokens_per_sec": prompt_tokens / prompt_time if prompt_time > 0 else "Inf",
        "completion_tokens": completion_tokens,
        "completion_time": completion_time,
        "completion_tokens_per_sec": completion_tokens / completion_time if completion_time > 0 else "Inf",
        "total_tokens": prompt_tokens + completion_tokens,
        "total_time": total_time,
    }


class Streamer:
    """Turns generated tokens into TabbyAPI's stream chunks (completion or chat shape) on an EventSink."""

    def __init__(self, state: ServerState, sink: EventSink, chat: bool, body: dict[str, Any]) -> None:
        self.state = state
        self.sink = sink
        self.chat = chat
        self.request_id = uuid.uuid4().hex
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def _chunk(self, choice: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        settings = self.state.settings
        assert settings is not None
        data: dict[str, Any] = {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "choices": [choice],
        }
        if usage is not None:
            data["usage"] = usage
        data["model" if self.chat else "model_name"] = settings.name
        return data

    def _text_choice(
        self, index: int, text: str, field_name: str, finish_reason: str | None
    ) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "delta": {field_name: text} if text else {},
                "finish_reason": finish_reason,
            }
        return {"index": index, "text": text, "finish_reason": finish_reason}

    def flush(self, choice: StreamedChoice) -> None:
        """Send the pending tokens as one chunk."""
        if choice.pending:
            model = _loaded(self.state)
            text = model.tokenizer.decode(choice.pending)
            choice.pending.clear()
            self.sink.send(self._chunk(self._text_choice(choice.index, text, choice.delta_field, None)))

    def on_token(self, choice: StreamedChoice, split: ReasoningSplit | None) -> Callable[[int], None]:
        """The per-token callback: chunks of pacing.tokens_per_chunk tokens; in a chat the reasoning split (the same
        as the non-streamed answer's) picks delta.reasoning_content or delta.content."""
        model = _loaded(self.state)

        def take(token: int) -> None:
            channel = split.route(model.tokenizer.pieces[token]) if split else "content"
            if channel is None:  # a consumed reasoning tag
                self.flush(choice)
                return
            field_name = "reasoning_content" if channel == "reasoning" else "content"
            if field_name != choice.delta_field:
                self.flush(choice)
                choice.delta_field = field_name
            choice.pending.append(token)
            if len(choice.pending) >= self.state.pacing.tokens_per_chunk:
                self.flush(choice)

        return take

    def send_finish(self, index: int, finish_reason: str, usage: dict[str, Any] | None = None) -> None:
        """A choice's finish chunk (empty text), carrying usage when given."""
        self.sink.send(self._chunk(self._text_choice(index, "", "content", finish_reason), usage))

    def finish(self, index: int, finish_reason: str, usage: dict[str, Any]) -> None:
        """The last finish chunk (with usage when include_usage asked for it), then [DONE]."""
        self.send_finish(index, finish_reason, usage if self.include_usage else None)
        self.sink.send("[DONE]")

    def error(self, message: str) -> None:
        """A generation error inside the stream: TabbyAPI's TabbyRequestError event, no [DONE]."""
        self.sink.send({"error": {"message": message, "trace": None}})


def _stream_completions(
    state: ServerState, body: dict[str, Any], prompts: list[str], sink: EventSink
) -> None:
    """A streamed completion: every prompt is checked against max_seq_len before the 200 is sent."""
    model = _loaded(state)
    encoded = [model.tokenizer.encode(prompt) for prompt in prompts]
    for prompt_ids in encoded:
        _max_tokens(state, prompt_ids, body)
    streamer = Streamer(state, sink, chat=False, body=body)
    started = time.monotonic()
    completion_tokens, finish_reason = 0, "length"
    for index, (prompt, prompt_ids) in enumerate(zip(prompts, encoded)):
        try:
            _fail_if_triggered(state, prompt, "Completion")
        except ApiError:
            streamer.error(STREAM_ABORTED.format(what="Completion"))
            return
        choice = StreamedChoice(index=index, delta_field="content")
        generation = _generate(state, prompt_ids, body, 0, on_token=streamer.on_token(choice, None))
        streamer.flush(choice)
        completion_tokens += len(generation.ids)
        finish_reason = generation.finish_reason
        if index < len(prompts) - 1:
            streamer.send_finish(index, finish_reason)
    prompt_time = min(state.pacing.first_token_delay_s, time.monotonic() - started)
    usage = _stream_usage(
        sum(len(ids) for ids in encoded), completion_tokens, prompt_time, time.monotonic() - started
    )
    streamer.finish(len(prompts) - 1, finish_reason, usage)


def completions(
    state: ServerState, body: dict[str, Any], sink: EventSink | None = None
) -> dict[str, Any] | None:
    """POST /v1/completions: string or list of strings; logprobs K -> top-K dicts keyed by decoded strings;
    `stream: true` answers on the sink and returns None."""
    model = _loaded(state)
    prompts = body.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _validation_error("prompt", "Input should be a valid string or a list of strings")
    top_k = body.get("logprobs") or 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise _validation_error("logprobs", "must be a non-negative integer")
    if body.get("stream") and sink is not None:
        _stream_completions(state, body, prompts, sink)
        return None
    choices = []
    prompt_tokens = completion_tokens = 0
    for index, prompt in enumerate(prompts):
        _fail_if_triggered(state, prompt, "Completion")
        prompt_ids = model.tokenizer.encode(prompt)
        generation = _generate(state, prompt_ids, body, top_k if top_k > 1 else 0)
        logprobs = None
        if top_k:
            records = generation.records
            offsets, offset = [], 0
            for record in records:
                offsets.append(offset)
                offset += len(record["token"])
            logprobs = {
                "tokens": [r["token"] for r in records],
                "token_logprobs": [r["logprob"] for r in records],
                # The collision quirk: {tp.token: tp.logprob for tp in top_logprobs} keeps the last duplicate.
                "top_logprobs": [
                    {t["token"]: t["logprob"] for t in r["top_logprobs"]} or None for r in records
                ],
                "text_offset": offsets,
            }
        choices.append(
            {
                "index": index,
                "finish_reason": generation.finish_reason,
                "eos_reason": None,
                "logprobs": logprobs,
                "text": model.tokenizer.decode(generation.ids),
            }
        )
        prompt_tokens += len(prompt_ids)
        completion_tokens += len(generation.ids)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "choices": choices,
        "created": int(time.time()),
        "model": state.settings.name if state.settings else "",
        "object": "text_completion",
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def chat_prompt(
    messages: list[dict[str, Any]], add_generation_prompt: bool = True, think: bool = True
) -> str:
    """The test model's chat template, GLM-4.7-like: role markers, and a generation prompt that opens the reasoning
    block itself (`<|assistant|><think>`), or closes it when thinking is off (`</think>`, enable_thinking false)."""
    text = "".join(f"<|{m.get('role', 'user')}|>\n{m.get('content') or ''}" for m in messages)
    if not add_generation_prompt:
        return text
    return text + "<|assistant|>\n" + ("<think>" if think else "</think>")


TAG_PATTERN_MAX = 32  # TabbyAPI's _tags_max_length
THINK_PREFIX_MAX_CHARS = 256  # TabbyAPI's _think_prefix_max_chars


def starts_in_reasoning(settings: ModelSettings, prompt: str) -> bool:
    """TabbyAPI's _resolve_start_in_reasoning (endpoints/OAI/utils/chat_completion.py): always/never as set; auto
    when the prompt's last reasoning tag is the start tag, near its end, with no other tag after it."""
    if not settings.reasoning or settings.start_in_reasoning == "never":
        return False
    if settings.start_in_reasoning == "always":
        return True
    start, end = settings.reasoning_start_token, settings.reasoning_end_token
    last_start, last_end = prompt.rfind(start), prompt.rfind(end)
    if last_start <= last_end:
        return False
    after = last_start + len(start)
    if len(prompt) - after > THINK_PREFIX_MAX_CHARS:
        return False
    tag = re.escape(start[:1]) + r"\S{1," + str(TAG_PATTERN_MAX - 2) + "}" + re.escape(start[-1:])
    return re.search(tag, prompt[after:]) is None


class ReasoningSplit:
    """Routes generated tokens as TabbyAPI's TagStreamParser does: the reasoning tags are consumed and switch the
    channel; the test model writes them as whole tokens. test_server.reasoning_parser swaps in what broken parsers
    produce: "none" splits nothing (every token is content, markers included: TabbyAPI without PR #295, or
    model.reasoning off), "no-end" never recognises the end tag (it and the answer stay in reasoning_content)."""

    def __init__(self, state: ServerState, prompt: str) -> None:
        settings = state.settings
        assert settings is not None
        mode = state.reasoning_parser if settings.reasoning else "none"
        self.start = settings.reasoning_start_token if mode != "none" else None
        self.end = settings.reasoning_end_token if mode == "tabby" else None
        self.in_reasoning = mode != "none" and starts_in_reasoning(settings, prompt)

    def route(self, piece: str) -> str | None:
        """ "reasoning" or "content" for a token's text, None for a consumed tag."""
        if piece in (self.start, self.end):
            self.in_reasoning = piece == self.start
            return None
        return "reasoning" if self.in_reasoning else "content"


def split_reasoning(state: ServerState, pieces: list[str], prompt: str) -> tuple[list[int], list[int]]:
    """The positions of the generated tokens that go to reasoning_content and to content (ReasoningSplit)."""
    router = ReasoningSplit(state, prompt)
    channels = [router.route(piece) for piece in pieces]
    reasoning = [i for i, channel in enumerate(channels) if channel == "reasoning"]
    return reasoning, [i for i, channel in enumerate(channels) if channel == "content"]


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _validation_error("messages", "Input should be a valid list of messages")
    return messages


def _stream_chat(
    state: ServerState, body: dict[str, Any], prompt: str, steering: Steering, sink: EventSink
) -> None:
    """A streamed chat answer; reasoning goes to delta.reasoning_content when model.reasoning is on."""
    model = _loaded(state)
    settings = state.settings
    assert settings is not None
    prompt_ids = model.tokenizer.encode(prompt)
    _max_tokens(state, prompt_ids, body)
    streamer = Streamer(state, sink, chat=True, body=body)
    started = time.monotonic()
    try:
        _fail_if_triggered(state, prompt, "Chat completion")
    except ApiError:
        streamer.error(STREAM_ABORTED.format(what="Chat completion"))
        return
    choice = StreamedChoice(index=0, delta_field="content")
    generation = _generate(
        state, prompt_ids, body, 0, steering, streamer.on_token(choice, ReasoningSplit(state, prompt))
    )
    streamer.flush(choice)
    total_time = time.monotonic() - started
    usage = _stream_usage(
        len(prompt_ids), len(generation.ids), min(state.pacing.first_token_delay_s, total_time), total_time
    )
    streamer.finish(0, generation.finish_reason, usage)


def chat_completions(
    state: ServerState, body: dict[str, Any], sink: EventSink | None = None
) -> dict[str, Any] | None:
    """POST /v1/chat/completions; a thinking model emits <think>..</think> first (split when reasoning is on);
    `stream: true` answers on the sink and returns None."""
    model = _loaded(state)
    settings = state.settings
    assert settings is not None
    messages = _messages(body)
    template_vars = body.get("template_vars") if isinstance(body.get("template_vars"), dict) else {}
    think = state.think and template_vars.get("enable_thinking", True) is not False
    prompt = chat_prompt(messages, think=think)
    max_tokens = body.get("max_tokens")
    valid = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
    room = max_tokens if valid else 0  # an invalid max_tokens is _generate's 422
    if body.get("stream") and sink is not None:
        _stream_chat(state, body, prompt, chat_steering(think, room), sink)
        return None
    _fail_if_triggered(state, prompt, "Chat completion")
    prompt_ids = model.tokenizer.encode(prompt)
    top_k = body.get("top_logprobs") or 0 if body.get("logprobs") else 0
    generation = _generate(state, prompt_ids, body, top_k, chat_steering(think, room))
    pieces = [model.tokenizer.pieces[i] for i in generation.ids]
    reasoning_at, content_at = split_reasoning(state, pieces, prompt)
    reasoning = model.tokenizer.decode([generation.ids[i] for i in reasoning_at])
    content = model.tokenizer.decode([generation.ids[i] for i in content_at])
    span = [generation.records[i] for i in content_at]  # logprobs: the content span only
    message = {
        "role": "assistant",
        "content": content if content.strip() else None,
        "reasoning_content": reasoning or None,
        "tool_calls": None,
        "tool_call_id": None,
    }
    logprobs = {"content": span} if body.get("logprobs") else None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "choices": [
            {
                "index": 0,
                "finish_reason": generation.finish_reason,
                "eos_reason": None,
                "stop_str": None,
                "message": message,
                "logprobs": logprobs,
            }
        ],
        "created": int(time.time()),
        "model": settings.name,
        "object": "chat.completion",
        "usage": _usage(len(prompt_ids), len(generation.ids)),
    }


def token_encode(state: ServerState, body: dict[str, Any], sink: EventSink | None = None) -> dict[str, Any]:
    """POST /v1/token/encode: a string, or chat messages through the template (no generation prompt)."""
    model = _loaded(state)
    text = body.get("text")
    if isinstance(text, list):
        text = chat_prompt(text, add_generation_prompt=False, think=state.think)
    if not isinstance(text, str):
        raise ApiError(422, "Unable to tokenize the provided text. Check your formatting?")
    tokens = model.tokenizer.encode(text, encode_special_tokens=body.get("encode_special_tokens", True))
    return {"tokens": tokens, "length": len(tokens)}


def model_card(state: ServerState) -> dict[str, Any]:
    """GET /v1/model: TabbyAPI's ModelCard with the parameters from config.yml."""
    _loaded(state)
    s = state.settings
    assert s is not None
    return {
        "id": s.name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "tabbyAPI",
        "logging": None,
        "parameters": {
            "max_seq_len": s.max_seq_len,
            "cache_size": s.cache_size,
            "cache_mode": s.cache_mode,
            "rope_scale": 1.0,
            "rope_alpha": 1.0,
            "max_batch_size": s.max_batch_size,
            "chunk_size": s.chunk_size,
            "prompt_template": "chat_template",
            "prompt_template_content": None,
            "use_vision": False,
            "draft": None,
        },
    }


def health(state: ServerState) -> tuple[int, dict[str, Any]]:
    """GET /health (no auth): 200 healthy, or 503 unhealthy with every recorded issue."""
    with state.lock:
        issues = list(state.issues)
    return (503 if issues else 200), {"status": "unhealthy" if issues else "healthy", "issues": issues}


ROUTES = {
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/chat/completions"): chat_completions,
    ("POST", "/v1/token/encode"): token_encode,
}


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the functions above; every answer is JSON."""

    server_version = "tabby-test-server/1"
    state: ServerState

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read JSON, not access logs."""

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        with self.state.lock:
            self.state.served[f"{method} {path}"] += 1
        try:
            if method == "GET" and path == "/health":
                self._send(*health(self.state))
                return
            if method == "GET" and path == "/v1/model":
                _check_key(self.state, self.headers)
                self._send(200, model_card(self.state))
                return
            route = ROUTES.get((method, path))
            if route is None:
                raise ApiError(404, "Not Found")
            _check_key(self.state, self.headers)
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise _validation_error("body", "JSON decode error") from None
            if not isinstance(body, dict):
                raise _validation_error("body", "Input should be a valid dictionary")
            sink = EventSink(self)
            answer = route(self.state, body, sink)
            if answer is not None:
                self._send(200, answer)
        except ApiError as error:
            self._send(error.status, error.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away mid-stream (a benchmark's timeout): nothing left to answer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")


def make_http_server(state: ServerState, host: str, port: int) -> ThreadingHTTPServer:
    """Bind (the port opens here) a threading server whose handlers share state."""
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server

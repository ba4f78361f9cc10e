"""The load generator: a warm-up, then a concurrency sweep of streamed requests.

Bounded by construction: every level draws from a finite list of prebuilt prompts (BenchRequest.max_requests
in all), every request has a timeout, no request starts after its batch's start window (--duration for a timed
level), so the generation phases end within deadline_s, and every request goes to the one --url
(endpoint.make_client). Each worker has its own one-connection client,
kept across levels and connected just before a batch starts, so no measured request pays a connection set-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import httpx

from ..errors import BadInput, VerificationFailed
from . import shaping
from .ceiling import Ceiling, ceiling_warning
from .endpoint import ServerInfo, count_tokens, make_client, probe, stream_request
from .metrics import RequestRecord, level_metrics
from .options import BenchRequest
from .result import BenchResult, LevelResult


class Progress(Protocol):
    """Where the run reports what it is doing (a rich progress bar on stderr, or nothing in tests)."""

    def phase(self, label: str, total: int) -> None:
        """A new phase with `total` steps."""

    def advance(self) -> None:
        """One step of the current phase done."""

    def note(self, text: str) -> None:
        """A line worth keeping (a level's summary, a warning)."""


class NoProgress:
    """Reports nothing."""

    def phase(self, label: str, total: int) -> None:
        """Nothing."""

    def advance(self) -> None:
        """Nothing."""

    def note(self, text: str) -> None:
        """Nothing."""


def start_window_s(request: BenchRequest, requests: int, concurrency: int, timed: bool) -> float:
    """How long a batch may keep starting requests: --duration for a timed level, else as many request timeouts
    as the batch has waves (a bound only a server that keeps timing out reaches)."""
    waves = math.ceil(requests / max(concurrency, 1)) * request.request_timeout_s
    return min(waves, request.duration_s) if timed and request.duration_s else waves


def deadline_s(request: BenchRequest) -> float:
    """The most wall time the generation phases can take: each batch's start window plus one request timeout."""
    total = 0.0
    if request.warmup:
        total += start_window_s(request, request.warmup, min(request.warmup, max(request.concurrency)), False)
        total += request.request_timeout_s
    for concurrency in request.concurrency:
        total += start_window_s(request, request.requests_at(concurrency), concurrency, True)
        total += request.request_timeout_s
    return total


class LoadGenerator:
    """The workers' clients and the request loop of one run."""

    def __init__(
        self,
        request: BenchRequest,
        info: ServerInfo,
        progress: Progress,
    ) -> None:
        self.request = request
        self.info = info
        self.progress = progress
        self.clients: list[httpx.AsyncClient] = []

    async def open_workers(self, count: int) -> None:
        """Clients for workers 0..count-1, each connection (re)opened now with one GET of the model card: an idle
        keep-alive connection may have been closed by the server (uvicorn: after 5 s) while prompts were built."""
        while len(self.clients) < count:
            self.clients.append(
                make_client(self.request.url, self.request.api_key, self.request.request_timeout_s, 1)
            )

        async def connect(client: httpx.AsyncClient) -> None:
            try:
                await client.get(self.info.model_path)
            except httpx.HTTPError:
                pass  # the first request will connect, and fail if it must

        await asyncio.gather(*(connect(client) for client in self.clients[:count]))

    async def close(self) -> None:
        """Close every worker's connection."""
        await asyncio.gather(*(client.aclose() for client in self.clients))

    async def send(
        self, http: httpx.AsyncClient, prompt: shaping.Prompt, level_start: float
    ) -> RequestRecord:
        """One request, never longer than --request-timeout; transport errors become failed records."""
        body = shaping.request_body(
            self.request.endpoint, self.info.model_id, prompt.text, self.request.output_len
        )
        started = time.perf_counter()
        try:
            record = await asyncio.wait_for(
                stream_request(http, self.request.path, body, started, level_start),
                self.request.request_timeout_s,
            )
        except asyncio.TimeoutError:
            record = RequestRecord(
                ok=False,
                start_s=started - level_start,
                latency_s=time.perf_counter() - started,
                error=f"no end of stream within --request-timeout {self.request.request_timeout_s:g} s",
            )
        except httpx.HTTPError as error:
            record = RequestRecord(
                ok=False,
                start_s=started - level_start,
                latency_s=time.perf_counter() - started,
                error=f"{type(error).__name__}: {error}"[:300],
            )
        if record.prompt_tokens is None and prompt.tokens is not None:
            record = dataclasses.replace(record, prompt_tokens=prompt.tokens)
        return record

    async def run_batch(
        self, prompts: Sequence[shaping.Prompt], concurrency: int, timed: bool
    ) -> tuple[list[RequestRecord], float]:
        """`concurrency` workers take prompts until none is left or the batch's start window has closed."""
        workers = max(1, min(concurrency, len(prompts)))
        await self.open_workers(workers)
        pending = deque(prompts)
        records: list[RequestRecord] = []
        level_start = time.perf_counter()
        stop_at = level_start + start_window_s(self.request, len(prompts), workers, timed)

        async def worker(http: httpx.AsyncClient) -> None:
            while pending and time.perf_counter() < stop_at:
                records.append(await self.send(http, pending.popleft(), level_start))
                self.progress.advance()

        await asyncio.gather(*(worker(client) for client in self.clients[:workers]))
        return records, time.perf_counter() - level_start


class Prompts:
    """The prompt supply of one run: the next free header number, the word count that fitted last, the tokenizer."""

    def __init__(self, http: httpx.AsyncClient, request: BenchRequest, info: ServerInfo, nonce: int) -> None:
        self.http = http
        self.request = request
        self.info = info
        self.number = nonce
        self.tokenizer_requests = 0
        self.target = request.input_len
        self.fitter = shaping.PromptFitter(self.count, nonce)
        self.words = max(1, request.input_len - shaping.HEADER_WORDS - 2)  # one token per word until measured

    async def count(self, text: str) -> int:
        """One tokenizer request."""
        self.tokenizer_requests += 1
        return await count_tokens(self.http, self.request.endpoint, text)

    async def fit(self, target: int) -> None:
        """Find the word count that fits `target` tokens for this run's next header (a guess for the others)."""
        self.target = target
        if self.info.tokenizer:
            self.words = (await self.fitter.fit(shaping.header(self.number), target)).words

    def rescale(self, tokens_per_word: float) -> None:
        """Without a tokenizer: resize the prompts once the server's usage told how many tokens a word is."""
        self.words = max(
            1, round((self.request.input_len - shaping.HEADER_WORDS - 2) / max(tokens_per_word, 0.1))
        )

    async def take(self, n: int) -> list[shaping.Prompt]:
        """n fresh prompts, none sharing a header with any earlier one."""
        if self.info.tokenizer:
            prompts = await shaping.fitted_prompts(self.fitter, self.target, self.number, n, self.words)
        else:
            prompts = shaping.unfitted_prompts(self.fitter.seed, self.words, self.number, n)
        self.number += n
        return prompts


async def _warm_up(
    generator: LoadGenerator, prompts: Prompts, request: BenchRequest, progress: Progress
) -> int:
    """The warm-up requests; returns the tokens the server adds to a counted prompt (then refits the body)."""
    batch = await prompts.take(request.warmup)
    progress.phase(f"warm-up ({request.warmup} requests)", request.warmup)
    records, _ = await generator.run_batch(batch, min(request.warmup, max(request.concurrency)), False)
    if not any(r.ok for r in records):
        raise VerificationFailed(
            f"every warm-up request to {request.url}{request.path} failed: {records[0].error}",
            "check --endpoint and --model; nothing else was sent",
        )
    overhead = shaping.prompt_overhead([p.tokens for p in batch], [r.prompt_tokens for r in records])
    if prompts.info.tokenizer and overhead and request.input_len - overhead > 0:
        await prompts.fit(request.input_len - overhead)
    served = sorted(r.prompt_tokens for r in records if r.ok and r.prompt_tokens)
    if not prompts.info.tokenizer and served:
        prompts.rescale(served[len(served) // 2] / (batch[0].words + shaping.HEADER_WORDS))
    return overhead


async def run(
    request: BenchRequest,
    progress: Progress,
    ceiling: Ceiling | None = None,
) -> BenchResult:
    """The whole run: probe, fit the prompt body, warm up, then each concurrency level in order."""
    nonce = (
        request.seed
        if request.seed is not None
        else secrets.randbelow(len(shaping.WORDS) ** shaping.HEADER_WORDS)
    )
    async with make_client(
        request.url, request.api_key, request.request_timeout_s, shaping.CHECK_PARALLEL
    ) as http:
        info = await probe(http, request.url, request.model)
        _check_context(request, info)
        warnings = _warnings(request, info, ceiling)
        prompts = Prompts(http, request, info, nonce)
        progress.phase(
            "fitting prompts to the server's tokenizer" if info.tokenizer else "building prompts", 1
        )
        await prompts.fit(request.input_len)
        progress.advance()
        generator = LoadGenerator(request, info, progress)
        try:
            overhead = await _warm_up(generator, prompts, request, progress) if request.warmup else 0
            levels = []
            for concurrency in request.concurrency:
                n = request.requests_at(concurrency)
                progress.phase(f"preparing {n} prompts for concurrency {concurrency}", 1)
                batch = await prompts.take(n)
                progress.advance()
                progress.phase(f"concurrency {concurrency}", n)
                records, duration = await generator.run_batch(batch, concurrency, True)
                metrics = level_metrics(records, duration, request.slo_ms or None)
                level = LevelResult(
                    concurrency=concurrency,
                    num_prompts=n,
                    sent=len(records),
                    metrics=metrics,
                    ceiling_warning=ceiling_warning(ceiling, metrics) if ceiling else None,
                )
                levels.append(level)
                progress.note(level.summary_line())
                if level.ceiling_warning:
                    progress.note(f"warning: {level.ceiling_warning}")
        finally:
            await generator.close()
    return BenchResult(
        url=request.url,
        endpoint=request.endpoint,
        model_id=info.model_id,
        input_len=request.input_len,
        output_len=request.output_len,
        input_exact=info.tokenizer,
        prompt_overhead_tokens=overhead,
        warmup=request.warmup,
        slo_ms=dict(request.slo_ms),
        duration_bound_s=request.duration_s,
        request_timeout_s=request.request_timeout_s,
        server_parameters=info.parameters,
        ceiling=ceiling,
        tokenizer_requests=prompts.tokenizer_requests,
        max_requests=request.max_requests(),
        deadline_s=deadline_s(request),
        levels=tuple(levels),
        warnings=tuple(warnings),
        metadata=dict(request.metadata),
    )


def _check_context(request: BenchRequest, info: ServerInfo) -> None:
    """Refuse lengths the server cannot take before any generation request (bad input, exit 2)."""
    max_seq_len = info.parameters.get("max_seq_len")
    if isinstance(max_seq_len, int) and request.input_len + request.output_len > max_seq_len:
        raise BadInput(
            f"--input-len {request.input_len} + --output-len {request.output_len} exceed the server's "
            f"max_seq_len {max_seq_len}",
            "shorten them",
        )


def _warnings(request: BenchRequest, info: ServerInfo, ceiling: Ceiling | None) -> list[str]:
    """What makes the numbers mean less than they seem: no tokenizer, levels past the server's batch size, no
    measured ceiling."""
    warnings = []
    if not info.tokenizer:
        warnings.append(
            "the server has no /v1/token/encode: input lengths are approximate (the server's usage "
            "reports what it counted)"
        )
    batch = info.parameters.get("max_batch_size")
    if isinstance(batch, int) and any(c > batch for c in request.concurrency):
        warnings.append(f"the server's max_batch_size is {batch}: levels above it queue in the server")
    if ceiling is None:
        warnings.append(
            "no measured load-generator ceiling (profiles/bench_ceiling.yaml): this run cannot tell "
            "whether a level measured the client instead of the server"
        )
    return warnings

"""A small async load generator for one OpenAI-compatible endpoint (TabbyAPI): streamed /v1/completions at fixed
concurrency, distinct prompts, fixed output length, token counts from the final chunk's `usage`.

Per request it records time to first token (TTFT), the arrival time of every streamed chunk (ITL is the gap between
chunks; one SSE chunk can carry several tokens, ../../../shared/facts/tabbyapi.md), end-to-end latency, and
`usage`. Per concurrency level: decode tokens/s (sum over requests of (completion_tokens - 1) / (last chunk - first
chunk), i.e. the decode phase only), output tokens/s (all completion tokens over the level's wall time), and the
distributions. It sends exactly `requests` requests per level and nothing else.

    python3 load.py --url http://127.0.0.1:5000 --concurrency 1 2 4 8 --max-tokens 256 --out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 of values (seconds or rates), None when empty."""
    return {
        "mean": statistics.fmean(values) if values else None,
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "n": len(values),
    }


async def one_request(
    client: httpx.AsyncClient, prompt: str, max_tokens: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """One streamed completion; times in seconds from the send."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ban_eos_token": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        **extra,
    }
    record: dict[str, Any] = {"chunk_times": []}
    started = time.perf_counter()
    record["sent_at"] = time.time()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            record["status"] = response.status_code
            if response.status_code != 200:
                record["error"] = (await response.aread()).decode(errors="replace")[:500]
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - started
                chunk = json.loads(data)
                if chunk.get("usage"):
                    record["usage"] = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    record["chunk_times"].append(now)
    except (httpx.HTTPError, ValueError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
    record["e2e_s"] = time.perf_counter() - started
    return record


def summarize_level(concurrency: int, records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The per-level figures from the per-request records."""
    ok = [r for r in records if not r.get("error") and r.get("usage") and r["chunk_times"]]
    ttft = [r["chunk_times"][0] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
    tokens = [int(r["usage"].get("completion_tokens") or 0) for r in ok]
    decode_rates, tpot = [], []
    for r, n in zip(ok, tokens):
        span = r["chunk_times"][-1] - r["chunk_times"][0]
        if n > 1 and span > 0:
            decode_rates.append((n - 1) / span)
            tpot.append(span / (n - 1))
    prompt_tokens = [int(r["usage"].get("prompt_tokens") or 0) for r in ok]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "wall_s": wall_s,
        "completion_tokens": sum(tokens),
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompt_tokens else None,
        "output_tokens_per_s": sum(tokens) / wall_s if wall_s > 0 else None,
        "decode_tokens_per_s_per_request": spread(decode_rates),
        "decode_tokens_per_s_aggregate": concurrency * statistics.fmean(decode_rates)
        if decode_rates
        else None,
        "ttft_s": spread(ttft),
        "tpot_s": spread(tpot),
        "itl_chunk_s": spread(itl),
        "e2e_s": spread([r["e2e_s"] for r in ok]),
        "chunks_per_request": statistics.fmean(len(r["chunk_times"]) for r in ok) if ok else None,
        "errors": [r.get("error") for r in records if r.get("error")][:5],
    }


async def run_level(
    url: str,
    api_key: str | None,
    concurrency: int,
    prompts: list[str],
    max_tokens: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """`len(prompts)` requests through `concurrency` workers (each sends its next prompt when the last ends)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                records.append(await one_request(client, prompt, max_tokens, extra))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    level = summarize_level(concurrency, records, wall)
    level["raw"] = [
        {k: v for k, v in r.items() if k != "chunk_times"}
        | {
            "chunks": len(r["chunk_times"]),
            "first_chunk_s": r["chunk_times"][0] if r["chunk_times"] else None,
            "last_chunk_s": r["chunk_times"][-1] if r["chunk_times"] else None,
        }
        for r in records
    ]
    return level


def distinct_prompts(text: str, count: int, chars: int, offset: int = 0) -> list[str]:
    """count prompts of `chars` characters from different places of text (no shared prefix for the prompt cache)."""
    step = max(chars, (len(text) - offset - chars) // max(count, 1))
    return [text[offset + i * step : offset + i * step + chars] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", help="X-API-Key (TabbyAPI with auth)")
    parser.add_argument("--text", type=Path, required=True, help="a text file the prompts are cut from")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="requests per worker per level")
    parser.add_argument("--prompt-chars", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8", errors="replace")
    levels, offset = [], 0
    for concurrency in args.concurrency:
        prompts = distinct_prompts(text, concurrency * args.rounds, args.prompt_chars, offset)
        offset += 7919  # the next level starts elsewhere too
        levels.append(
            asyncio.run(run_level(args.url, args.api_key, concurrency, prompts, args.max_tokens, {}))
        )
        print(json.dumps({k: v for k, v in levels[-1].items() if k != "raw"}), flush=True)
    args.out.write_text(json.dumps({"levels": levels}, indent=1))


if __name__ == "__main__":
    main()

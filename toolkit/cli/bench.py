"""`deploy bench`: measure a live endpoint's speed (TTFT, TPOT, ITL, E2EL, throughput) over a concurrency sweep."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EXIT_OK, BadInput

if TYPE_CHECKING:
    from ..bench.options import BenchRequest


def register(subparsers: Any) -> None:
    """Add the bench parser (numbers are parsed by the bench options, so bad values are one line, exit 2)."""
    parser = subparsers.add_parser(
        "bench",
        help="measure a live endpoint: TTFT, TPOT, ITL, E2EL and throughput over a concurrency sweep",
        description="Streams completion or chat requests of exact input/output token lengths (distinct prompts, so "
        "the prompt cache cannot hide prefill) at each concurrency level, after a warm-up, and reports "
        "what `vllm bench serve` reports, with its JSON field names. Sends at most warm-up + the "
        "levels' requests, only to --url. Exit 0 when the sweep ran (server errors are counted), 2 bad "
        "input, 4 endpoint unreachable, 5 when every warm-up request failed.",
    )
    parser.add_argument("--url", required=True, help="the endpoint's root, e.g. http://127.0.0.1:5000")
    parser.add_argument(
        "--api-key-file", help="a file with the key, or TabbyAPI's api_tokens.yml (default: $DEPLOY_API_KEY)"
    )
    parser.add_argument("--endpoint", default="completions", help="completions (default) or chat")
    parser.add_argument("--concurrency", default="1,2,4,8", help="the levels of the sweep (default 1,2,4,8)")
    parser.add_argument("--input-len", default="1024", help="prompt tokens per request (default 1024)")
    parser.add_argument("--output-len", default="128", help="generated tokens per request (default 128)")
    parser.add_argument(
        "--num-prompts", help="requests per level (default 4 x concurrency, 64 x with --duration)"
    )
    parser.add_argument("--duration", metavar="SECONDS", help="per level, start no request after this long")
    parser.add_argument(
        "--warmup", default="2", help="warm-up requests before the sweep, not measured (default 2)"
    )
    parser.add_argument(
        "--slo", help="goodput objectives in ms, e.g. ttft:2000,tpot:100 (names ttft, tpot, e2el)"
    )
    parser.add_argument(
        "--request-timeout",
        default="600",
        metavar="SECONDS",
        help="a request still streaming after this long fails (default 600)",
    )
    parser.add_argument("--model", help="the model id to send (default: the one the server reports)")
    parser.add_argument(
        "--seed", help="fix the prompts (default: new prompts every run, so no cache is warm)"
    )
    parser.add_argument(
        "--metadata",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recorded with the result, e.g. tabbyapi=e632af4 exllamav3=1.4.2 (what was measured)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (vLLM's field names)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    parser.set_defaults(run=run)


def _request(args: argparse.Namespace) -> BenchRequest:
    """Every flag checked before anything is sent (bad input, exit 2)."""
    from ..bench.options import (
        ENDPOINTS,
        MAX_REQUESTS_PER_LEVEL,
        BenchRequest,
        parse_concurrency,
        parse_int,
        parse_metadata,
        parse_seconds,
        parse_slo,
    )
    from ..verify.client import check_url, read_api_key

    check_url(args.url)
    if args.endpoint not in ENDPOINTS:
        raise BadInput(f"--endpoint {args.endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    concurrency = parse_concurrency(args.concurrency)
    duration = parse_seconds("--duration", args.duration) if args.duration is not None else None
    num_prompts = (
        parse_int("--num-prompts", args.num_prompts, 1, MAX_REQUESTS_PER_LEVEL)
        if args.num_prompts is not None
        else None
    )
    return BenchRequest(
        url=args.url,
        api_key=read_api_key(args.api_key_file),
        endpoint=args.endpoint,
        concurrency=concurrency,
        input_len=parse_int("--input-len", args.input_len, 1, 10_000_000),
        output_len=parse_int("--output-len", args.output_len, 1, 10_000_000),
        num_prompts=num_prompts,
        duration_s=duration,
        warmup=parse_int("--warmup", args.warmup, 0, 10_000),
        slo_ms=parse_slo(args.slo) if args.slo else {},
        request_timeout_s=parse_seconds("--request-timeout", args.request_timeout),
        model=args.model or None,
        seed=parse_int("--seed", args.seed, 0, 2**31 - 1) if args.seed is not None else None,
        metadata=parse_metadata(args.metadata),
    )


def run(args: argparse.Namespace) -> int:
    """Validate, run the sweep with a progress bar on stderr, then print the tables or the JSON."""
    import asyncio

    from ..atomic import write_text
    from ..bench.ceiling import load_ceiling
    from ..bench.loadgen import run as run_bench
    from ..bench.report import RichProgress, print_report
    from ..output import console, emit_json, status_console

    request = _request(args)
    if args.out is not None and args.out.is_dir():
        raise BadInput(f"--out {args.out} is a folder", "give a file name, e.g. --out bench.json")
    status = status_console()
    if not args.json:
        status.print(
            f"benchmarking {request.url}: at most {request.max_requests()} requests "
            f"(warm-up {request.warmup}, levels {', '.join(map(str, request.concurrency))})"
        )
    progress = RichProgress(status)
    progress.start()
    try:
        result = asyncio.run(run_bench(request, progress, load_ceiling()))
    finally:
        progress.stop()
    data = result.to_dict()
    if args.out is not None:
        write_text(args.out, json.dumps(data, indent=2) + "\n")
    if args.json:
        emit_json(data)
    else:
        print_report(result, console())
    return EXIT_OK

"""Why deploy bench's client is built as it is: request rates of four clients against instant_server.py.

    python3 benchmarks/bench_ceiling/baselines.py [--requests 1000]

Clients, each sending one-token streamed completions at concurrency 1, 4, 16 (one process, this machine):
a bare asyncio socket client (the server's own capacity), a blocking http.client loop (concurrency 1 only),
one shared httpx.AsyncClient pool, and one single-connection httpx.AsyncClient per worker (what deploy bench
uses). Writes baselines.json next to this file (rates, CPU ms per request, machine, load average).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from measure import free_port, machine

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"prompt": "a b c", "max_tokens": 1, "stream": True}).encode()
RAW_REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


async def _run(workers: int, requests: int, make_worker: Callable[[list[int]], Awaitable[None]]) -> dict:
    left = [requests]
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(make_worker(left) for _ in range(workers)))
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return {"requests_per_s": requests / wall, "cpu_ms_per_request": used / requests * 1000}


async def raw_socket(port: int, workers: int, requests: int) -> dict:
    """Bare asyncio streams: what the server sustains when the client costs almost nothing."""

    async def worker(left: list[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(RAW_REQUEST)
            await writer.drain()
            await reader.readuntil(b"\r\n0\r\n\r\n")
        writer.close()

    return await _run(workers, requests, worker)


async def httpx_shared(port: int, workers: int, requests: int) -> dict:
    """One AsyncClient whose pool all workers share."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=workers)
    ) as client:

        async def worker(left: list[int]) -> None:
            while left[0] > 0:
                left[0] -= 1
                async with client.stream("POST", "/v1/completions", content=BODY) as response:
                    async for _ in response.aiter_bytes():
                        pass

        return await _run(workers, requests, worker)


async def httpx_per_worker(port: int, workers: int, requests: int) -> dict:
    """One single-connection AsyncClient per worker (deploy bench's choice)."""

    async def worker(left: list[int]) -> None:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=1)
        ) as client:
            while left[0] > 0:
                left[0] -= 1
                async with client.stream("POST", "/v1/completions", content=BODY) as response:
                    async for _ in response.aiter_bytes():
                        pass

    return await _run(workers, requests, worker)


def blocking(port: int, requests: int) -> dict:
    """http.client, one keep-alive connection, one request at a time."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        connection.request("POST", "/v1/completions", BODY, {"content-type": "application/json"})
        connection.getresponse().read()
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return {"requests_per_s": requests / wall, "cpu_ms_per_request": used / requests * 1000}


def main() -> int:
    """Measure every client at every concurrency; write baselines.json."""
    parser = argparse.ArgumentParser(description="client baselines against the instant server")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(HERE / "instant_server.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()
        load_before = os.getloadavg()
        results: dict[str, dict] = {"http.client (blocking)": {"1": blocking(port, args.requests)}}
        for name, client in (
            ("asyncio socket", raw_socket),
            ("httpx shared pool", httpx_shared),
            ("httpx client per worker", httpx_per_worker),
        ):
            results[name] = {str(c): asyncio.run(client(port, c, args.requests)) for c in (1, 4, 16)}
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(10)
    record = {
        "command": "python3 benchmarks/bench_ceiling/baselines.py",
        "requests": args.requests,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "results": results,
    }
    (HERE / "baselines.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    for name, by_concurrency in results.items():
        print(
            f"{name:<26}"
            + "  ".join(
                f"c={c}: {r['requests_per_s']:6.0f}/s {r['cpu_ms_per_request']:5.2f} ms"
                for c, r in by_concurrency.items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

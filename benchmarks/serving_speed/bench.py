"""Serving speed of TabbyAPI + exllamav3 on the GLM-4.7-shaped slice (issue 13 item 4). Run by run.sh.

Phases (each checks the time left; results.json is rewritten after every one):
  bandwidth  the GPU's device-to-device copy bandwidth (torch, bytes read + written per second)
  bytes      bytes read per generated token at batch 1, per part, from the slice's safetensors headers
  decode     TabbyAPI on each slice (FP16 cache, chunk 2048), load.py: streamed /v1/completions, ban_eos_token,
             max_tokens 256, distinct prompts, at concurrency 1, 2, 4, 8 (the small slice: 1 only)
  prefill    TabbyAPI restarted per chunk_size (512, 1024, 2048, 4096), one ~8k-token distinct prompt per request,
             max_tokens 1 (time to first token = prefill), three requests each
Every server also records NVML used memory after load and after its requests (extra memory data points).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import load

MIB = 2**20
TOP_K, EXPERTS = 8, 160


class Clock:
    """Seconds left before the deadline."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def bandwidth() -> dict[str, Any]:
    """A large device-to-device copy: (bytes read + bytes written) / time, best and median of 20."""
    import torch

    size = 4 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src)
    src.fill_(1)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    result = {
        "bytes_per_copy_read_plus_written": 2 * size,
        "best_s": times[0],
        "median_s": times[len(times) // 2],
        "best_tb_s": 2 * size / times[0] / 1e12,
        "median_tb_s": 2 * size / times[len(times) // 2] / 1e12,
        "method": "torch dst.copy_(src) of 4 GiB uint8 on cuda:0, CUDA events, 3 warm-ups, 20 timed",
    }
    del src, dst
    torch.cuda.empty_cache()
    return result


def tensor_bytes(model: Path) -> dict[str, int]:
    """Bytes of every tensor from the safetensors headers."""
    sizes: dict[str, int] = {}
    for path in sorted(model.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                sizes[name] = meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


def bytes_per_token(model: Path, context_tokens: int) -> dict[str, Any]:
    """Weights read per generated token at batch 1 (active experts only) plus the FP16 KV cache read at a context."""
    sizes = tensor_bytes(model)
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    dense = config["first_k_dense_replace"]
    per_layer = []
    for i in range(layers):
        p = f"model.layers.{i}."
        attention = sum(v for k, v in sizes.items() if k.startswith(p + "self_attn."))
        norms = sum(v for k, v in sizes.items() if k.startswith(p) and "layernorm" in k)
        if i < dense:
            mlp = sum(v for k, v in sizes.items() if k.startswith(p + "mlp."))
            per_layer.append(
                {
                    "layer": i,
                    "kind": "dense",
                    "attention": attention,
                    "mlp": mlp,
                    "norms": norms,
                    "active": attention + mlp + norms,
                }
            )
            continue
        router = sum(v for k, v in sizes.items() if k.startswith(p + "mlp.gate."))
        shared = sum(v for k, v in sizes.items() if k.startswith(p + "mlp.shared_experts."))
        experts = sum(v for k, v in sizes.items() if k.startswith(p + "mlp.experts."))
        routed_active = experts * TOP_K / EXPERTS
        per_layer.append(
            {
                "layer": i,
                "kind": "moe",
                "attention": attention,
                "router": router,
                "shared": shared,
                "routed_all": experts,
                "routed_active": routed_active,
                "norms": norms,
                "active": attention + router + shared + routed_active + norms,
            }
        )
    head = sum(v for k, v in sizes.items() if k.startswith(("lm_head.", "model.norm.")))
    kv_per_layer = context_tokens * config["num_key_value_heads"] * config["head_dim"] * 2 * 2
    weights = sum(layer["active"] for layer in per_layer) + head
    return {
        "layers": per_layer,
        "head": head,
        "weights_active": weights,
        "kv_cache_read_per_layer_fp16": kv_per_layer,
        "kv_context_tokens": context_tokens,
        "total": weights + layers * kv_per_layer,
        "embedding_row": sizes.get("model.embed_tokens.weight", 0) // config["vocab_size"],
    }


class NvmlWatch:
    """NVML used memory of GPU 0 with a background peak sampler."""

    def __init__(self) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def used(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.005)

    def reset_peak(self) -> int:
        old, self.peak = self.peak, self.used()
        return old

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def tabby_config(model: Path, port: int, cache_size: int, cache_mode: str, chunk_size: int) -> str:
    """A TabbyAPI config.yml (measure.py's settings: one GPU, no autosplit, no auth on 127.0.0.1)."""
    return (
        "\n".join(
            [
                f"network: {{host: 127.0.0.1, port: {port}, disable_auth: true}}",
                "logging: {log_prompt: false, log_generation_params: false, log_requests: false}",
                "sampling: {override_preset: null}",
                "model:",
                f"  model_dir: {json.dumps(str(model.parent))}",
                f"  model_name: {json.dumps(model.name)}",
                "  backend: exllamav3",
                f"  max_seq_len: {cache_size}",
                f"  cache_size: {cache_size}",
                f"  cache_mode: {json.dumps(cache_mode)}",
                f"  chunk_size: {chunk_size}",
                "  tensor_parallel: false",
                "  gpu_split_auto: false",
                "  gpu_split: []",
            ]
        )
        + "\n"
    )


class Server:
    """TabbyAPI main.py with one config, its log appended to OUT/tabby.log."""

    def __init__(
        self,
        tabby: Path,
        model: Path,
        out: Path,
        name: str,
        port: int,
        cache_size: int,
        cache_mode: str,
        chunk_size: int,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        config = tabby / f"config-speed-{name}.yml"
        config.write_text(tabby_config(model, port, cache_size, cache_mode, chunk_size))
        self.log = open(out / "tabby.log", "ab")  # noqa: SIM115 - the server writes it until stop()
        self.log.write(f"\n===== {name} {time.strftime('%H:%M:%S')} =====\n".encode())
        self.log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--config", str(config)],
            cwd=tabby,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def wait(self, timeout_s: float) -> float | None:
        """Seconds until /v1/model answered 200, None when it did not."""
        while time.monotonic() - self.started < timeout_s and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/v1/model", timeout=5).status_code == 200:
                    return round(time.monotonic() - self.started, 1)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return None

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def serve(
    args: argparse.Namespace,
    nvml: NvmlWatch,
    model: Path,
    name: str,
    cache_size: int,
    chunk_size: int,
    clock: Clock,
    work: Any,
    port: int,
) -> dict[str, Any]:
    """Start a server, run `work(url)`, record NVML (baseline, after load, peak, after work), stop it."""
    time.sleep(1.0)
    baseline = nvml.used()
    server = Server(args.tabby, model, args.out, name, port, cache_size, "FP16", chunk_size)
    record: dict[str, Any] = {
        "name": name,
        "model": model.name,
        "cache_size": cache_size,
        "cache_mode": "FP16",
        "chunk_size": chunk_size,
        "baseline_mib": round(baseline / MIB, 1),
    }
    try:
        ready = server.wait(min(150.0, clock.left() - 10))
        record["load_s"] = ready
        if ready is None:
            record["error"] = f"not ready (exit {server.proc.poll()})"
            return record
        time.sleep(1.0)
        nvml.reset_peak()
        record["after_load_delta_mib"] = round((nvml.used() - baseline) / MIB, 1)
        record.update(work(server.url))
        time.sleep(0.5)
        record["peak_during_work_delta_mib"] = round((nvml.reset_peak() - baseline) / MIB, 1)
        record["after_work_delta_mib"] = round((nvml.used() - baseline) / MIB, 1)
        return record
    finally:
        server.stop()


def decode_work(text: str, levels: list[int], rounds: int, max_tokens: int, prompt_chars: int):
    """Warm-up, then load.py's levels."""

    def work(url: str) -> dict[str, Any]:
        warm = asyncio.run(
            load.run_level(url, None, 1, load.distinct_prompts(text, 1, prompt_chars, 991), 32, {})
        )
        out: dict[str, Any] = {"warmup": {k: v for k, v in warm.items() if k != "raw"}, "levels": []}
        offset = 5003
        for concurrency in levels:
            prompts = load.distinct_prompts(text, concurrency * rounds, prompt_chars, offset)
            offset += 7919
            level = asyncio.run(load.run_level(url, None, concurrency, prompts, max_tokens, {}))
            out["levels"].append(level)
            log(
                f"  c={concurrency}: decode/request {level['decode_tokens_per_s_per_request']['median']}, "
                f"output tok/s {level['output_tokens_per_s']}, TTFT median {level['ttft_s']['median']}, "
                f"failed {level['failed']}"
            )
        return out

    return work


def prefill_work(text: str, prompt_chars: int, requests: int, warm_long: bool):
    """Warm-up (a short prompt, and with warm_long a long one: the first long prefill compiles kernels), then
    `requests` distinct long prompts, max_tokens 1: TTFT is the prefill."""

    def work(url: str) -> dict[str, Any]:
        asyncio.run(load.run_level(url, None, 1, load.distinct_prompts(text, 1, 400, 17), 4, {}))
        if warm_long:
            asyncio.run(load.run_level(url, None, 1, [text[1_500_000 : 1_500_000 + prompt_chars]], 1, {}))
        runs = []
        for i in range(requests):
            start = 200_000 + 40_000 * i  # distinct, far apart (no shared prefix for the prompt cache)
            prompt = text[start : start + prompt_chars]
            level = asyncio.run(load.run_level(url, None, 1, [prompt], 1, {}))
            raw = level["raw"][0]
            tokens = (raw.get("usage") or {}).get("prompt_tokens")
            ttft = raw.get("first_chunk_s") or raw.get("e2e_s")
            runs.append(
                {
                    "prompt_tokens": tokens,
                    "ttft_s": ttft,
                    "e2e_s": raw.get("e2e_s"),
                    "prefill_tokens_per_s": tokens / ttft if tokens and ttft else None,
                    "error": raw.get("error"),
                }
            )
        rates = [r["prefill_tokens_per_s"] for r in runs if r["prefill_tokens_per_s"]]
        return {
            "prefill": runs,
            "prefill_tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        }

    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", type=Path, required=True, help="the 1 dense + 3 MoE slice")
    parser.add_argument(
        "--small-slice", type=Path, help="the 1 dense + 1 MoE slice (per-layer time by difference)"
    )
    parser.add_argument("--tabby", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True, help="text the prompts are cut from")
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--decode-context", type=int, default=32768)
    parser.add_argument(
        "--prefill-chars", type=int, default=27000, help="about 8k tokens of the slice tokenizer"
    )
    parser.add_argument("--prefill-requests", type=int, default=3)
    parser.add_argument("--prefill-warm-long", action="store_true", help="warm up with one long prompt first")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["bandwidth", "decode", "prefill"],
        choices=["bandwidth", "decode", "prefill"],
    )
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.text.read_text(encoding="utf-8", errors="replace")
    results: dict[str, Any] = {"servers": []}

    def save() -> None:
        tmp = args.out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(args.out / "results.json")

    results["phases"] = args.phases
    if "bandwidth" in args.phases:
        results["bandwidth"] = bandwidth()
        log(
            f"bandwidth: {results['bandwidth']['best_tb_s']:.2f} TB/s best, "
            f"{results['bandwidth']['median_tb_s']:.2f} median"
        )
    prompt_tokens_guess = 600 + args.max_tokens
    results["bytes_per_token"] = {"slice": bytes_per_token(args.slice, prompt_tokens_guess)}
    if args.small_slice:
        results["bytes_per_token"]["small_slice"] = bytes_per_token(args.small_slice, prompt_tokens_guess)
    save()
    nvml = NvmlWatch()
    try:
        jobs: list[tuple[str, Path, int, int, Any]] = []
        if "decode" in args.phases:
            jobs.append(
                (
                    "decode-4l",
                    args.slice,
                    args.decode_context,
                    2048,
                    decode_work(text, [1, 2, 4, 8], 2, args.max_tokens, 2400),
                )
            )
            if args.small_slice:
                jobs.append(
                    (
                        "decode-2l",
                        args.small_slice,
                        args.decode_context,
                        2048,
                        decode_work(text, [1], 3, args.max_tokens, 2400),
                    )
                )
        if "prefill" in args.phases:
            prefill = prefill_work(text, args.prefill_chars, args.prefill_requests, args.prefill_warm_long)
            for chunk in (2048, 512, 4096, 1024):
                jobs.append((f"prefill-4l-chunk{chunk}", args.slice, 16384, chunk, prefill))
            if args.small_slice:
                jobs.append(("prefill-2l-chunk2048", args.small_slice, 16384, 2048, prefill))
        for index, (name, model, cache_size, chunk, work) in enumerate(jobs):
            if clock.left() < 45:
                results["servers"].append({"name": name, "skipped": f"{clock.left():.0f} s left"})
                continue
            log(f"{name}: starting")
            try:
                record = serve(args, nvml, model, name, cache_size, chunk, clock, work, 5300 + index)
            except Exception as error:  # noqa: BLE001 - one failed server must not lose the others
                record = {"name": name, "error": f"{type(error).__name__}: {error}"}
            results["servers"].append(record)
            log(
                f"{name}: load {record.get('load_s')} s, after load {record.get('after_load_delta_mib')} MiB, "
                f"prefill {record.get('prefill_tokens_per_s_median')}, error {record.get('error')}"
            )
            save()
    finally:
        nvml.close()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

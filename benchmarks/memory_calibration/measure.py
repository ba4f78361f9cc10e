"""Measure per-GPU memory of real exllamav3 loads through TabbyAPI (NVML), so the planner's overhead is fitted.

Runs on a GPU host (see README.md). Every measurement appends one JSON line to OUT/results.jsonl as soon as it
is taken, so a run stopped early keeps what it measured.

    python3 measure.py verify --model DIR --out OUT          # direct exllamav3 load + forward: is the slice sane?
    python3 measure.py tabby --model DIR --tabby TABBY_DIR --out OUT [--deadline-s N] [--only NAME,...]
    python3 measure.py probe --model DIR --out OUT           # the same loads straight through exllamav3, verbose
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20
PROMPT_MARGIN = 8  # prompts are one chunk minus room for the BOS TabbyAPI adds


@dataclass(frozen=True)
class LoadConfig:
    """One TabbyAPI load to measure: GPUs, split, cache size and mode, chunk size."""

    name: str
    gpus: str  # CUDA_VISIBLE_DEVICES
    split: str  # single | tp | layer | autosplit
    cache_size: int
    cache_mode: str  # "FP16" or "k,v"
    chunk_size: int = 2048
    gpu_split: list[float] = field(default_factory=list)  # GB per GPU (layer split), TabbyAPI's gpu_split
    context: int = 0  # probes only: tokens of prompt (0: one chunk), to see long-context transients


# In priority order: a run that hits its deadline loses the least informative loads.
CONFIGS = [
    LoadConfig("1gpu-fp16-8k", "0", "single", 8192, "FP16"),
    LoadConfig("1gpu-fp16-256k", "0", "single", 262144, "FP16"),
    LoadConfig("1gpu-q54-256k", "0", "single", 262144, "5,4"),
    LoadConfig("2gpu-tp-fp16-64k", "0,1", "tp", 65536, "FP16"),
    LoadConfig("2gpu-layer-fp16-64k", "0,1", "layer", 65536, "FP16", gpu_split=[3.2, 100.0]),
    LoadConfig("1gpu-q54-8k", "0", "single", 8192, "5,4"),
    LoadConfig("1gpu-q88-256k", "0", "single", 262144, "8,8"),
    LoadConfig("2gpu-tp-q54-64k", "0,1", "tp", 65536, "5,4"),
    LoadConfig("1gpu-fp16-8k-chunk512", "0", "single", 8192, "FP16", chunk_size=512),
    LoadConfig("2gpu-layer-q54-64k", "0,1", "layer", 65536, "5,4", gpu_split=[3.2, 100.0]),
    LoadConfig("1gpu-fp16-8k-chunk4096", "0", "single", 8192, "FP16", chunk_size=4096),
    LoadConfig("2gpu-tp-fp16-256k", "0,1", "tp", 262144, "FP16"),
    LoadConfig("2gpu-autosplit-fp16-64k", "0,1", "autosplit", 65536, "FP16"),
    LoadConfig("2gpu-layer5-fp16-64k", "0,1", "layer", 65536, "FP16", gpu_split=[5.0, 100.0]),
    LoadConfig("2gpu-layer5-q54-64k", "0,1", "layer", 65536, "5,4", gpu_split=[5.0, 100.0]),
]

# Loads repeated straight through exllamav3 with its verbose loader (largest transient per GPU, the TP split)
# and torch's allocator statistics, to explain the NVML numbers of the TabbyAPI loads.
CONFIGS += [
    LoadConfig("1gpu-fp16-256k-ctx128k", "0", "single", 262144, "FP16", context=131072),
    LoadConfig("1gpu-q54-256k-ctx128k", "0", "single", 262144, "5,4", context=131072),
    LoadConfig("1gpu-q54-256k-ctx250k", "0", "single", 262144, "5,4", context=253952),
    LoadConfig("1gpu-q88-256k-ctx128k", "0", "single", 262144, "8,8", context=131072),
    LoadConfig("2gpu-tp-q54-256k-ctx128k", "0,1", "tp", 262144, "5,4", context=131072),
]
PROBES = [
    "1gpu-fp16-8k",
    "1gpu-fp16-8k-chunk512",
    "1gpu-fp16-8k-chunk4096",
    "1gpu-q54-256k",
    "2gpu-tp-fp16-64k",
    "2gpu-layer-fp16-64k",
    "2gpu-layer5-fp16-64k",
    "1gpu-fp16-256k-ctx128k",
    "1gpu-q54-256k-ctx128k",
    "1gpu-q54-256k-ctx250k",
    "1gpu-q88-256k-ctx128k",
    "2gpu-tp-q54-256k-ctx128k",
]


class Nvml:
    """NVML used memory per physical GPU, with a background sampler that keeps each GPU's peak."""

    def __init__(self) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.peak = self.used()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> list[int]:
        """Bytes in use on every GPU now."""
        return [int(self.nv.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles]

    def processes(self) -> list[list[dict[str, int]]]:
        """Per GPU, the compute processes and the bytes NVML attributes to each (where it can)."""
        out = []
        for h in self.handles:
            try:
                procs = self.nv.nvmlDeviceGetComputeRunningProcesses(h)
                out.append([{"pid": p.pid, "used": int(p.usedGpuMemory or 0)} for p in procs])
            except self.nv.NVMLError:
                out.append([])
        return out

    def info(self) -> list[dict[str, Any]]:
        """Name, total and bus id of every GPU, for the record."""
        rows = []
        for i, h in enumerate(self.handles):
            name = self.nv.nvmlDeviceGetName(h)
            rows.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "total_mib": int(self.nv.nvmlDeviceGetMemoryInfo(h).total) // MIB,
                }
            )
        return rows

    def start_sampling(self) -> None:
        """Track the peak used memory of every GPU every few milliseconds until stop_sampling."""
        self.reset_peak()
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                now = self.used()
                with self._lock:
                    self.peak = [max(a, b) for a, b in zip(self.peak, now)]
                time.sleep(0.002)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def reset_peak(self) -> list[int]:
        """Return the peak since the last reset and start a new one from now."""
        with self._lock:
            old, self.peak = self.peak, self.used()
        return old

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def append(out: Path, record: dict[str, Any]) -> None:
    """Append one result line and flush it to disk at once."""
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    print("RESULT", json.dumps(record), flush=True)


def mib(values: list[int]) -> list[float]:
    return [round(v / MIB, 1) for v in values]


def model_bytes(model: Path) -> dict[str, Any]:
    """Bytes the loader puts on GPUs, read from the safetensors headers: all tensors but the embedding."""
    per_layer: dict[str, int] = {}
    embed = total = 0
    for path in sorted(model.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            size = meta["data_offsets"][1] - meta["data_offsets"][0]
            total += size
            if name.startswith("model.embed_tokens."):
                embed += size
                continue
            parts = name.split(".")
            group = ".".join(parts[:3]) if name.startswith("model.layers.") else parts[0]
            per_layer[group] = per_layer.get(group, 0) + size
    config = json.loads((model / "config.json").read_text())
    return {
        "total_bytes": total,
        "embedding_bytes": embed,
        "gpu_weight_bytes": total - embed,
        "per_module_bytes": per_layer,
        "config": {k: v for k, v in config.items() if k != "quantization_config"},
        "quantization_config": config.get("quantization_config"),
    }


def cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int, mode: str) -> float:
    """KV cache bytes per token (../../../shared/facts/glm-4.7.md, verified on exllamav3 1.6.5)."""
    if mode.upper() == "FP16":
        return layers * kv_heads * head_dim * 4
    k, v = (int(x) for x in mode.split(","))
    return layers * kv_heads * head_dim * (k + v + 1) / 8


class Prompts:
    """Distinct texts of a given token count (distinct, so the generator cannot reuse a cached prefix)."""

    def __init__(self, model: Path) -> None:
        from tokenizers import Tokenizer

        spec = importlib.util.find_spec("exllamav3")
        assert spec and spec.submodule_search_locations
        base = Path(next(iter(spec.submodule_search_locations)))
        text = (base / "conversion/standard_cal_data/wiki.utf8").read_text(encoding="utf8")
        self.tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        self.ids = self.tok.encode(text).ids

    def make(self, tokens: int, count: int) -> list[str]:
        """count texts of about `tokens` tokens, taken from different places of the text."""
        return [self.tok.decode(self.ids[i * tokens : (i + 1) * tokens]) for i in range(1, count + 1)]


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, Any]:
    """One JSON request; (status, parsed body or text); status 0 when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:2000]
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return 0, str(exc)


def tabby_yaml(cfg: LoadConfig, model: Path, port: int) -> str:
    """TabbyAPI config.yml for one load (../../../shared/facts/tabbyapi.md)."""
    lines = [
        f"network: {{host: 127.0.0.1, port: {port}, disable_auth: true}}",
        "logging: {log_prompt: false, log_generation_params: false, log_requests: false}",
        "sampling: {override_preset: null}",
        "model:",
        f"  model_dir: {json.dumps(str(model.parent))}",
        f"  model_name: {json.dumps(model.name)}",
        "  backend: exllamav3",
        "  max_seq_len: 8192",
        f"  cache_size: {cfg.cache_size}",
        f"  cache_mode: {json.dumps(cfg.cache_mode)}",
        f"  chunk_size: {cfg.chunk_size}",
        f"  tensor_parallel: {'true' if cfg.split == 'tp' else 'false'}",
        "  tensor_parallel_backend: native",
        f"  gpu_split_auto: {'true' if cfg.split == 'autosplit' else 'false'}",
        f"  gpu_split: {json.dumps(cfg.gpu_split)}",
    ]
    return "\n".join(lines) + "\n"


def wait_released(nvml: Nvml, baseline: list[int], limit_s: float = 30) -> list[int]:
    """Wait until every GPU is back within 64 MiB of its baseline (a process's memory outlives it briefly)."""
    end = time.monotonic() + limit_s
    while True:
        now = nvml.used()
        if all(n - b <= 64 * MIB for n, b in zip(now, baseline)) or time.monotonic() > end:
            return now
        time.sleep(0.25)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt TabbyAPI and every process it started (TP workers), then kill what remains."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (workers outliving the parent)
    except ProcessLookupError:
        pass


def measure_tabby(cfg: LoadConfig, args: argparse.Namespace, nvml: Nvml, texts: list[str], port: int) -> dict:
    """Start TabbyAPI with one config, record NVML after load and after two one-chunk prompts, stop it."""
    tabby: Path = args.tabby
    cfg_file = tabby / f"config-{cfg.name}.yml"
    cfg_file.write_text(tabby_yaml(cfg, args.model, port))
    log_path = args.out / "tabby.log"
    baseline = wait_released(nvml, nvml.used(), 5)
    record: dict[str, Any] = {"kind": "tabby", "config": asdict(cfg), "baseline_mib": mib(baseline)}
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES=cfg.gpus,
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        NCCL_NVLS_ENABLE="0",
        PYTHONUNBUFFERED="1",
    )
    with open(log_path, "ab") as log:
        log.write(f"\n===== {cfg.name} {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--config", str(cfg_file)],
            cwd=tabby,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            nvml.start_sampling()
            base = f"http://127.0.0.1:{port}"
            status, body = 0, None
            while time.monotonic() - t0 < args.load_timeout_s and proc.poll() is None:
                status, body = http("GET", base + "/v1/model", timeout=5)
                if status == 200:
                    break
                time.sleep(0.5)
            record["load_s"] = round(time.monotonic() - t0, 1)
            if status != 200:
                record["error"] = f"not ready: status {status}, exit {proc.poll()}, {str(body)[:300]}"
                return record
            record["model_parameters"] = {
                k: body["parameters"].get(k)
                for k in ("max_seq_len", "cache_size", "cache_mode", "chunk_size", "max_batch_size")
            }
            time.sleep(1.0)
            record["peak_during_load_mib"] = mib(nvml.reset_peak())
            record["after_load_mib"] = mib(nvml.used())
            record["processes_after_load"] = nvml.processes()
            for i, text in enumerate(texts, 1):
                t1 = time.monotonic()
                status, body = http(
                    "POST",
                    base + "/v1/completions",
                    {
                        "model": args.model.name,
                        "prompt": text,
                        "max_tokens": 16,
                        "temperature": 0.0,
                        "top_p": 1.0,
                        "top_k": 0,
                        "min_p": 0.0,
                    },
                    timeout=120,
                )
                time.sleep(0.5)
                record[f"gen{i}_s"] = round(time.monotonic() - t1, 2)
                record[f"peak_during_gen{i}_mib"] = mib(nvml.reset_peak())
                record[f"after_gen{i}_mib"] = mib(nvml.used())
                if status != 200:
                    record[f"gen{i}_error"] = f"status {status}: {str(body)[:300]}"
                    break
                usage = body.get("usage", {}) if isinstance(body, dict) else {}
                record[f"gen{i}_usage"] = usage
        finally:
            nvml.stop_sampling()
            stop_process(proc)
            record["released_mib"] = mib(wait_released(nvml, baseline))
            record["wall_s"] = round(time.monotonic() - t0, 1)
    for key in [k for k in list(record) if k.endswith("_mib") and k not in ("baseline_mib", "released_mib")]:
        record[key.replace("_mib", "_delta_mib")] = [
            round(a - b, 1) for a, b in zip(record[key], record["baseline_mib"])
        ]
    return record


def run_tabby(args: argparse.Namespace) -> None:
    """Measure every selected config through TabbyAPI until the deadline."""
    args.out.mkdir(parents=True, exist_ok=True)
    nvml = Nvml()
    start = time.monotonic()
    append(
        args.out,
        {
            "kind": "host",
            "gpus": nvml.info(),
            "baseline_mib": mib(nvml.used()),
            "model": model_bytes(args.model),
        },
    )
    prompts = Prompts(args.model)
    only = set(args.only.split(",")) if args.only else None
    loaded_once = False
    for n, cfg in enumerate(CONFIGS):
        if (only and cfg.name not in only) or cfg.context:
            continue
        if len(cfg.gpus.split(",")) > len(nvml.handles):
            append(args.out, {"kind": "skipped", "config": asdict(cfg), "reason": "not enough GPUs"})
            continue
        elapsed = time.monotonic() - start
        if elapsed > args.deadline_s:
            append(
                args.out, {"kind": "skipped", "config": asdict(cfg), "reason": f"deadline at {elapsed:.0f} s"}
            )
            continue
        print(f"--- {cfg.name} at {elapsed:.0f} s", flush=True)
        try:
            texts = prompts.make(min(cfg.chunk_size, 4096) - PROMPT_MARGIN, 2)
            record = measure_tabby(cfg, args, nvml, texts, 5100 + n)
        except Exception as exc:  # noqa: BLE001 -- one broken load must not lose the others
            record = {"kind": "tabby", "config": asdict(cfg), "error": f"{type(exc).__name__}: {exc}"}
        append(args.out, record)
        loaded_once = loaded_once or "after_load_mib" in record
        if not loaded_once:
            print("the first load failed: the rest would too; see tabby.log", flush=True)
            return


def run_verify(args: argparse.Namespace) -> None:
    """Load the slice straight through exllamav3 on cuda:0 as TabbyAPI would and run one 2048-token forward."""
    args.out.mkdir(parents=True, exist_ok=True)
    nvml = Nvml()
    baseline = nvml.used()
    t0 = time.monotonic()
    import torch
    from exllamav3 import Cache, Config, Model

    cfg = Config.from_directory(str(args.model))
    model = Model.from_config(cfg)
    cache = Cache(model, max_num_tokens=8192, max_batch_size=128)
    model.load("cuda:0", max_chunk_size=2048)
    torch.cuda.synchronize()
    after_load = nvml.used()
    bpw = model.get_storage_info()
    ids = torch.randint(0, 4000, (1, 2048))
    with torch.inference_mode():
        nvml.start_sampling()
        logits = model.forward(ids, {})
        torch.cuda.synchronize()
        nvml.stop_sampling()
    finite = bool(torch.isfinite(logits).all().item())
    record = {
        "kind": "direct",
        "device": "cuda:0",
        "cache_size": 8192,
        "cache_mode": "FP16",
        "chunk_tokens": 2048,
        "load_s": round(time.monotonic() - t0, 1),
        "storage_info": list(bpw),
        "logits_shape": list(logits.shape),
        "logits_finite": finite,
        "logits_std": float(logits.float().std().item()) if finite else None,
        "baseline_mib": mib(baseline),
        "after_load_delta_mib": mib([a - b for a, b in zip(after_load, baseline)]),
        "peak_during_forward_delta_mib": mib([a - b for a, b in zip(nvml.peak, baseline)]),
        "torch_max_allocated_mib": round(torch.cuda.max_memory_allocated(0) / MIB, 1),
        "torch_max_reserved_mib": round(torch.cuda.max_memory_reserved(0) / MIB, 1),
    }
    append(args.out, record)
    del cache
    model.unload()
    if not finite:
        raise SystemExit("slice forward gave non-finite logits")


def probe_one(args: argparse.Namespace) -> None:
    """One load as TabbyAPI 1.x does it (its load arguments, cudaMallocAsync), with torch's view of each GPU."""
    os.environ["PYTORCH_ALLOC_CONF"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    cfg = next(c for c in CONFIGS if c.name == args.config)
    nvml = Nvml()
    visible = [int(x) for x in cfg.gpus.split(",")]
    baseline = [int(float(x) * MIB) for x in args.baseline.split(",")]
    import torch
    from exllamav3 import Cache, CacheLayer_quant, Config, Generator, Job, Model, Tokenizer

    # TP keeps the weights in worker processes: this process then only holds the output device (cuda:0), and
    # touching another device would add a CUDA context TabbyAPI does not have
    mine = [0] if cfg.split == "tp" else list(range(len(visible)))

    def snapshot(label: str) -> dict[str, Any]:
        for i in mine:
            torch.cuda.synchronize(i)
        used = nvml.used()
        return {
            "phase": label,
            "nvml_delta_mib": [round((used[g] - baseline[g]) / MIB, 1) for g in visible],
            "torch_allocated_mib": [round(torch.cuda.memory_allocated(i) / MIB, 1) for i in mine],
            "torch_reserved_mib": [round(torch.cuda.memory_reserved(i) / MIB, 1) for i in mine],
            "torch_peak_allocated_mib": [round(torch.cuda.max_memory_allocated(i) / MIB, 1) for i in mine],
        }

    t0 = time.monotonic()
    config = Config.from_directory(str(args.model))
    model = Model.from_config(config)
    cache_args: dict[str, Any] = {"max_batch_size": 128, "max_history": 0}
    if cfg.cache_mode != "FP16":
        k, v = (int(x) for x in cfg.cache_mode.split(","))
        cache_args.update(layer_type=CacheLayer_quant, k_bits=k, v_bits=v)
    cache = Cache(model, max_num_tokens=cfg.cache_size, **cache_args)
    # TabbyAPI backends/exllamav3/model.py: reserve 96 MB unless a manual gpu_split is given
    reserve = None if cfg.split == "layer" else [96 / 1024] * len(visible)
    model.load(
        tensor_p=cfg.split == "tp",
        tp_backend="native",
        reserve_per_device=reserve,
        use_per_device=cfg.gpu_split or None,
        max_chunk_size=cfg.chunk_size,
        max_batch_size=128,
        verbose=True,
    )
    phases = [snapshot("after_load")]
    tokenizer = Tokenizer.from_config(config)
    generator = Generator(
        model=model, cache=cache, tokenizer=tokenizer, max_batch_size=128, max_chunk_size=cfg.chunk_size
    )
    phases.append(snapshot("after_generator"))
    for i in mine:
        torch.cuda.reset_peak_memory_stats(i)
    for n in range(2):
        length = cfg.context - 64 * (n + 1) if cfg.context else min(cfg.chunk_size, 4096) - PROMPT_MARGIN
        ids = torch.randint(5, 4000, (1, length), dtype=torch.long)
        generator.enqueue(Job(input_ids=ids, max_new_tokens=8, identifier=n))
        while generator.num_remaining_jobs():
            generator.iterate()
        phases.append(snapshot(f"after_gen{n + 1}"))
    append(
        args.out,
        {
            "kind": "probe",
            "config": asdict(cfg),
            "seconds": round(time.monotonic() - t0, 1),
            "phases": phases,
        },
    )


def run_probes(args: argparse.Namespace) -> None:
    """Each probe in a fresh process (clean allocator and CUDA contexts), until the deadline."""
    args.out.mkdir(parents=True, exist_ok=True)
    nvml = Nvml()
    start = time.monotonic()
    only = set(args.only.split(",")) if args.only else None
    for name in PROBES:
        if only and name not in only:
            continue
        cfg = next(c for c in CONFIGS if c.name == name)
        if time.monotonic() - start > args.deadline_s:
            append(args.out, {"kind": "skipped", "probe": name, "reason": "deadline"})
            continue
        baseline = wait_released(nvml, nvml.used(), 5)
        env = dict(
            os.environ, CUDA_VISIBLE_DEVICES=cfg.gpus, CUDA_DEVICE_ORDER="PCI_BUS_ID", NCCL_NVLS_ENABLE="0"
        )
        print(f"--- probe {name} at {time.monotonic() - start:.0f} s", flush=True)
        with open(args.out / "probe.log", "ab") as log:
            log.write(f"\n===== probe {name} =====\n".encode())
            log.flush()
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "probe-one",
                    "--model",
                    str(args.model),
                    "--out",
                    str(args.out),
                    "--config",
                    name,
                    "--baseline",
                    ",".join(str(b / MIB) for b in baseline),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.load_timeout_s,
                check=False,
            )
        if proc.returncode:
            append(args.out, {"kind": "probe", "config": asdict(cfg), "error": f"exit {proc.returncode}"})
        wait_released(nvml, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("verify", "tabby", "probe", "probe-one"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True, help="the slice (make_glm_slice.py OUT_DIR)")
        p.add_argument("--out", type=Path, required=True, help="folder for results.jsonl and logs")
        if name == "probe":
            p.add_argument("--deadline-s", type=float, default=240, help="start no new probe after this")
            p.add_argument("--load-timeout-s", type=float, default=120)
            p.add_argument("--only", default="", help="comma-separated probe names (default: all)")
        if name == "probe-one":
            p.add_argument("--config", required=True)
            p.add_argument(
                "--baseline", required=True, help="NVML used MiB per GPU before the process started"
            )
        if name == "tabby":
            p.add_argument("--tabby", type=Path, required=True, help="a TabbyAPI source tree (main.py)")
            p.add_argument("--deadline-s", type=float, default=420, help="start no new load after this")
            p.add_argument("--load-timeout-s", type=float, default=150)
            p.add_argument("--only", default="", help="comma-separated config names (default: all)")
    args = parser.parse_args()
    args.model = args.model.resolve()
    args.out = args.out.resolve()
    if args.cmd == "verify":
        run_verify(args)
    elif args.cmd == "probe":
        run_probes(args)
    elif args.cmd == "probe-one":
        probe_one(args)
    else:
        args.tabby = args.tabby.resolve()
        run_tabby(args)


if __name__ == "__main__":
    main()

"""The reference computation as one lean program, run inside the deployment's own image or on a GPU host:

    python3 -m toolkit.verify.reference_entry --model-dir DIR --out OUT_DIR [--prompts FILE] [--top-k K]

It loads the model folder in-process (exllamav3: FP16 cache just long enough for the prompts, one GPU or split
over every visible one), computes the teacher-forced next-token distributions of the prompt set and writes
OUT_DIR/deployment-reference.json.gz (the versioned reference format) with what it was made with: model commit,
exllamav3 and torch versions, prompts hash, cache, placement, time and peak GPU memory. Progress goes to stderr,
one line at a time, so a container log reads as progress. `deploy reference deployment` and `deploy auto` run it
in the built image with this package mounted read-only; `deploy reference compute` calls compute() directly.

Imports only the standard library, numpy and yaml at start (what the TabbyAPI image has), torch and exllamav3 once
a model is loaded. The environment variable GLM_DEPLOY_REFERENCE_TEST_DOUBLE may name a module whose
reference_double(model_dir) stands in for exllamav3: only the CPU test image sets it (that image also carries the
mix assembly's exllamav3 test double, which cannot compute), every line then says TEST DOUBLE, and the file
records it. Without exllamav3 and without that variable it exits 4.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import EXIT_OK, BadInput, EnvironmentMissing, ToolkitError
from ..facts.layout import DEPLOYMENT_REFERENCE
from .reference import COMPUTE_TOP_K, Prompt, Reference, compute_reference, load_prompts, save_reference

TEST_DOUBLE_ENV = "GLM_DEPLOY_REFERENCE_TEST_DOUBLE"
LOG_PREFIX = "[reference]"


class LoadableBackend(Protocol):
    """A ReferenceBackend (reference.py) that also loads its weights, reports its versions and its peak memory."""

    name: str
    version: str
    versions: dict[str, str]
    model_id: str
    kind: str
    tokenizer_sha256: str | None

    def encode(self, text: str) -> list[int]: ...

    def pieces(self) -> list[str]: ...

    def logprobs_at(self, ids: list[int], counts: list[int]) -> Any: ...

    def load(self, context_tokens: int) -> dict[str, Any]:
        """Load the weights with a cache of at least context_tokens; returns cache_mode, cache_tokens, placement."""

    def peak_memory_mib(self) -> list[float] | None:
        """Per GPU, the most memory held so far (None without GPUs)."""

    def close(self) -> None: ...


def open_backend(model_dir: Path, device: str = "auto") -> LoadableBackend:
    """The test double GLM_DEPLOY_REFERENCE_TEST_DOUBLE names, when set; else exllamav3; else exit 4."""
    if not model_dir.is_dir():
        raise BadInput(f"--model-dir {model_dir} is not a folder", "pass the model's folder")
    double = os.environ.get(TEST_DOUBLE_ENV)
    if double:
        module = importlib.import_module(double)
        return module.reference_double(model_dir)  # type: ignore[no-any-return]
    if importlib.util.find_spec("exllamav3") is None:
        raise EnvironmentMissing(
            "the reference computation needs exllamav3 and torch, which are not installed here",
            "run it in the deployment's image (`deploy reference deployment`) or install glm-deploy[gpu]",
        )
    from .exl3_backend import Exl3Backend

    return Exl3Backend(model_dir, device)


def needed_context(encode: Callable[[str], list[int]], prompts: Sequence[Prompt]) -> int:
    """Tokens of the longest prompt: every measured prefix is shorter, so the cache needs no more."""
    return max(len(encode(p.text)) for p in prompts)


def compute(
    model_dir: Path,
    prompts: Sequence[Prompt],
    *,
    top_k: int = COMPUTE_TOP_K,
    device: str = "auto",
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Reference:
    """Load model_dir, compute the reference of prompts, record how it was made (settings) and what it cost."""
    started = time.monotonic()
    backend = open_backend(model_dir, device)
    double = backend.name.startswith("test-double")
    label = "TEST DOUBLE " if double else ""
    log(f"{label}backend {backend.name} {backend.version} for {model_dir}")
    try:
        context = needed_context(backend.encode, prompts)
        placement = backend.load(context)
        loaded = time.monotonic()
        log(
            f"{label}loaded {backend.model_id} in {loaded - started:.1f} s: {placement['placement']}, "
            f"cache {placement['cache_mode']} x {placement['cache_tokens']} tokens"
        )
        reference = compute_reference(
            backend,
            prompts,
            top_k,
            progress=lambda done, total: log(f"{label}prompt {done}/{total}"),
            settings={
                "backend": backend.name,
                "versions": backend.versions,
                "cache_mode": placement["cache_mode"],
                "max_seq_len": placement["cache_tokens"],
                "placement": placement["placement"],
                **(settings or {}),
            },
        )
        peak = backend.peak_memory_mib()
    finally:
        backend.close()
    cost = {
        "load_seconds": round(loaded - started, 2),
        "compute_seconds": round(time.monotonic() - loaded, 2),
        "peak_gpu_mib": peak,
    }
    log(
        f"{label}{reference.positions} positions of {len(reference.prompts)} prompts in "
        f"{cost['compute_seconds']} s after {cost['load_seconds']} s loading; peak GPU memory "
        + (", ".join(f"GPU {i} {mib:.0f} MiB" for i, mib in enumerate(peak)) if peak else "n/a (no GPU)")
    )
    return replace(reference, settings={**reference.settings, **cost})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m toolkit.verify.reference_entry",
        description="Compute the deployment reference of a model folder (exllamav3, in-process) into OUT_DIR.",
    )
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="the model folder (config.json, weights)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help=f"folder to write {DEPLOYMENT_REFERENCE} into"
    )
    parser.add_argument("--prompts", type=Path, help="prompt set YAML/JSON (default: the shipped set)")
    parser.add_argument(
        "--top-k", type=int, default=COMPUTE_TOP_K, help=f"entries per position ({COMPUTE_TOP_K})"
    )
    parser.add_argument("--device", default="auto", help="auto (one GPU, else split over all) or cuda:N")
    parser.add_argument("--model-commit", help="the model folder's hub commit, recorded in the file")
    parser.add_argument("--key", help="the caller's reuse key, recorded in the file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Compute and write; expected failures are one line on stderr and the documented exit code."""
    args = _parser().parse_args(argv)

    def log(line: str) -> None:
        print(f"{LOG_PREFIX} {line}", file=sys.stderr, flush=True)

    try:
        if not 1 <= args.top_k <= 100_000:
            raise BadInput(f"--top-k must be between 1 and 100000, got {args.top_k}")
        if args.out.exists() and not args.out.is_dir():
            raise BadInput(f"--out {args.out} is not a folder", "pass the folder to write the reference into")
        reference = compute(
            args.model_dir,
            load_prompts(args.prompts),
            top_k=args.top_k,
            device=args.device,
            settings={"model_commit": args.model_commit, "key": args.key},
            log=log,
        )
        path = args.out / DEPLOYMENT_REFERENCE
        save_reference(reference, path)
    except ToolkitError as error:
        log(f"error: {error.line()}")
        return error.exit_code
    log(f"wrote {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

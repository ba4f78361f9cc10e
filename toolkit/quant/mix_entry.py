"""The mix assembly as one lean program, run inside the deployment's image or by any Python with exllamav3:

    python3 -m toolkit.quant.mix_entry --job JOB.json

JOB.json: {"base_dir": DIR, "sources": [{"id": ID, "dir": DIR}, ...] (the other sources, lowest first),
"out_dir": DIR, "shard_size_mb": N, and either "overrides": {module_key: source_id} (a recipe's plan) or
"measurement": FILE with "extra_bytes": N (the VRAM bytes the mix may add to the base)}.

It runs exllamav3's own assembly (conversion/optimize_model.py, util/recompile.py): the base's Config and Model,
a VariantSafetensorsCollection over the base's tensors in which each source's globs select its tensors, and
compile_model(model_stc=True) writing shards, config.json, quantization_config.json and the base's other files
into out_dir. With a measurement, exllamav3's optimizer picks the overrides first, its budget computed as
optimize_model's main computes it (bits of the measured modules plus 8 x extra_bytes). Nothing is re-quantized.

stdout carries JSON lines only -- {"event": "start"|"overrides"|"shard"|"done", ...} -- and everything else,
exllamav3's prints included, goes to stderr. Imports only the standard library until exllamav3 (and its torch);
nothing else of this package, so the folder can be mounted alone. Exit 0 done, 2 bad job, 4 exllamav3 missing or
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import IO, Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 4
LOG_PREFIX = "[mix]"
MAX_SHARD_MB = 1 << 20
_SHARD = re.compile(r"model-([0-9]{5})-of-([0-9]{5})\.safetensors\Z")
_EXPERT = re.compile(r"^(.+\.experts\.)[0-9]+(\.[^*]+)\Z")


class JobError(Exception):
    """An expected failure, printed as one line with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_job(path: str) -> dict[str, Any]:
    """The job file, checked field by field (the host writes it; a hand-written one gets the same checks)."""
    try:
        with open(path, encoding="utf-8") as handle:
            job = json.load(handle)
    except (OSError, ValueError) as error:
        raise JobError(f"cannot read the job {path}: {error}") from None
    if not isinstance(job, dict):
        raise JobError(f"the job {path} is not a JSON object")
    for name in ("base_dir", "out_dir"):
        if not isinstance(job.get(name), str) or not job[name]:
            raise JobError(f"the job has no {name}")
    sources = job.get("sources")
    if not isinstance(sources, list) or not sources:
        raise JobError("the job names no sources besides the base")
    for source in sources:
        if (
            not isinstance(source, dict)
            or not isinstance(source.get("id"), str)
            or not isinstance(source.get("dir"), str)
        ):
            raise JobError("every source needs an id and a dir")
    size = job.get("shard_size_mb")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SHARD_MB:
        raise JobError(f"shard_size_mb must be 1..{MAX_SHARD_MB}")
    ids = {s["id"] for s in sources}
    if ("overrides" in job) == ("measurement" in job):
        raise JobError("the job needs either overrides or a measurement")
    if "overrides" in job:
        overrides = job["overrides"]
        if not isinstance(overrides, dict) or any(
            not isinstance(k, str) or v not in ids for k, v in overrides.items()
        ):
            raise JobError("overrides must map module keys to source ids")
    else:
        extra = job.get("extra_bytes")
        if not isinstance(job["measurement"], str) or isinstance(extra, bool) or not isinstance(extra, int):
            raise JobError("a measurement job needs the measurement file and extra_bytes")
        if extra < 0:
            raise JobError("extra_bytes must not be negative (the target is below the base)")
    return job


def module_tensors(model_dir: str) -> dict[str, list[str]]:
    """Every leaf module of a quant and its stored tensors, from its quantization_config.json."""
    path = os.path.join(model_dir, "quantization_config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            storage = json.load(handle)["tensor_storage"]
        return {key: list(entry["stored_tensors"]) for key, entry in storage.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise JobError(f"cannot read the tensor storage of {path}: {error}") from None


def override_globs(overrides: dict[str, str], modules: Sequence[str]) -> dict[str, list[str]]:
    """Per source, the globs that select its modules' tensors: the experts of one layer and projection as one glob
    when all of them come from that source (a GLM-4.7 layer has 160), else one glob per module (as optimize_model
    writes them). Few globs keep exllamav3's one-regex match fast."""
    families: dict[str, list[str]] = {}
    for key in modules:
        found = _EXPERT.match(key)
        families.setdefault(f"{found.group(1)}*{found.group(2)}" if found else key, []).append(key)
    globs: dict[str, list[str]] = {}
    for family, members in families.items():
        chosen = {overrides.get(k) for k in members}
        if len(members) > 1 and len(chosen) == 1 and None not in chosen:
            globs.setdefault(str(chosen.pop()), []).append(f"{family}.*")
            continue
        for key in members:
            if key in overrides:
                globs.setdefault(overrides[key], []).append(f"{key}.*")
    return globs


def assemble(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run exllamav3's assembly for the job; returns the done event."""
    started = time.monotonic()
    try:
        exllamav3 = importlib.import_module("exllamav3")
        safetensors = importlib.import_module("exllamav3.loader.safetensors")
        compile_module = importlib.import_module("exllamav3.conversion.compile")
    except (ImportError, RuntimeError) as error:  # exllamav3 raises RuntimeError without torch
        raise JobError(f"exllamav3 is not importable here ({str(error)[:200]})", EXIT_ENVIRONMENT) from None
    versions = _versions()
    double = bool(getattr(exllamav3, "TEST_DOUBLE", False))
    emit({"event": "start", "versions": versions, "test_double": double})
    base = exllamav3.Config.from_directory(job["base_dir"])
    model = exllamav3.Model.from_config(base)
    configs = {s["id"]: exllamav3.Config.from_directory(s["dir"]) for s in job["sources"]}
    modules = module_tensors(job["base_dir"])
    if "measurement" in job:
        overrides = _optimized(job, model, [s["id"] for s in job["sources"]])
        emit({"event": "overrides", "overrides": overrides})
    else:
        overrides = job["overrides"]
    unknown = next((k for k in overrides if k not in modules), None)
    if unknown is not None:
        raise JobError(f"the override {unknown} is not a module of the base")
    variant = safetensors.VariantSafetensorsCollection(base.stc)
    globs = override_globs(overrides, list(modules))
    for source_id, config in configs.items():
        if globs.get(source_id):
            variant.add_stc(globs[source_id], config.stc)
    for key, tensors in modules.items():
        want = configs[overrides[key]].stc if key in overrides else base.stc
        wrong = next((t for t in tensors if variant.find_stc(t) is not want), None)
        if wrong is not None:
            raise JobError(f"the override globs do not select {wrong} from its planned source")
    base.stc = variant
    bpw_layer, bpw_head, vram_bits = model.get_storage_info()
    args = {
        "bits": round(bpw_layer, 2),
        "final_bits": round(bpw_layer, 2),
        "head_bits": round(bpw_head),
        "in_dir": job["base_dir"],
        "out_dir": job["out_dir"],
        "shard_size": job["shard_size_mb"],
        "model_stc": True,
    }
    with _counted_shards(compile_module, emit):
        compile_module.compile_model(args, model, base, None)
    return {
        "event": "done",
        "bits": args["final_bits"],
        "head_bits": args["head_bits"],
        "vram_bits": int(vram_bits),
        "overrides": len(overrides),
        "seconds": round(time.monotonic() - started, 1),
        "versions": versions,
        "test_double": double,
    }


def _optimized(job: dict[str, Any], model: Any, alternatives: list[str]) -> dict[str, str]:
    """exllamav3's optimizer on the measurement, its budget as optimize_model's main computes it."""
    optimize_model = importlib.import_module("exllamav3.conversion.optimize_model")
    try:
        with open(job["measurement"], encoding="utf-8") as handle:
            measurement = json.load(handle)
    except (OSError, ValueError) as error:
        raise JobError(f"cannot read the measurement {job['measurement']}: {error}") from None
    base_numel = base_cost = 0
    for group in measurement["groups"]:
        for key in group["layers"]:
            module = model.find_module(key)
            base_cost += module.storage_size() * 8
            base_numel += module.weights_numel()
    target_cost = base_cost + 8 * job["extra_bytes"]
    solution = optimize_model.optimize(
        measurement, base_numel, base_cost, target_cost, measurement["base_kld"], len(alternatives)
    )
    return {
        key: alternatives[choice - 1]
        for choice, group in zip(solution, measurement["groups"])
        if choice > 0
        for key in group["layers"]
    }


@contextlib.contextmanager
def _counted_shards(compile_module: Any, emit: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """compile_model's save_file, wrapped: one shard event per file written (index, count, bytes on disk)."""
    original = compile_module.save_file

    def save_file(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        original(tensors, filename, *args, **kwargs)
        found = _SHARD.search(os.path.basename(filename))
        index, count = (int(found.group(1)), int(found.group(2))) if found else (1, 1)
        emit({"event": "shard", "index": index, "count": count, "bytes": os.path.getsize(filename)})

    compile_module.save_file = save_file
    try:
        yield
    finally:
        compile_module.save_file = original


def _versions() -> dict[str, str]:
    """exllamav3's and torch's versions, recorded with the mix (a test double's own, marked, over the metadata
    that the CPU test image carries for the packages it stands in for)."""
    found: dict[str, str] = {}
    for name in ("exllamav3", "torch"):
        module = sys.modules.get(name)
        if getattr(module, "TEST_DOUBLE", False):
            found[name] = str(getattr(module, "__version__", "test double"))
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # a package on PYTHONPATH only: its module's own version
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "__version__"):
                found[name] = str(module.__version__)
    return found


@contextlib.contextmanager
def _events_stream() -> Iterator[IO[str]]:
    """The process's stdout for events, while file descriptor 1 points at stderr: everything exllamav3 prints
    (Python or C++) lands there and stdout stays machine-readable. fd 1 is restored afterwards."""
    sys.stdout.flush()
    saved = os.dup(1)
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield events
    finally:
        events.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    """Assemble the job; expected failures are one line on stderr and the documented exit code."""
    parser = argparse.ArgumentParser(
        prog="python3 -m toolkit.quant.mix_entry",
        description="Assemble a mixed-precision EXL3 quant with exllamav3 (JSON-line events on stdout).",
    )
    parser.add_argument("--job", required=True, help="the job file (see the module's docstring)")
    args = parser.parse_args(argv)
    with _events_stream() as events:

        def emit(event: dict[str, Any]) -> None:
            events.write(json.dumps(event) + "\n")
            events.flush()

        try:
            emit(assemble(read_job(args.job), emit))
        except JobError as error:
            _log(f"error: {error}")
            return error.exit_code
        except Exception as error:  # noqa: BLE001 - exllamav3's failure: its traceback in the log, one line last
            traceback.print_exc(file=sys.stderr)
            _log(f"error: exllamav3's assembly failed: {type(error).__name__}: {str(error)[:300]}")
            return EXIT_ENVIRONMENT
    return EXIT_OK


def _log(line: str) -> None:
    print(f"{LOG_PREFIX} {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

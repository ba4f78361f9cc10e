"""`deploy quant mix` on the host: check the sources and the target, plan, check the disk, run exllamav3's assembly
through a runner, check the result module by module, and put it in place with its manifest.

Everything a user can get wrong is refused before any work (exit 2): a source that is not a complete EXL3 quant,
sources exllamav3 cannot mix, a target outside the feasible range, a measurement of other quants, an --out that is
not a new folder or a mix made here. Then the disk (exit 4). The assembly (toolkit/quant/mix_entry.py) writes into
a staging folder beside the target; the result's quantization_config.json must list every module with exactly the
bytes of the source the plan chose (exit 5 otherwise), then the staging folder is renamed to the target. On any
failure the staging folder is removed and the target is untouched.

Runners: the deployment's built image (toolkit/deploy/mix_image.py, docker) or a local Python that imports
exllamav3 (PythonRunner here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .. import disk, inputs, validate
from ..atomic import write_text
from ..errors import BadInput, EnvironmentMissing, ToolkitError, VerificationFailed
from ..facts.layout import MODEL_MARKER
from ..facts.paths import PACKAGE_DIR
from ..output import ByteBar, Progress
from .measurement import Measurement, measured_range, read_measurement
from .recipe import (
    GIB,
    MixPlan,
    Recipe,
    Source,
    check_compatible,
    check_target,
    gib,
    load_recipe,
    make_plan,
    plan_mix,
)
from .storage import QUANT_CONFIG, QuantStorage, read_storage

ENTRY_MODULE = "toolkit.quant.mix_entry"
MIX_MANIFEST = "mix.json"
FORMAT = "glm-deploy-mix/1"
STAGING_PREFIX = ".mix-"
MODEL_SUBDIR = "model"  # compile_model's out_dir inside the staging folder (the job files stay beside it)
JOB_FILE = "job.json"
MEASUREMENT_FILE = "measurement.json"
SHARD_SIZE_MB = 8192  # exllamav3's default shard size (optimize_model.py -ss)
MAX_HEADER_BYTES = 100 * inputs.MIB  # exllamav3's own cap on a safetensors header (loader/safetensors.py)
# Bytes of safetensors header per tensor in the disk estimate (a GLM-4.7 entry takes about 150).
HEADER_ALLOWANCE = 256
# Time for the assembly: start-up plus copying at no less than 20 MB/s (a slow disk copies 100 MB/s and more).
BASE_TIMEOUT_S = 1800
COPY_RATE = 20 * 1000**2
_SOURCE_HINT = "pass the folder of a downloaded EXL3 quant (config.json, quantization_config.json, shards)"


@dataclass(frozen=True)
class MixSource:
    """One source quant: where it is, its storage, and its origin when the download marker says it."""

    id: str
    path: Path
    storage: QuantStorage
    repo: str | None = None
    branch: str | None = None
    commit: str | None = None
    settings_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records of a source."""
        return {
            "id": self.id,
            "path": str(self.path),
            "repo": self.repo,
            "branch": self.branch,
            "commit": self.commit,
            "codebook": self.storage.codebook,
            "bits": self.storage.bits,
            "head_bits": self.storage.head_bits,
            "vram_bytes": self.storage.vram_bytes,
            "quantization_config_sha256": self.settings_sha256,
        }


@dataclass(frozen=True)
class MixRequest:
    """The command line of `deploy quant mix`, unchecked."""

    lower: str
    upper: str
    others: tuple[str, ...] = ()
    target_gib: float | None = None
    target_bpw: float | None = None
    recipe: str | None = None
    measurement: str | None = None
    out: str = ""
    force: bool = False


@dataclass(frozen=True)
class PreparedMix:
    """Everything checked: sources lowest first, the plan (a recipe's) or the measurement, the target folder."""

    sources: tuple[MixSource, ...]
    target_bytes: int
    out: Path
    recipe: Recipe | None
    plan: MixPlan | None
    measurement: Measurement | None
    disk_bytes: int  # what the result needs on disk, before the margin
    force: bool = False

    @property
    def pairs(self) -> list[Source]:
        """(id, storage) lowest first, as recipe.py takes them."""
        return [(s.id, s.storage) for s in self.sources]

    @property
    def key(self) -> str:
        """Equal keys mean the same mix: same sources (by content of their settings), method and target."""
        document = {
            "format": FORMAT,
            "sources": [(s.id, s.commit, s.settings_sha256) for s in self.sources],
            "recipe": self.recipe.sha256 if self.recipe else None,
            "measurement": self.measurement.sha256 if self.measurement else None,
            "target_bytes": self.target_bytes,
            "shard_size_mb": SHARD_SIZE_MB,
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class MixOutcome:
    """The mix in place: its folder and manifest, whether it was reused, and its sizes."""

    path: Path
    manifest: dict[str, Any]
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the manifest without the per-module map (that stays in mix.json)."""
        brief = {k: v for k, v in self.manifest.items() if k != "modules"}
        return {"path": str(self.path), "reused": self.reused, **brief}


class Runner(Protocol):
    """Where mix_entry runs: the paths it sees the sources and the staging folder at, and how it is started."""

    def places(self, sources: Sequence[Path], staging: Path) -> tuple[list[str], str]:
        """The sources' and the staging folder's paths as the entry point sees them."""

    def run(
        self,
        sources: Sequence[Path],
        staging: Path,
        job_file: str,
        target: Path,
        on_line: Callable[[str], None],
        timeout_s: float,
    ) -> int | None:
        """Run the entry point on job_file to the end (None: killed at the timeout); its output to on_line."""

    def prepare_staging(self, staging: Path) -> None:
        """Make the staging folder writable by whoever runs the entry point."""

    def restore_owner(self, model: Path) -> None:
        """Give the result to the caller when the entry point ran as another user."""

    def describe(self) -> dict[str, Any]:
        """What ran the assembly, for the manifest."""


# ---------------------------------------------------------------------------------------------------- checking


def read_source(text: str, what: str) -> MixSource:
    """A source folder, checked: a complete EXL3 quant whose shards hold every tensor its settings list."""
    path = Path(validate.host_path(str(Path(os.path.abspath(text)).resolve()), what))
    if not path.is_dir():
        raise BadInput(f"{what} {path} is not a folder", _SOURCE_HINT)
    storage = read_storage(path)
    check_shards(path, storage, what)
    marker = _marker(path)
    branch = marker.get("revision") if marker else None
    name = branch or path.name
    if not validate.SAFE_NAME.match(name):
        raise BadInput(f"{what} {path}: {name!r} is not usable as a source name", "rename the folder")
    digest = hashlib.sha256((path / QUANT_CONFIG).read_bytes()).hexdigest()
    return MixSource(
        name,
        path,
        storage,
        marker.get("repo") if marker else None,
        branch,
        marker.get("commit") if marker else None,
        digest,
    )


def shard_headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Every tensor in the folder's *.safetensors files: dtype, shape and bytes, from the headers alone."""
    found: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        size = shard.stat().st_size
        with shard.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise BadInput(f"{shard} is not a safetensors file", "download the quant again")
            header = inputs.parse_json(handle.read(length), "the safetensors header of", shard)
        if not isinstance(header, dict):
            raise BadInput(f"{shard} is not a safetensors file", "download the quant again")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not isinstance(shape, list)
                or 8 + length + offsets[1] > size
            ):
                raise BadInput(
                    f"{shard}: tensor {str(name)[:80]!r} is malformed or truncated", "download again"
                )
            found[name] = (str(entry.get("dtype")), tuple(shape), offsets[1] - offsets[0])
    return found


def check_shards(folder: Path, storage: QuantStorage, what: str) -> None:
    """Every tensor quantization_config.json lists is in a shard with its shape and bytes (a partial download or
    a hand-edited settings file is named here, before hours of copying)."""
    headers = shard_headers(folder)
    if not headers:
        raise BadInput(f"{what} {folder} holds no .safetensors shards", _SOURCE_HINT)
    for module in storage.modules.values():
        for name, shape in module.shapes.items():
            stored = headers.get(name)
            if stored is None:
                raise BadInput(
                    f"{what} {folder}: tensor {name} is listed in {QUANT_CONFIG} but in no shard",
                    "the download is incomplete: fetch it again",
                )
            if stored[1] != shape:
                raise BadInput(
                    f"{what} {folder}: tensor {name} is {list(stored[1])} in its shard, {list(shape)} in "
                    f"{QUANT_CONFIG}",
                    "download the quant again",
                )
        in_shards = sum(headers[name][2] for name in module.shapes)
        if in_shards != module.n_bytes:
            raise BadInput(
                f"{what} {folder}: {module.key} holds {in_shards} bytes in its shards, {module.n_bytes} in "
                f"{QUANT_CONFIG}",
                "download the quant again",
            )


def _marker(folder: Path) -> dict[str, Any] | None:
    """The download marker of `deploy fetch-model` when it is there and every file it lists has its size."""
    path = folder / MODEL_MARKER
    if not path.is_file():
        return None
    try:
        marker = inputs.parse_json(inputs.read_text(path, "the download marker"), "the download marker", path)
    except BadInput:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    for rel, size in marker["files"].items():
        local = folder / str(rel)
        if str(rel).startswith("/") or ".." in str(rel).split("/"):
            return None
        if not local.is_file() or local.stat().st_size != size:
            return None
    keep = ("repo", "revision", "commit")
    if not all(isinstance(marker.get(k), str) for k in keep) or not validate.SAFE_NAME.match(
        marker["revision"]
    ):
        return None
    return {k: marker[k] for k in keep}


def linear_bits(storage: QuantStorage) -> tuple[int, int]:
    """Bits and weights of the linears exllamav3 counts in its layer bpw (every linear but the head; the router
    is an unquantized linear): (8 x stored bytes, weights). Weights from the trellis shape, 16 x 16 per tile."""
    bits = numel = 0
    for key, module in storage.modules.items():
        if module.group == "head":
            continue
        if module.bits is not None:
            trellis = module.shapes[f"{key}.trellis"]
            numel += trellis[0] * 16 * trellis[1] * 16
        elif module.group == "router" and len(module.shapes.get(f"{key}.weight", ())) == 2:
            rows, cols = module.shapes[f"{key}.weight"]
            numel += rows * cols
        else:
            continue
        bits += 8 * module.n_bytes
    return bits, numel


def target_for_bpw(base: QuantStorage, bpw: float) -> int:
    """VRAM bytes of a mix whose layer bpw (as exllamav3 reports it) is at most bpw, all else as in the base."""
    bits, numel = linear_bits(base)
    return base.vram_bytes + int((bpw * numel - bits) // 8)


def check_target_folder(text: str, sources: Sequence[MixSource]) -> Path:
    """--out: a new or empty folder, or a mix made here (replaced), not inside a source; a name TabbyAPI can load."""
    out = inputs.output_folder(text, "--out")
    validate.host_path(str(out), "--out")
    validate.safe_name(out.name, "--out's folder name")
    for source in sources:
        if out == source.path or source.path in out.parents or out in source.path.parents:
            raise BadInput(
                f"--out {out} overlaps the source {source.path}", "write the mix to its own folder"
            )
    if out.is_dir() and any(out.iterdir()) and read_manifest(out) is None:
        raise BadInput(
            f"--out {out} exists and is not a mix made by `deploy quant mix`",
            "choose a new folder or remove it",
        )
    return out


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The mix.json of a mix made by `deploy quant mix` in folder, or None."""
    path = folder / MIX_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = inputs.parse_json(
            inputs.read_text(path, "the mix manifest", 64 * inputs.MIB), MIX_MANIFEST, path
        )
    except BadInput:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def prepare(request: MixRequest) -> PreparedMix:
    """Every check that needs no runner, bad input first, then the disk."""
    if (request.target_gib is None) == (request.target_bpw is None):
        raise BadInput(
            "give the mix's size as --target-gib or --target-bpw (one of them)", "e.g. --target-gib 120"
        )
    lower = read_source(request.lower, "--lower")
    upper = read_source(request.upper, "--upper")
    others = sorted((read_source(t, "--source") for t in request.others), key=lambda s: s.storage.vram_bytes)
    sources = (lower, *others, upper)
    paths = [s.path for s in sources]
    if len(set(paths)) != len(paths):
        raise BadInput("a source folder is given twice", "pass each quant once")
    check_compatible([(s.id, s.storage) for s in sources])
    for source in (*others, upper):
        if source.storage.vram_bytes <= lower.storage.vram_bytes:
            raise BadInput(
                f"--lower {lower.id} ({gib(lower.storage.vram_bytes)} GiB) is not smaller than {source.id} "
                f"({gib(source.storage.vram_bytes)} GiB)",
                "--lower is the smallest quant, --upper the largest",
            )
    for source in others:
        if source.storage.vram_bytes >= upper.storage.vram_bytes:
            raise BadInput(
                f"--source {source.id} is not smaller than --upper {upper.id}", "--upper is the largest quant"
            )
    if request.target_gib is not None:
        target = int(_positive(request.target_gib, "--target-gib", 1e6, "120") * GIB)
    else:
        target = target_for_bpw(lower.storage, _positive(request.target_bpw, "--target-bpw", 32, "3.2"))
    pairs = [(s.id, s.storage) for s in sources]
    recipe = measurement = plan = None
    if request.measurement is not None:
        if request.recipe is not None:
            raise BadInput("--recipe and --measurement exclude each other", "pass one of them")
        measurement = read_measurement(Path(request.measurement), pairs)
        check_target(pairs, target, measured_range(pairs, measurement), f"the measurement {measurement.path}")
        need = target + lower.storage.embedding_bytes  # the optimizer's mix is at most the target
    else:
        recipe = load_recipe(request.recipe)
        plan = plan_mix(pairs, target, recipe)
        need = plan.tensor_bytes
    out = check_target_folder(request.out, sources)
    tensors = sum(len(m.shapes) for m in lower.storage.modules.values())
    disk = need + tensors * HEADER_ALLOWANCE + _other_files_bytes(lower.path)
    check_disk(out, disk)
    return PreparedMix(sources, target, out, recipe, plan, measurement, disk, request.force)


def _positive(value: float | None, option: str, high: float, example: str) -> float:
    if value is None or not math.isfinite(value) or not 0 < value <= high:
        raise BadInput(
            f"{option} {value} is not a number above 0 and up to {high:g}", f"e.g. {option} {example}"
        )
    return value


def _other_files_bytes(folder: Path) -> int:
    """The files compile_model copies from the base (all but shards and weights), and the settings it writes."""
    total = 0
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".ckpt", ".pth", ".pt")):
            total += path.stat().st_size
    return 2 * total  # config.json and quantization_config.json are written anew, a little larger


def check_disk(out: Path, need_bytes: int) -> None:
    """Free space where the mix is written must cover it plus the margin (exit 4 otherwise)."""
    disk.check_free(
        out.parent, need_bytes, "the mix", "free disk space or pass --out on a larger disk", digits=3
    )


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class _Run:
    """What the entry point reported: its events, and its last lines for an error message."""

    bar: ByteBar
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=60))
    start: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    overrides: dict[str, Any] | None = None
    shards: int = 0
    written: int = 0

    def __call__(self, line: str) -> None:
        event = _event(line)
        if event is None:
            self.tail.append(line)
            self.bar.line(line)
            return
        kind = event["event"]
        if kind == "shard" and _whole(event.get("bytes")) and _whole(event.get("index")):
            self.shards += 1
            self.written += event["bytes"]
            self.bar.advance(event["bytes"], f"shard {event['index']}/{event.get('count')}")
        elif kind in ("start", "done", "overrides"):
            setattr(self, kind, event)


def _event(line: str) -> dict[str, Any] | None:
    if not line.startswith('{"event"'):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def build(prepared: PreparedMix, runner: Runner, progress: Progress) -> MixOutcome:
    """Reuse the mix at --out when it is this one, else assemble it in a staging folder and put it in place."""
    reused = _reusable(prepared)
    if reused is not None:
        return MixOutcome(prepared.out, reused, True)
    out = prepared.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out.parent))
    try:
        os.chmod(staging, 0o755)
        source_paths = [s.path for s in prepared.sources]
        seen_sources, seen_staging = runner.places(source_paths, staging)
        job = _job(prepared, seen_sources, seen_staging)
        write_text(staging / JOB_FILE, json.dumps(job, indent=2) + "\n")
        if prepared.measurement is not None:
            (staging / MEASUREMENT_FILE).write_bytes(prepared.measurement.data)
        runner.prepare_staging(staging)
        timeout = BASE_TIMEOUT_S + prepared.disk_bytes / COPY_RATE
        what = f"assembling {out.name} from {' + '.join(s.id for s in prepared.sources)}"
        with progress.bar(what, prepared.disk_bytes) as bar:
            run = _Run(bar)
            code = runner.run(source_paths, staging, f"{seen_staging}/{JOB_FILE}", out, run, timeout)
        if code != 0 or run.done is None:
            raise _failure(code, run, timeout)
        if run.start is not None and run.start.get("test_double"):
            progress.warn("the assembly ran on the TEST DOUBLE of exllamav3 (test image only)")
        overrides = _overrides(prepared, run)
        model = staging / MODEL_SUBDIR
        plan = make_plan(prepared.pairs, overrides, prepared.target_bytes)
        modules = {key: plan.source_of(key) for key in prepared.sources[0].storage.modules}
        result = check_result(model, prepared, modules)
        runner.restore_owner(model)
        (model / MODEL_MARKER).unlink(missing_ok=True)  # the base's download marker: not this folder's
        manifest = _manifest(prepared, plan, modules, result, run, runner)
        write_text(model / MIX_MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _replace(model, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MixOutcome(out, manifest, False)


def _job(prepared: PreparedMix, sources: list[str], staging: str) -> dict[str, Any]:
    job: dict[str, Any] = {
        "base_dir": sources[0],
        "sources": [{"id": s.id, "dir": d} for s, d in zip(prepared.sources[1:], sources[1:])],
        "out_dir": f"{staging}/{MODEL_SUBDIR}",
        "shard_size_mb": SHARD_SIZE_MB,
    }
    if prepared.measurement is not None:
        job["measurement"] = f"{staging}/{MEASUREMENT_FILE}"
        job["extra_bytes"] = prepared.target_bytes - prepared.sources[0].storage.vram_bytes
    else:
        assert prepared.plan is not None
        job["overrides"] = prepared.plan.overrides
    return job


def _overrides(prepared: PreparedMix, run: _Run) -> dict[str, str]:
    """The recipe's overrides, or the optimizer's as the entry point reported them (checked, then sized)."""
    if prepared.measurement is None:
        assert prepared.plan is not None
        return prepared.plan.overrides
    reported = (run.overrides or {}).get("overrides")
    base = prepared.sources[0].storage
    ids = {s.id for s in prepared.sources[1:]}
    if not isinstance(reported, dict) or any(
        k not in base.modules or v not in ids for k, v in reported.items()
    ):
        raise VerificationFailed("the optimizer reported no valid overrides", "read the lines above")
    predicted = make_plan(prepared.pairs, reported, prepared.target_bytes).predicted_bytes
    if predicted > prepared.target_bytes:
        raise VerificationFailed(
            f"the optimizer's mix holds {predicted} bytes, above the target {prepared.target_bytes}",
            "report this; the mix was not kept",
        )
    return reported


def check_result(model: Path, prepared: PreparedMix, modules: dict[str, str]) -> QuantStorage:
    """The assembled quant lists every module with exactly the stored tensors of the source it was planned from,
    and its shards hold them (else exit 5: nothing is kept)."""
    by_id = {s.id: s.storage for s in prepared.sources}
    try:
        result = read_storage(model)
        check_shards(model, result, "the mix")
    except BadInput as error:
        raise VerificationFailed(
            f"the assembled quant is unreadable: {error.message}", "nothing was kept"
        ) from None
    extra = next((k for k in result.modules if k not in modules), None)
    if extra is not None:
        raise VerificationFailed(f"the mix holds a module {extra} no source has", "nothing was kept")
    for key, source_id in modules.items():
        got = result.modules.get(key)
        want = by_id[source_id].modules[key]
        if got is None:
            raise VerificationFailed(f"the mix lacks the module {key}", "nothing was kept")
        if got.n_bytes != want.n_bytes or got.shapes != want.shapes:
            raise VerificationFailed(
                f"the mix's {key} stores {got.n_bytes} bytes, {source_id}'s {want.n_bytes}: not the planned tensors",
                "nothing was kept",
            )
    return result


def _manifest(
    prepared: PreparedMix,
    plan: MixPlan,
    modules: dict[str, str],
    result: QuantStorage,
    run: _Run,
    runner: Runner,
) -> dict[str, Any]:
    done = run.done or {}
    recipe = prepared.recipe
    return {
        "format": FORMAT,
        "key": prepared.key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": "measurement" if prepared.measurement else "recipe",
        "recipe": None
        if prepared.measurement or recipe is None
        else {"name": recipe.name, "sha256": recipe.sha256, "source": recipe.source},
        "measurement": None
        if prepared.measurement is None
        else {
            "path": str(prepared.measurement.path),
            "sha256": prepared.measurement.sha256,
            "groups": prepared.measurement.groups,
            "modules_without_measured_gain": len(prepared.measurement.flat_layers),
        },
        "sources": [s.to_dict() for s in prepared.sources],
        "base": prepared.sources[0].id,
        "target_bytes": prepared.target_bytes,
        "predicted_bytes": plan.predicted_bytes,
        "actual_bytes": result.vram_bytes,
        "embedding_bytes": result.embedding_bytes,
        "shards": run.shards,
        "shard_bytes": run.written,
        "by_group": result.by_group(),
        "bits": done.get("bits"),
        "head_bits": done.get("head_bits"),
        "versions": done.get("versions"),
        "test_double": bool(done.get("test_double")),
        "assembly_seconds": done.get("seconds"),
        "runner": runner.describe(),
        "modules_from": {sid: sum(1 for v in modules.values() if v == sid) for sid in dict(prepared.pairs)},
        "modules": modules,
    }


def _replace(model: Path, out: Path, staging: Path) -> None:
    """Put the checked result at out; an earlier mix (or an empty folder) there is moved aside and removed."""
    aside = staging / "previous"
    if out.exists():
        os.rename(out, aside)
    try:
        os.rename(model, out)
    except OSError:
        if aside.exists():
            os.rename(aside, out)
        raise


def _reusable(prepared: PreparedMix) -> dict[str, Any] | None:
    """The manifest at --out when it is this very mix and the folder still checks out (not with --force)."""
    if prepared.force:
        return None
    manifest = read_manifest(prepared.out)
    if (
        manifest is None
        or manifest.get("key") != prepared.key
        or not isinstance(manifest.get("modules"), dict)
    ):
        return None
    ids = {s.id for s in prepared.sources}
    if any(v not in ids for v in manifest["modules"].values()):
        return None
    try:
        check_result(prepared.out, prepared, manifest["modules"])
    except (VerificationFailed, KeyError):
        return None
    return manifest


def _failure(code: int | None, run: _Run, timeout: float) -> ToolkitError:
    """The entry point's failure as the CLI's one line: its own error line, or its last line."""
    if code is None:
        return EnvironmentMissing(f"the mix did not finish within {int(timeout)} s", "nothing was kept")
    own = next((ln.split("error: ", 1)[1] for ln in reversed(run.tail) if "[mix] error: " in ln), None)
    last = own or (run.tail[-1] if run.tail else "no output")
    if code == 2:
        return BadInput(f"the mix assembly refused its job: {last}", "nothing was kept")
    if code == 0:
        return VerificationFailed("the mix assembly ended without its done event", "nothing was kept")
    return EnvironmentMissing(f"the mix assembly failed (exit {code}): {last[:300]}", "nothing was kept")


# ---------------------------------------------------------------------------------------------------- a local Python


class PythonRunner:
    """The entry point run by a local Python that imports exllamav3 (--python): paths are the host's own."""

    def __init__(self, python: str) -> None:
        found = python if os.sep in python else shutil.which(python) or python  # a bare name: from the PATH
        path = Path(os.path.abspath(found))
        if not path.is_file() or not os.access(path, os.X_OK):
            raise BadInput(
                f"--python {path} is not an executable file", "pass the python of an env with exllamav3"
            )
        self.python = path

    def places(self, sources: Sequence[Path], staging: Path) -> tuple[list[str], str]:
        return [str(s) for s in sources], str(staging)

    def run(
        self,
        sources: Sequence[Path],
        staging: Path,
        job_file: str,
        target: Path,
        on_line: Callable[[str], None],
        timeout_s: float,
    ) -> int | None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        process = subprocess.Popen(
            [str(self.python), "-m", ENTRY_MODULE, "--job", job_file],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            process.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.strip():
                    on_line(line.rstrip("\n"))
            code = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        return None if killed.is_set() else code

    def prepare_staging(self, staging: Path) -> None:
        """The caller's own Python writes as the caller: nothing to do."""

    def restore_owner(self, model: Path) -> None:
        """The result is the caller's already."""

    def describe(self) -> dict[str, Any]:
        return {"kind": "python", "python": str(self.python)}

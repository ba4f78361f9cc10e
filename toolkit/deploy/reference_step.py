"""The deployment reference: the project's reference computation run inside the built image, before serving.

After fetch-model and build, the GPUs are free and the image holds torch and exllamav3: a one-off container of
that image runs toolkit.verify.reference_entry (this package, mounted read-only) on the planned GPUs with the model
folder mounted read-only and no network, and writes the reference into a staging folder of the out dir; the host
checks the file and renames it to <out>/deployment-reference.json.gz. A key over everything the result depends on
-- model repo, branch and commit (a mix: its name and mix.json's key), image id, prompt set, top-K, the
computation's own code -- is recorded in the file, so an unchanged deployment reuses it. `deploy verify` and
`deploy status` compare the live server with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing, NoFit, ToolkitError
from ..facts.layout import DEPLOYMENT_REFERENCE, REFERENCE_STAGING_PREFIX
from ..facts.paths import PACKAGE_DIR
from ..output import Progress
from ..verify.reference import (
    COMPUTE_TOP_K,
    POSITIONS_PER_PROMPT,
    VERSION,
    Reference,
    load_prompts,
    load_reference,
    prompts_sha256,
)
from .deployment import Deployment

CODE_DIR = "/opt/glm-deploy"  # the toolkit package is mounted at CODE_DIR/toolkit, read-only
OUT_DIR = "/glm-deploy-out"  # the staging folder, the only writable mount
ENTRY_MODULE = "toolkit.verify.reference_entry"
# The files whose content decides what the computation produces (besides model, image and prompts).
COMPUTATION_FILES = (
    "verify/reference_entry.py",
    "verify/reference.py",
    "verify/exl3_backend.py",
    "verify/kl.py",
)
# Time for the computation itself once loaded: 159 positions = 318 short forwards (on top of the load allowance).
COMPUTE_ALLOWANCE_S = 600


@dataclass(frozen=True)
class ReferenceOutcome:
    """The deployment reference in place: computed now (with its wall time) or reused."""

    path: Path
    reused: bool
    key: str
    wall_seconds: float | None
    reference: Reference

    @property
    def test_double(self) -> bool:
        """Made by a test double instead of exllamav3 (only the CPU test image has one): always said aloud."""
        return str(self.reference.settings.get("backend", "")).startswith("test-double")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: where, reused or not, and what it was made with and cost."""
        settings = self.reference.settings
        return {
            "path": str(self.path),
            "reused": self.reused,
            "key": self.key,
            "wall_seconds": self.wall_seconds,
            "positions": self.reference.positions,
            "model_id": self.reference.model_id,
            "model_commit": settings.get("model_commit"),
            "backend": settings.get("backend"),
            "versions": settings.get("versions"),
            "cache_mode": settings.get("cache_mode"),
            "max_seq_len": settings.get("max_seq_len"),
            "placement": settings.get("placement"),
            "load_seconds": settings.get("load_seconds"),
            "compute_seconds": settings.get("compute_seconds"),
            "peak_gpu_mib": settings.get("peak_gpu_mib"),
            "created": self.reference.created,
        }


def reference_path(dep: Deployment) -> Path:
    """Where a deployment's reference lives."""
    return dep.out_dir / DEPLOYMENT_REFERENCE


def stored_reference(dep: Deployment) -> Reference | None:
    """The deployment's reference when present and readable (an unreadable one is recomputed, not trusted)."""
    path = reference_path(dep)
    if not path.is_file():
        return None
    try:
        return load_reference(path)
    except BadInput:
        return None


def reference_status(dep: Deployment, client: Any) -> dict[str, Any] | None:
    """The stored reference in brief, and whether it is current for the downloaded model and the built image."""
    from docker.errors import ImageNotFound

    from .mix_step import model_marker

    reference = stored_reference(dep)
    if reference is None:
        return None
    marker = model_marker(dep)
    try:
        image = client.images.get(str(dep.manifest["image"])).id
    except ImageNotFound:
        image = None
    current = (
        reference.settings.get("key") == reference_key(marker, image, prompts_sha256(load_prompts()))
        if marker is not None and image is not None
        else None
    )
    return {
        "path": str(reference_path(dep)),
        "created": reference.created,
        "positions": reference.positions,
        "model_commit": reference.settings.get("model_commit"),
        "backend": reference.settings.get("backend"),
        "current": current,
    }


def code_sha256() -> str:
    """sha256 of the computation's source files: new code, new reference."""
    digest = hashlib.sha256()
    for name in COMPUTATION_FILES:
        digest.update(name.encode())
        digest.update((PACKAGE_DIR / name).read_bytes())
    return digest.hexdigest()


def reference_key(marker: dict[str, Any], image: str, prompts_hash: str, top_k: int = COMPUTE_TOP_K) -> str:
    """The reuse key: equal keys mean the same computation on the same weights in the same image."""
    document = {
        "format": VERSION,
        "code": code_sha256(),
        "model": {k: marker.get(k) for k in ("repo", "revision", "commit")},
        "image": image,
        "prompts": prompts_hash,
        "top_k": top_k,
        "positions_per_prompt": POSITIONS_PER_PROMPT,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def container_command(model_target: str, commit: str, key: str) -> list[str]:
    """What the reference container runs (PYTHONPATH=CODE_DIR): the entry point on the mounted model folder."""
    return [
        "python3",
        "-m",
        ENTRY_MODULE,
        "--model-dir",
        model_target,
        "--out",
        OUT_DIR,
        "--model-commit",
        commit,
        "--key",
        key,
    ]


def reference_step(
    dep: Deployment, client: Any, progress: Progress, *, gpu: bool, force: bool = False
) -> ReferenceOutcome:
    """Reuse the stored reference when its key matches, else compute it in the image on the planned GPUs."""
    from . import compose_spec, engine, state
    from .readiness import ready_timeout_s
    from .steps import check_model_in_place, container_name

    marker = check_model_in_place(dep)
    image = engine.image_id(client, str(dep.manifest["image"]))
    key = reference_key(marker, image, prompts_sha256(load_prompts()))
    path = reference_path(dep)
    stored = stored_reference(dep)
    if stored is not None and stored.settings.get("key") == key and not force:
        return ReferenceOutcome(path, True, key, None, stored)

    gpu = gpu and bool(dep.manifest.get("gpu_reservation", True))
    spec = compose_spec.spec_from_compose(
        dep.compose, name=state.default_container_name(dep.out_dir), gpu=gpu
    )
    model_mount = next((m for m in spec.mounts if m.target.startswith("/app/models/")), None)
    if model_mount is None:
        raise BadInput(f"{dep.compose} mounts no model folder under /app/models", "run `deploy render` again")
    if gpu:
        serving = engine.find_container(client, container_name(dep))
        if serving is not None and serving.status == "running":
            progress.note(
                f"stopping {serving.name} to free the planned GPUs for the reference (`up` restarts it)"
            )
            engine.stop(serving)
    user = spec.user or "10001:10001"
    staging = Path(tempfile.mkdtemp(prefix=REFERENCE_STAGING_PREFIX, dir=dep.out_dir))
    try:
        if os.getuid() == 0:  # root renders for the image's user; anyone else is the container's user already
            uid, _, gid = user.partition(":")
            os.chown(staging, int(uid), int(gid or uid))
        task = engine.TaskSpec(
            name=f"{state.default_container_name(dep.out_dir)}-reference",
            image=image,
            entrypoint=("python3",),
            command=tuple(container_command(model_mount.target, str(marker["commit"]), key)[1:]),
            environment={
                "PYTHONPATH": ":".join([CODE_DIR, *_image_pythonpath(client, image)]),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            },
            mounts=(
                compose_spec.Mount(model_mount.source, model_mount.target, read_only=True),
                compose_spec.Mount(str(PACKAGE_DIR), f"{CODE_DIR}/toolkit", read_only=True),
                compose_spec.Mount(str(staging), OUT_DIR, read_only=False),
            ),
            user=user,
            gpu_device_ids=spec.gpu_device_ids,
            shm_size=spec.shm_size,
            ulimits=spec.ulimits,
            labels={"io.glm-deploy.role": "reference"},
        )
        where = (
            f"GPUs {', '.join(spec.gpu_device_ids) or 'all'}" if spec.gpu_device_ids is not None else "CPU"
        )
        started = time.monotonic()
        timeout = ready_timeout_s(sum(marker["files"].values())) + COMPUTE_ALLOWANCE_S
        with progress.status(
            f"computing the deployment reference in {dep.manifest['image']} on {where}"
        ) as update:
            result = engine.run_task(client, task, dep.out_dir, update, timeout)
        wall = time.monotonic() - started
        if result.exit_code != 0:
            raise _failure(result, timeout)
        reference = _checked(staging / DEPLOYMENT_REFERENCE, key)
        (staging / DEPLOYMENT_REFERENCE).replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReferenceOutcome(path, False, key, round(wall, 1), reference)


def describe(outcome: ReferenceOutcome) -> str:
    """One line: what was computed, by what, and what it cost."""
    data = outcome.to_dict()
    peak = data["peak_gpu_mib"]
    memory = ", ".join(f"GPU {i} {mib:.0f} MiB" for i, mib in enumerate(peak)) if peak else "no GPU"
    backend = str(data["backend"])
    by = f"the TEST DOUBLE {backend}" if outcome.test_double else f"{backend} {data['versions']}"
    how = "reused (same model commit, image, prompts and code)" if outcome.reused else "computed"
    return (
        f"deployment reference {how}: {outcome.path}: {data['positions']} "
        f"positions by {by}, cache {data['cache_mode']} x {data['max_seq_len']} tokens ({data['placement']}); "
        f"load {data['load_seconds']} s, compute {data['compute_seconds']} s"
        + (f", {data['wall_seconds']} s in all" if data["wall_seconds"] is not None else "")
        + f"; peak memory {memory}"
    )


def _image_pythonpath(client: Any, image: str) -> list[str]:
    """The image's own PYTHONPATH entries (the test image puts its server there), kept after CODE_DIR."""
    env = (client.images.get(image).attrs.get("Config") or {}).get("Env") or []
    value = next((e.split("=", 1)[1] for e in env if e.startswith("PYTHONPATH=")), "")
    return [p for p in value.split(":") if p]


def _checked(path: Path, key: str) -> Reference:
    """The staged file must load and carry this run's key (else it is not what was asked for)."""
    try:
        reference = load_reference(path)
    except BadInput as error:
        raise EnvironmentMissing(
            f"the reference computation wrote no valid reference ({error.message})", "read the lines above"
        ) from None
    if reference.settings.get("key") != key:
        raise EnvironmentMissing("the reference computation wrote a file for another key", "run it again")
    return reference


def _failure(result: Any, timeout: float) -> ToolkitError:
    """The container's failure as the error the CLI prints: the entry point's own line, a diagnosis, or its log."""
    from .diagnose import diagnose, last_line

    hint = "fix the cause and run `deploy reference deployment`, or pass --no-kl to `deploy auto` to skip it"
    if result.exit_code is None:
        return EnvironmentMissing(f"the deployment reference did not finish within {int(timeout)} s", hint)
    own = next(
        (
            line.split("error: ", 1)[1]
            for line in reversed(result.log_tail.splitlines())
            if "] error: " in line
        ),
        None,
    )
    by_code: dict[int, type[ToolkitError]] = {2: BadInput, 3: NoFit, 4: EnvironmentMissing}
    if own is not None and result.exit_code in by_code:
        return by_code[result.exit_code](f"the deployment reference: {own}")
    found = diagnose(result.log_tail, exit_code=result.exit_code)
    if found is not None and found.kind == "oom":
        return NoFit(
            f"the deployment reference did not fit in GPU memory (log: {found.evidence})",
            "nothing else may use the planned GPUs before `up`; free them, or pass --no-kl to skip the reference",
        )
    if found is not None and found.kind != "exited":
        return found.error()
    return EnvironmentMissing(
        f"the deployment reference failed (exit {result.exit_code}): {last_line(result.log_tail)[:240]}", hint
    )

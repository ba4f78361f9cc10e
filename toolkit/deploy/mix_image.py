"""The mix assembly run in the deployment's built image: the image holds torch and exllamav3, the host may not.

Like the deployment reference (reference_step.py): a one-off container of the image runs
toolkit.quant.mix_entry (this package, mounted read-only) with no network, every source folder mounted read-only
and only the staging folder writable, as a non-root user. No GPU is requested: the assembly copies tensors on the
CPU (exllamav3 conversion/optimize_model.py and util/recompile.py need none).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..facts.paths import PACKAGE_DIR
from ..quant.mix import ENTRY_MODULE
from . import compose_spec, engine

CODE_DIR = "/opt/glm-deploy"  # the toolkit package is mounted at CODE_DIR/toolkit, read-only
SOURCES_DIR = "/glm-deploy-mix/sources"  # source i (0 = the base) at SOURCES_DIR/i, read-only
STAGING_DIR = "/glm-deploy-mix/out"  # the staging folder, the only writable mount
DEFAULT_USER = (
    "10001:10001"  # the rendered image's user, taken when the caller is root (as the reference does)
)


class ImageRunner:
    """Runs mix_entry in a local image through the Docker engine (toolkit.quant.mix's Runner)."""

    def __init__(self, client: Any, image: str, gpu_device_ids: tuple[str, ...] | None = None) -> None:
        self.client = client
        self.image = image
        self.image_id = engine.image_id(client, image)  # exit 4 when it is not built
        self.gpu_device_ids = gpu_device_ids
        root = os.getuid() == 0
        self.user = DEFAULT_USER if root else f"{os.getuid()}:{os.getgid()}"
        self._chown = root

    def places(self, sources: Sequence[Path], staging: Path) -> tuple[list[str], str]:
        return [f"{SOURCES_DIR}/{i}" for i in range(len(sources))], STAGING_DIR

    def prepare_staging(self, staging: Path) -> None:
        """Root hands the staging folder to the image's user; anyone else is the container's user already."""
        if self._chown:
            uid, _, gid = self.user.partition(":")
            os.chown(staging, int(uid), int(gid or uid))

    def restore_owner(self, model: Path) -> None:
        """The files the container's user wrote become the caller's (root's) again."""
        if not self._chown:
            return
        uid, gid = os.getuid(), os.getgid()
        os.chown(model, uid, gid)
        for folder, dirs, files in os.walk(model):
            for name in dirs + files:
                os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)

    def run(
        self,
        sources: Sequence[Path],
        staging: Path,
        job_file: str,
        target: Path,
        on_line: Callable[[str], None],
        timeout_s: float,
    ) -> int | None:
        mounts = [
            compose_spec.Mount(str(path), seen, read_only=True)
            for path, seen in zip(sources, self.places(sources, staging)[0])
        ]
        name = "glm-deploy-mix-" + hashlib.sha256(str(target).encode()).hexdigest()[:12]
        task = engine.TaskSpec(
            name=name,
            image=self.image_id,
            entrypoint=("python3",),
            command=("-m", ENTRY_MODULE, "--job", job_file),
            environment={
                "PYTHONPATH": ":".join([CODE_DIR, *image_pythonpath(self.client, self.image_id)]),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            },
            mounts=(
                *mounts,
                compose_spec.Mount(str(PACKAGE_DIR), f"{CODE_DIR}/toolkit", read_only=True),
                compose_spec.Mount(str(staging), STAGING_DIR, read_only=False),
            ),
            user=self.user,
            gpu_device_ids=self.gpu_device_ids,
            shm_size=None,
            ulimits=(),
            labels={"io.glm-deploy.role": "mix"},
        )
        return engine.run_task(self.client, task, target, on_line, timeout_s).exit_code

    def describe(self) -> dict[str, Any]:
        return {"kind": "image", "image": self.image, "image_id": self.image_id}


def image_pythonpath(client: Any, image: str) -> list[str]:
    """The image's own PYTHONPATH entries, kept after CODE_DIR (a test image puts its exllamav3 there)."""
    env = (client.images.get(image).attrs.get("Config") or {}).get("Env") or []
    value = next((e.split("=", 1)[1] for e in env if e.startswith("PYTHONPATH=")), "")
    return [p for p in value.split(":") if p]

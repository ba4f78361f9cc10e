"""Docker engine adapter (docker SDK): connect, build with streamed progress, converge a container, logs, remove.

A RunSpec (compose_spec.py reads it from the rendered compose.yaml) is what containers.run takes; its sha256 labels
the container, so `up` keeps an unchanged container and replaces a changed one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EnvironmentMissing, ToolkitError
from .compose_spec import Mount, RunSpec
from .diagnose import diagnose

LABEL_OUT_DIR = "io.glm-deploy.out-dir"
LABEL_CONFIG = "io.glm-deploy.config-sha256"
LABEL_DOCKERFILE = "io.glm-deploy.dockerfile-sha256"
STOP_TIMEOUT_S = 30
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")


@dataclass(frozen=True)
class BuiltImage:
    """An image ready to run: built now, or reused because its Dockerfile hash label matched."""

    id: str
    tag: str
    reused: bool


@dataclass(frozen=True)
class ContainerStatus:
    """A container's state as status and readiness need it."""

    name: str
    id: str
    status: str  # created | running | restarting | exited | ...
    exit_code: int | None
    restart_count: int
    oom_killed: bool
    health: str | None
    image_id: str

    @property
    def running(self) -> bool:
        return self.status == "running"


def connect() -> Any:
    """A docker SDK client to a live engine, or exit 4 saying where it looked and how to fix it."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - every failure here means "no engine"
        raise EnvironmentMissing(
            f"Docker engine not reachable at {where} ({type(exc).__name__})",
            "start dockerd (or fix DOCKER_HOST) and check `docker info` works",
        ) from None
    return client


def gpu_runtime_present(client: Any) -> bool:
    """True when the engine can give containers NVIDIA GPUs: the nvidia runtime, or NVIDIA CDI specs."""
    info = client.info()
    if "nvidia" in (info.get("Runtimes") or {}):
        return True
    spec_dirs = info.get("CDISpecDirs") or list(CDI_DIRS)
    for folder in spec_dirs:
        path = Path(folder)
        if path.is_dir() and any("nvidia" in p.name for p in path.iterdir()):
            return True
    return False


def context_sha256(
    context_dir: Path, dockerfile: str = "Dockerfile", buildargs: dict[str, str] | None = None
) -> str:
    """Hash of the Dockerfile, build args and every local file its COPY/ADD lines use: what decides the image."""
    text = (context_dir / dockerfile).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode())
    digest.update(json.dumps(buildargs or {}, sort_keys=True).encode())
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        if any(w.startswith("--from") for w in words):
            continue
        for source in (w for w in words[1:-1] if not w.startswith("--") and "://" not in w):
            for path in sorted(_walk(context_dir / source)):
                digest.update(path.relative_to(context_dir).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _walk(path: Path) -> list[Path]:
    """Files a COPY source names: a file, a folder's files, or a glob's matches."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    return (
        [p for p in path.parent.glob(path.name) if p.is_file()] if any(c in path.name for c in "*?[") else []
    )


def build_image(
    client: Any,
    context_dir: Path,
    tag: str,
    *,
    dockerfile: str = "Dockerfile",
    content_sha256: str | None = None,
    labels: dict[str, str] | None = None,
    buildargs: dict[str, str] | None = None,
    on_line: Callable[[str], None] = lambda _: None,
    force: bool = False,
) -> BuiltImage:
    """Reuse an image whose Dockerfile-hash label matches, else build with the engine, streaming its output.

    content_sha256 is the rendered Dockerfile's hash (render.json); without one, context_sha256() is used.
    """
    from docker.errors import APIError, BuildError

    digest = content_sha256 or context_sha256(context_dir, dockerfile, buildargs)
    if not force:
        found = client.images.list(filters={"label": f"{LABEL_DOCKERFILE}={digest}"})
        if found:  # the one already carrying the tag, else the newest
            image = max(found, key=lambda i: (tag in i.tags, i.attrs.get("Created", "")))
            if tag not in image.tags:
                repository, _, version = tag.rpartition(":")
                image.tag(repository or tag, version or "latest")
            return BuiltImage(image.id, tag, reused=True)
    all_labels = {**(labels or {}), LABEL_DOCKERFILE: digest}
    image_id = ""
    tail: list[str] = []
    try:
        for chunk in client.api.build(
            path=str(context_dir),
            dockerfile=dockerfile,
            tag=tag,
            labels=all_labels,
            buildargs=buildargs,
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
        ):
            if "error" in chunk or "errorDetail" in chunk:
                message = chunk.get("error") or chunk["errorDetail"].get("message", "")
                raise EnvironmentMissing(
                    f"image build failed: {message.strip()[:300]}",
                    "read the build output above; fix the cause and run `deploy build`",
                )
            text = chunk.get("stream") or chunk.get("status") or ""
            for line in text.splitlines():
                if line.strip():
                    tail = (tail + [line.rstrip()])[-20:]
                    on_line(line.rstrip())
            image_id = (chunk.get("aux") or {}).get("ID", image_id)
    except (APIError, BuildError) as exc:
        raise EnvironmentMissing(
            f"image build failed: {_api_message(exc)}", "fix the cause and run `deploy build`"
        ) from None
    if not image_id:
        image_id = client.images.get(tag).id
    return BuiltImage(image_id, tag, reused=False)


def find_container(client: Any, name: str) -> Any | None:
    """The container of that name, or None."""
    from docker.errors import NotFound

    try:
        return client.containers.get(name)
    except NotFound:
        return None


def converge(client: Any, spec: RunSpec, out_dir: Path) -> tuple[Any, str]:
    """Make the deployment's container match spec: keep it (started if stopped), or replace it, or create it."""
    image = _image(client, spec.image)
    want = spec.config_sha256(image.id)
    existing = find_container(client, spec.name)
    if existing is not None:
        owner = existing.labels.get(LABEL_OUT_DIR)
        if owner != str(out_dir.resolve()):
            raise EnvironmentMissing(
                f"a container named {spec.name} already exists and is not this deployment's"
                f" (out dir {owner or 'unknown'})",
                "remove it or use another out dir",
            )
        if existing.labels.get(LABEL_CONFIG) == want:
            if existing.status != "running":
                _start(existing)
                return existing, "started"
            return existing, "kept"
        remove(existing)
        return run(client, spec, image.id, want, out_dir), "replaced"
    return run(client, spec, image.id, want, out_dir), "created"


def run(client: Any, spec: RunSpec, image_id: str, config_sha256: str, out_dir: Path) -> Any:
    """Create and start the container described by spec (detached)."""
    from docker.errors import APIError

    restart_name, _, retries = spec.restart.partition(":")
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "detach": True,
        "environment": spec.environment,
        "ports": spec.ports,
        "mounts": _mounts(spec.mounts),
        "labels": {**spec.labels, LABEL_OUT_DIR: str(out_dir.resolve()), LABEL_CONFIG: config_sha256},
        "ulimits": [docker_ulimit(n, s, h) for n, s, h in spec.ulimits],
    }
    if restart_name and restart_name != "no":
        kwargs["restart_policy"] = {
            "Name": restart_name,
            **({"MaximumRetryCount": int(retries)} if retries else {}),
        }
    if spec.command:
        kwargs["command"] = list(spec.command)
    if spec.shm_size:
        kwargs["shm_size"] = spec.shm_size
    if spec.healthcheck:
        kwargs["healthcheck"] = spec.healthcheck
    if spec.working_dir:
        kwargs["working_dir"] = spec.working_dir
    if spec.user:
        kwargs["user"] = spec.user
    if spec.init:
        kwargs["init"] = True
    if spec.log_config:
        kwargs["log_config"] = spec.log_config
    if spec.gpu_device_ids is not None:
        kwargs["device_requests"] = _gpu_request(spec.gpu_device_ids)
    _check_sources(spec.mounts)
    try:
        container = client.containers.create(image_id, **kwargs)
    except APIError as exc:
        raise _start_error(exc) from None
    try:
        container.start()
    except APIError as exc:
        container.remove(force=True)
        raise _start_error(exc) from None
    container.reload()
    return container


def _mounts(mounts: tuple[Mount, ...]) -> list[Any]:
    import docker

    return [docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in mounts]


def _gpu_request(device_ids: tuple[str, ...]) -> list[Any]:
    """The NVIDIA device request for these GPUs (UUIDs or indices); () asks for all of them."""
    import docker

    ids = list(device_ids)
    return [
        docker.types.DeviceRequest(
            driver="nvidia", device_ids=ids or None, count=None if ids else -1, capabilities=[["gpu"]]
        )
    ]


def _check_sources(mounts: tuple[Mount, ...]) -> None:
    for mount in mounts:
        if not Path(mount.source).exists():
            raise EnvironmentMissing(
                f"mount source {mount.source} does not exist",
                "run `deploy render` and `deploy fetch-model` for this out dir",
            )


@dataclass(frozen=True)
class TaskSpec:
    """A one-off container that runs a command to completion (no network, no ports, no restarts)."""

    name: str
    image: str
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    environment: dict[str, str]
    mounts: tuple[Mount, ...]
    user: str | None
    gpu_device_ids: tuple[str, ...] | None  # None: no GPU request; (): all GPUs
    shm_size: str | None
    ulimits: tuple[tuple[str, int, int], ...]
    labels: dict[str, str]


@dataclass(frozen=True)
class TaskResult:
    """How a one-off container ended: its exit code (None when it was killed at the timeout) and its log tail."""

    exit_code: int | None
    log_tail: str


def run_task(
    client: Any, spec: TaskSpec, out_dir: Path, on_line: Callable[[str], None], timeout_s: float
) -> TaskResult:
    """Run spec to completion, streaming its output lines to on_line; the container is removed afterwards."""
    import threading

    from docker.errors import APIError

    existing = find_container(client, spec.name)
    if existing is not None:
        owner = existing.labels.get(LABEL_OUT_DIR)
        if owner != str(out_dir.resolve()):
            raise EnvironmentMissing(
                f"a container named {spec.name} already exists and is not this deployment's", "remove it"
            )
        remove(existing)  # a leftover of an interrupted run of ours
    _check_sources(spec.mounts)
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "detach": True,
        "entrypoint": list(spec.entrypoint),
        "command": list(spec.command),
        "environment": spec.environment,
        "mounts": _mounts(spec.mounts),
        "labels": {**spec.labels, LABEL_OUT_DIR: str(out_dir.resolve())},
        "network_mode": "none",
        "ulimits": [docker_ulimit(n, s, h) for n, s, h in spec.ulimits],
    }
    if spec.user:
        kwargs["user"] = spec.user
    if spec.shm_size:
        kwargs["shm_size"] = spec.shm_size
    if spec.gpu_device_ids is not None:
        kwargs["device_requests"] = _gpu_request(spec.gpu_device_ids)
    try:
        container = client.containers.create(spec.image, **kwargs)
    except APIError as exc:
        raise _start_error(exc) from None
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        stop(container)

    timer = threading.Timer(timeout_s, kill)
    try:
        try:
            container.start()
        except APIError as exc:
            raise _start_error(exc) from None
        timer.start()
        pending = ""
        for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
            pending += chunk.decode("utf-8", errors="replace")
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    on_line(line.rstrip())
        if pending.strip():
            on_line(pending.rstrip())
        code = int(container.wait().get("StatusCode", -1))
        return TaskResult(None if killed.is_set() else code, read_logs(container, tail=60))
    finally:
        timer.cancel()
        remove(container)


def docker_ulimit(name: str, soft: int, hard: int) -> Any:
    """A docker SDK Ulimit."""
    import docker

    return docker.types.Ulimit(name=name, soft=soft, hard=hard)


def image_id(client: Any, reference: str) -> str:
    """The id of a local image, or exit 4 saying to build it."""
    return str(_image(client, reference).id)


def status(container: Any) -> ContainerStatus:
    """Refresh and summarise a container's state."""
    container.reload()
    state = container.attrs.get("State", {})
    health = (state.get("Health") or {}).get("Status")
    return ContainerStatus(
        name=container.name,
        id=container.id,
        status=state.get("Status", container.status),
        exit_code=state.get("ExitCode") if state.get("Status") in ("exited", "dead", "restarting") else None,
        restart_count=int(container.attrs.get("RestartCount", 0)),
        oom_killed=bool(state.get("OOMKilled")),
        health=health,
        image_id=container.attrs.get("Image", ""),
    )


def read_logs(container: Any, tail: int | str = 200) -> str:
    """The container's recent output (stdout and stderr), decoded."""
    return container.logs(stdout=True, stderr=True, tail=tail).decode("utf-8", errors="replace")


def stream_logs(container: Any, *, tail: int | str = 100, follow: bool = False) -> Iterator[str]:
    """The container's output as text chunks, following new output when asked."""
    for chunk in container.logs(stdout=True, stderr=True, tail=tail, stream=True, follow=follow):
        yield chunk.decode("utf-8", errors="replace")


def stop(container: Any) -> None:
    """Stop without removing (its log stays readable); also ends a crash loop."""
    from docker.errors import APIError, NotFound

    try:
        container.stop(timeout=STOP_TIMEOUT_S)
    except (NotFound, APIError):
        pass


def remove(container: Any) -> None:
    """Stop and remove a container (gone already is fine)."""
    from docker.errors import NotFound

    try:
        container.remove(force=True)
    except NotFound:
        pass


def _start(container: Any) -> None:
    from docker.errors import APIError

    try:
        container.start()
    except APIError as exc:
        raise _start_error(exc) from None


def _image(client: Any, reference: str) -> Any:
    from docker.errors import ImageNotFound

    try:
        return client.images.get(reference)
    except ImageNotFound:
        raise EnvironmentMissing(f"image {reference} is not built", "run `deploy build` first") from None


def _start_error(exc: Exception) -> ToolkitError:
    """An engine refusal at create/start, explained like a container log (port taken, no GPU runtime, driver)."""
    text = _api_message(exc)
    found = diagnose(text)
    if found is not None:
        return found.error()
    return EnvironmentMissing(
        f"the engine refused to start the container: {text[:300]}", "fix the cause and run `deploy up` again"
    )


def _api_message(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or getattr(exc, "msg", None) or exc)

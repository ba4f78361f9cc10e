"""Docker engine adapter (docker SDK): connect, build with streamed progress, converge a container, logs, remove.

The rendered compose.yaml is the single description of the service; spec_from_compose() reads it (variables from
.env and the environment, relative paths against the compose folder) into a RunSpec that containers.run takes.
A RunSpec's sha256 labels the container, so `up` keeps an unchanged container and replaces a changed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .diagnose import diagnose
from .errors import BadInput, EnvironmentMissing, ToolkitError

LABEL_OUT_DIR = "io.glm-deploy.out-dir"
LABEL_CONFIG = "io.glm-deploy.config-sha256"
LABEL_DOCKERFILE = "io.glm-deploy.dockerfile-sha256"
STOP_TIMEOUT_S = 30
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")


@dataclass(frozen=True)
class Mount:
    """A bind mount from the host."""

    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class RunSpec:
    """Everything containers.run needs, as plain data (hashable into the container's config label)."""

    name: str
    image: str
    command: tuple[str, ...] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    ports: dict[str, tuple[str, int]] = field(default_factory=dict)  # "5000/tcp" -> (bind address, host port)
    mounts: tuple[Mount, ...] = ()
    gpu_device_ids: tuple[str, ...] | None = None  # None: no GPU request; () : all GPUs
    restart: str = "unless-stopped"
    shm_size: str | None = None
    ulimits: tuple[tuple[str, int, int], ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    healthcheck: dict[str, Any] | None = None
    working_dir: str | None = None
    user: str | None = None
    init: bool = False
    log_config: dict[str, Any] | None = None

    def config_sha256(self, image_id: str) -> str:
        """Hash of the spec, the exact image and mounted files' content (config.yml, keys): equal = already right."""
        data = asdict(self)
        data["image_id"] = image_id
        data["mounted_files"] = {m.source: hashlib.sha256(Path(m.source).read_bytes()).hexdigest()
                                 for m in self.mounts if Path(m.source).is_file()}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()

    @property
    def published(self) -> tuple[str, int] | None:
        """The first published (bind address, port)."""
        return next(iter(self.ports.values()), None)


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
        raise EnvironmentMissing(f"Docker engine not reachable at {where} ({type(exc).__name__})",
                                 "start dockerd (or fix DOCKER_HOST) and check `docker info` works") from None
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


def context_sha256(context_dir: Path, dockerfile: str = "Dockerfile", buildargs: dict[str, str] | None = None) -> str:
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
    return [p for p in path.parent.glob(path.name) if p.is_file()] if any(c in path.name for c in "*?[") else []


def build_image(client: Any, context_dir: Path, tag: str, *, dockerfile: str = "Dockerfile",
                content_sha256: str | None = None, labels: dict[str, str] | None = None,
                buildargs: dict[str, str] | None = None, on_line: Callable[[str], None] = lambda _: None,
                force: bool = False) -> BuiltImage:
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
        for chunk in client.api.build(path=str(context_dir), dockerfile=dockerfile, tag=tag, labels=all_labels,
                                      buildargs=buildargs, rm=True, forcerm=True, decode=True, pull=False):
            if "error" in chunk or "errorDetail" in chunk:
                message = chunk.get("error") or chunk["errorDetail"].get("message", "")
                raise EnvironmentMissing(f"image build failed: {message.strip()[:300]}",
                                         "read the build output above; fix the cause and run `deploy build`")
            text = chunk.get("stream") or chunk.get("status") or ""
            for line in text.splitlines():
                if line.strip():
                    tail = (tail + [line.rstrip()])[-20:]
                    on_line(line.rstrip())
            image_id = (chunk.get("aux") or {}).get("ID", image_id)
    except (APIError, BuildError) as exc:
        raise EnvironmentMissing(f"image build failed: {_api_message(exc)}",
                                 "fix the cause and run `deploy build`") from None
    if not image_id:
        image_id = client.images.get(tag).id
    return BuiltImage(image_id, tag, reused=False)


def spec_from_compose(compose_path: Path, *, name: str, gpu: bool = True, service: str | None = None,
                      extra_labels: dict[str, str] | None = None) -> RunSpec:
    """Read one service of a rendered compose file into a RunSpec (gpu=False drops GPU requests and ulimits)."""
    try:
        data = yaml.safe_load(compose_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"cannot read {compose_path}: {exc}", "run `deploy render` again") from None
    services = (data or {}).get("services") or {}
    if not services:
        raise BadInput(f"{compose_path} has no services", "run `deploy render` again")
    key = service or next(iter(services))
    svc = services[key]
    variables = _variables(compose_path.parent / ".env")
    svc = _interpolate(svc, variables)
    base = compose_path.parent
    labels = {**_mapping(svc.get("labels")), **(extra_labels or {})}
    environment = _mapping(svc.get("environment"))
    for env_file in _as_list(svc.get("env_file")):
        environment = {**_env_file(base / (env_file if isinstance(env_file, str) else env_file["path"])),
                       **environment}
    command = svc.get("command")
    return RunSpec(
        name=svc.get("container_name") or name,
        image=str(svc["image"]),
        command=tuple(command.split() if isinstance(command, str) else command) if command else None,
        environment={k: str(v) for k, v in environment.items()},
        ports=dict(_port(p) for p in _as_list(svc.get("ports"))),
        mounts=tuple(_mount(v, base) for v in _as_list(svc.get("volumes"))),
        gpu_device_ids=_gpu_ids(svc) if gpu else None,
        restart=str(svc.get("restart") or "no"),
        shm_size=str(svc["shm_size"]) if svc.get("shm_size") else None,
        # memlock/nofile serve pinned GPU memory and many weight shards; CPU-only test engines often may not
        # raise them (a daemon without CAP_SYS_RESOURCE fails with "error setting rlimit"), so they are GPU-only.
        ulimits=tuple(_ulimit(k, v) for k, v in (svc.get("ulimits") or {}).items()) if gpu else (),
        labels=labels,
        healthcheck=_healthcheck(svc.get("healthcheck")),
        working_dir=svc.get("working_dir"),
        user=str(svc["user"]) if svc.get("user") else None,
        init=bool(svc.get("init")),
        log_config=_log_config(svc.get("logging")),
    )


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
            raise EnvironmentMissing(f"a container named {spec.name} already exists and is not this deployment's"
                                     f" (out dir {owner or 'unknown'})", "remove it or use another out dir")
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
    import docker
    from docker.errors import APIError

    restart_name, _, retries = spec.restart.partition(":")
    kwargs: dict[str, Any] = {
        "name": spec.name, "detach": True, "environment": spec.environment, "ports": spec.ports,
        "mounts": [docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in spec.mounts],
        "labels": {**spec.labels, LABEL_OUT_DIR: str(out_dir.resolve()), LABEL_CONFIG: config_sha256},
        "ulimits": [docker.types.Ulimit(name=n, soft=s, hard=h) for n, s, h in spec.ulimits],
    }
    if restart_name and restart_name != "no":
        kwargs["restart_policy"] = {"Name": restart_name, **({"MaximumRetryCount": int(retries)} if retries else {})}
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
        ids = list(spec.gpu_device_ids)
        kwargs["device_requests"] = [docker.types.DeviceRequest(
            driver="nvidia", device_ids=ids or None, count=None if ids else -1, capabilities=[["gpu"]])]
    for mount in spec.mounts:
        if not Path(mount.source).exists():
            raise EnvironmentMissing(f"mount source {mount.source} does not exist",
                                     "run `deploy render` and `deploy fetch-model` for this out dir")
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


def status(container: Any) -> ContainerStatus:
    """Refresh and summarise a container's state."""
    container.reload()
    state = container.attrs.get("State", {})
    health = (state.get("Health") or {}).get("Status")
    return ContainerStatus(
        name=container.name, id=container.id, status=state.get("Status", container.status),
        exit_code=state.get("ExitCode") if state.get("Status") in ("exited", "dead", "restarting") else None,
        restart_count=int(container.attrs.get("RestartCount", 0)), oom_killed=bool(state.get("OOMKilled")),
        health=health, image_id=container.attrs.get("Image", ""))


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
    return EnvironmentMissing(f"the engine refused to start the container: {text[:300]}",
                              "fix the cause and run `deploy up` again")


def _api_message(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or getattr(exc, "msg", None) or exc)


VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|"
                      r"(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def _variables(env_path: Path) -> dict[str, str]:
    """Compose's variables: the .env beside the compose file, overridden by the process environment."""
    values = _env_file(env_path) if env_path.is_file() else {}
    return {**values, **os.environ}


def _env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}", "run `deploy render` again") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    """${VAR}, ${VAR:-default}, $VAR and $$ as compose substitutes them."""
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group("braced") or match.group("plain")
            found = variables.get(name)
            op = match.group("op") or ""
            missing = found is None or (found == "" and op.startswith(":"))
            if missing and op.endswith("-"):
                return match.group("arg")
            if missing and op.endswith("?"):
                raise BadInput(f"compose variable {name} is not set: {match.group('arg')}",
                               "run `deploy render` again (it writes .env)")
            return found or ""
        return VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, variables) for k, v in value.items()}
    return value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _mapping(value: Any) -> dict[str, str]:
    """Compose's dict-or-list ("K=V") form of labels and environment."""
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    result = {}
    for item in _as_list(value):
        key, _, val = str(item).partition("=")
        result[key] = val
    return result


def _port(value: Any) -> tuple[str, tuple[str, int]]:
    """"127.0.0.1:5000:5000[/tcp]" or the long form -> ("5000/tcp", ("127.0.0.1", 5000)); bind defaults to 127.0.0.1."""
    if isinstance(value, dict):
        target, published = int(value["target"]), int(value.get("published") or value["target"])
        return f"{target}/{value.get('protocol', 'tcp')}", (value.get("host_ip") or "127.0.0.1", published)
    text, _, protocol = str(value).partition("/")
    parts = text.rsplit(":", 2)
    if len(parts) == 3:
        host, published, target = parts
    elif len(parts) == 2:
        host, (published, target) = "127.0.0.1", parts
    else:
        host, published, target = "127.0.0.1", parts[0], parts[0]
    return f"{int(target)}/{protocol or 'tcp'}", (host.strip("[]") or "127.0.0.1", int(published))


def _mount(value: Any, base: Path) -> Mount:
    """"./config.yml:/app/config.yml:ro" or the long bind form -> an absolute-path Mount."""
    if isinstance(value, dict):
        source, target, read_only = value["source"], value["target"], bool(value.get("read_only"))
    else:
        parts = str(value).split(":")
        source, target = parts[0], parts[1]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
    path = Path(os.path.expanduser(source))
    return Mount(str(path if path.is_absolute() else (base / path).resolve()), target, read_only)


def _gpu_ids(svc: dict[str, Any]) -> tuple[str, ...] | None:
    """GPU device ids from deploy.resources.reservations.devices (or `gpus: all`); () means all; None: no GPU."""
    devices = ((((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")) or []
    for device in devices:
        if device.get("driver", "nvidia") == "nvidia" or "gpu" in str(device.get("capabilities")):
            return tuple(str(d) for d in device.get("device_ids") or ())
    if svc.get("gpus"):
        return ()
    return None


def _log_config(value: Any) -> dict[str, Any] | None:
    """Compose logging -> the engine's LogConfig form."""
    if not value:
        return None
    return {"Type": value.get("driver", "json-file"), "Config": {k: str(v) for k, v in (value.get("options") or {}).items()}}


def _ulimit(name: str, value: Any) -> tuple[str, int, int]:
    if isinstance(value, dict):
        return name, int(value["soft"]), int(value["hard"])
    return name, int(value), int(value)


def _healthcheck(value: Any) -> dict[str, Any] | None:
    """Compose healthcheck -> the engine's form (durations in nanoseconds)."""
    if not value or value.get("disable"):
        return None
    result: dict[str, Any] = {"test": value["test"]}
    for key in ("interval", "timeout", "start_period"):
        if value.get(key):
            result[key] = _duration_ns(str(value[key]))
    if value.get("retries"):
        result["retries"] = int(value["retries"])
    return result


def _duration_ns(text: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(number) * units[unit]
    return int(total * 1e9)

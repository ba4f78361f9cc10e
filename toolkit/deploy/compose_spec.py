"""Compose -> RunSpec: the rendered compose.yaml read as `docker compose` would, into what the engine adapter runs.

The rendered compose.yaml is the single description of the service; spec_from_compose() reads it (variables from
.env and the environment, relative paths against the compose folder) into a RunSpec that containers.run takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import inputs
from ..errors import BadInput


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
        data["mounted_files"] = {
            m.source: _file_sha256(Path(m.source)) for m in self.mounts if Path(m.source).is_file()
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()

    @property
    def published(self) -> tuple[str, int] | None:
        """The first published (bind address, port)."""
        return next(iter(self.ports.values()), None)


def spec_from_compose(
    compose_path: Path,
    *,
    name: str,
    gpu: bool = True,
    service: str | None = None,
    extra_labels: dict[str, str] | None = None,
) -> RunSpec:
    """Read one service of a rendered compose file into a RunSpec (gpu=False drops GPU requests and ulimits)."""
    hint = "run `deploy render` again"
    data = inputs.parse_yaml(
        inputs.read_text(compose_path, "compose file", hint=hint), "compose file", compose_path
    )
    services = (data if isinstance(data, dict) else {}).get("services") or {}
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
        environment = {
            **_env_file(base / (env_file if isinstance(env_file, str) else env_file["path"])),
            **environment,
        }
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


def _file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (a mounted file may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|"
    r"(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def _variables(env_path: Path) -> dict[str, str]:
    """Compose's variables: the .env beside the compose file, overridden by the process environment."""
    values = _env_file(env_path) if env_path.is_file() else {}
    return {**values, **os.environ}


def _env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    lines = inputs.read_text(path, "env file", hint="run `deploy render` again").splitlines()
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
                raise BadInput(
                    f"compose variable {name} is not set: {match.group('arg')}",
                    "run `deploy render` again (it writes .env)",
                )
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
    """ "127.0.0.1:5000:5000[/tcp]" or the long form -> ("5000/tcp", ("127.0.0.1", 5000)); bind defaults to 127.0.0.1."""
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
    """ "./config.yml:/app/config.yml:ro" or the long bind form -> an absolute-path Mount."""
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
    devices = (
        (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    ) or []
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
    return {
        "Type": value.get("driver", "json-file"),
        "Config": {k: str(v) for k, v in (value.get("options") or {}).items()},
    }


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

"""The deployment state file: one deployment per out dir, so re-running `up`/`auto` converges instead of duplicating."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .. import inputs
from ..atomic import write_text
from ..errors import BadInput
from ..facts.layout import STATE


@dataclass(frozen=True)
class DeploymentState:
    """What `up` started for an out dir (no secrets: the API key stays in api_tokens.yml)."""

    out_dir: str
    container_name: str
    container_id: str
    image: str
    image_id: str
    config_sha256: str
    bind: str
    port: int
    model_id: str
    gpu: bool
    plan_sha256: str = ""

    @property
    def url(self) -> str:
        """The endpoint as a client on this host reaches it."""
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        return f"http://{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def default_container_name(out_dir: Path) -> str:
    """A name unique to the out dir's absolute path, so two out dirs never share a container."""
    return "glm-deploy-" + hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:10]


def load_state(out_dir: Path) -> DeploymentState | None:
    """The recorded deployment, checked (check_state), or None when nothing was started."""
    return check_state(out_dir)


def check_state(out_dir: Path) -> DeploymentState | None:
    """The state file when it names this out folder and the container `up` gives it, else BadInput (exit 2).

    The container name decides which container `down` removes and `logs` reads: a state file naming any other
    one was not written by `up` for this folder.
    """
    path = out_dir / STATE
    if not os.path.lexists(path):
        return None
    hint = f"remove {path} (`deploy up` writes it again)"
    data = inputs.parse_json(
        inputs.read_text(path, "the state file", hint=hint), "the state file", path, hint
    )
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a deployment state", hint)
    types = {f.name: f.type for f in fields(DeploymentState)}
    for name, kind in types.items():
        expected = {"str": str, "int": int, "bool": bool}[str(kind)]
        value = data.get(name, "" if name == "plan_sha256" else None)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise BadInput(f"{path}: {name} must be {expected.__name__}, got {value!r:.60}", hint)
    record = DeploymentState(**{name: data.get(name, "") for name in types})
    if record.out_dir != str(out_dir) or record.container_name != default_container_name(out_dir):
        raise BadInput(f"{path} names another deployment (out_dir or container_name)", hint)
    if not 1 <= record.port <= 65535:
        raise BadInput(f"{path}: port {record.port} is not a TCP port", hint)
    return record


def save_state(out_dir: Path, state: DeploymentState) -> None:
    """Write the state atomically, readable by the owner only (it names paths and ports of the deployment)."""
    write_text(out_dir / STATE, json.dumps(state.to_dict(), indent=2) + "\n", mode=0o600)


def clear_state(out_dir: Path) -> None:
    """Forget the deployment (after `down`)."""
    (out_dir / STATE).unlink(missing_ok=True)

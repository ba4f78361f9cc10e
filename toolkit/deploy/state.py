"""The deployment state file: one deployment per out dir, so re-running `up`/`auto` converges instead of duplicating."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..atomic import write_text
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
    """The recorded deployment, or None when nothing was started (or the file is unreadable)."""
    try:
        data = json.loads((out_dir / STATE).read_text(encoding="utf-8"))
        return DeploymentState(**{f.name: data[f.name] for f in fields(DeploymentState) if f.name in data})
    except (OSError, ValueError, TypeError):
        return None


def save_state(out_dir: Path, state: DeploymentState) -> None:
    """Write the state atomically, readable by the owner only (it names paths and ports of the deployment)."""
    write_text(out_dir / STATE, json.dumps(state.to_dict(), indent=2) + "\n", mode=0o600)


def clear_state(out_dir: Path) -> None:
    """Forget the deployment (after `down`)."""
    (out_dir / STATE).unlink(missing_ok=True)

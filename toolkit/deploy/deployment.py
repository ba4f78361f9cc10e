"""A rendered out dir as the deploy steps see it: its manifest (render.json), plan, paths and endpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..facts import layout
from ..plan.plan import Plan


@dataclass(frozen=True)
class Deployment:
    """A rendered out dir: its manifest (render.json), plan and file paths."""

    out_dir: Path
    manifest: dict[str, Any]
    plan: Plan

    @property
    def compose(self) -> Path:
        return self.out_dir / layout.COMPOSE

    @property
    def api_tokens(self) -> Path:
        return self.out_dir / str(self.manifest.get("api_tokens", layout.API_TOKENS))

    @property
    def models_dir(self) -> Path:
        return Path(self.manifest["models_dir"])

    @property
    def model_folder(self) -> str:
        return str(self.manifest["model_folder"])

    @property
    def model_dir(self) -> Path:
        return self.models_dir / self.model_folder

    @property
    def url(self) -> str:
        bind = str(self.manifest.get("bind", "127.0.0.1"))
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        return f"http://{'[' + host + ']' if ':' in host else host}:{int(self.manifest['port'])}"


def load_deployment(out_dir: Path) -> Deployment:
    """Read what `deploy render` wrote; a missing or foreign out dir is bad input with the fix."""
    out_dir = Path(os.path.abspath(out_dir))
    try:
        manifest = json.loads((out_dir / layout.MANIFEST).read_text(encoding="utf-8"))
        plan = Plan.from_dict(json.loads((out_dir / layout.PLAN).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise BadInput(
            f"{out_dir} holds no rendered deployment",
            "run `deploy render --out DIR` (or `deploy auto --out DIR`) first",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(
            f"{out_dir} holds an unreadable rendering ({type(exc).__name__})",
            "run `deploy render --force` again",
        ) from None
    return Deployment(out_dir=out_dir, manifest=manifest, plan=plan)


def endpoint_summary(dep: Deployment) -> str:
    """Where the endpoint is, where the key is, and one curl line that reads the key from its file."""
    import shlex

    body = json.dumps(
        {"model": dep.model_folder, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}
    )
    key = f"$(sed -n 's/^api_key: *//p' {shlex.quote(str(dep.api_tokens))})"
    return (
        f"endpoint: {dep.url}/v1 (model {dep.model_folder})\n"
        f"API key: in {dep.api_tokens} (api_key; mode 0600, never printed)\n"
        f'try: curl -s {dep.url}/v1/chat/completions -H "X-API-Key: {key}" '
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )

"""A rendered out dir as the deploy steps see it: its manifest (render.json), plan, paths and endpoint.

Everything read from the folder is checked before any step uses it, because every later file operation is
driven by it (`down --purge` deletes what render.json names): the plan for meaning (plan.check), the manifest's
names and paths (the model folder is the plan's quant, one path segment under an absolute models folder; the key
file is api_tokens.yml in the out folder itself; a mix is the plan's), and the state file's container name and out
folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import inputs, validate
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
        return self.out_dir / layout.API_TOKENS

    @property
    def key_header(self) -> Path:
        return self.out_dir / layout.API_KEY_HEADER

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


def load_deployment(out_dir: Path | str) -> Deployment:
    """Read what `deploy render` wrote, checked; a missing, foreign or edited out dir is bad input with the fix."""
    from ..plan.check import plan_from_data
    from . import state

    if not str(out_dir):
        raise BadInput(
            "--out '' is not a folder name", "give --out the rendered folder, e.g. --out deploy-out"
        )
    out_dir = Path(os.path.abspath(out_dir))
    hint = "run `deploy render --force` again"
    if not (out_dir / layout.MANIFEST).exists():
        raise BadInput(
            f"{out_dir} holds no rendered deployment",
            "run `deploy render --out DIR` (or `deploy auto --out DIR`) first",
        )
    manifest = _read_json(out_dir / layout.MANIFEST, hint)
    plan = plan_from_data(_read_json(out_dir / layout.PLAN, hint), str(out_dir / layout.PLAN))
    _check_manifest(out_dir, manifest, plan, hint)
    state.check_state(out_dir)
    return Deployment(out_dir=out_dir, manifest=manifest, plan=plan)


def _read_json(path: Path, hint: str) -> Any:
    return inputs.parse_json(
        inputs.read_text(path, "the rendered file", hint=hint), "the rendered file", path, hint
    )


def _check_manifest(out_dir: Path, manifest: Any, plan: Plan, hint: str) -> None:
    """render.json must name what the plan and the renderer would: nothing outside the deployment."""

    def fail(problem: str) -> BadInput:
        return BadInput(f"{out_dir / layout.MANIFEST}: {problem}", hint)

    if not isinstance(manifest, dict):
        raise fail("is not an object")
    for key, kind in (
        ("models_dir", str),
        ("model_folder", str),
        ("bind", str),
        ("port", int),
        ("image", str),
        ("dockerfile_sha256", str),
        ("cuda", str),
    ):
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise fail(f"{key} must be {kind.__name__}, got {value!r:.60}")
    if manifest["model_folder"] != plan.quant:
        raise fail(f"model_folder {manifest['model_folder']!r:.60} is not the plan's quant {plan.quant!r}")
    planned_mix = None if plan.mix is None else json.loads(json.dumps(plan.mix.to_dict()))
    if manifest.get("mix") != planned_mix:
        raise fail("mix is not the plan's mix")
    if manifest.get("api_tokens", layout.API_TOKENS) != layout.API_TOKENS:
        raise fail(f"api_tokens {manifest.get('api_tokens')!r:.60} is not {layout.API_TOKENS}")
    try:
        if validate.host_path(manifest["models_dir"], "models_dir") != manifest["models_dir"]:
            raise fail(f"models_dir {manifest['models_dir']!r:.60} is not a normalized absolute path")
        validate.bind_address(manifest["bind"])
        validate.port(manifest["port"], "port")
        validate.image_ref(manifest["image"], "image")
    except BadInput as error:
        raise fail(error.message) from None


def curl_command(dep: Deployment) -> str:
    """One chat request as a curl command line that never holds the key: curl reads the X-API-Key header from
    the 0600 header file (`-H @file`, curl >= 7.55)."""
    import shlex

    body = json.dumps(
        {"model": dep.model_folder, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}
    )
    return (
        f"curl -s {dep.url}/v1/chat/completions -H @{shlex.quote(str(dep.key_header))} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def ensure_key_header(dep: Deployment) -> Path:
    """The header file curl_command() reads, (re)written from api_tokens.yml when missing or stale."""
    from ..render.bundle import write_key_header

    text = inputs.read_text(
        dep.api_tokens, "the key file", inputs.KEY_FILE_BYTES, "run `deploy render` again"
    )
    return write_key_header(dep.out_dir, text)


def endpoint_summary(dep: Deployment) -> str:
    """Where the endpoint is, where the key is, and one curl line that reads the key from its file."""
    ensure_key_header(dep)
    return (
        f"endpoint: {dep.url}/v1 (model {dep.model_folder})\n"
        f"API key: in {dep.api_tokens} (api_key; mode 0600, never printed)\n"
        f"try: {curl_command(dep)}"
    )

"""compose.yaml and .env for one TabbyAPI deployment: compose/tabbyapi.yaml's defaults merged with the plan's
decisions, dumped as safe YAML (never templated text)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml

from .. import validate
from ..errors import BadInput
from ..facts import layout
from ..facts.paths import COMPOSE_DIR
from ..facts.runtime import (
    CONTAINER_API_TOKENS,
    CONTAINER_CONFIG,
    CONTAINER_HEALTHCHECK,
    CONTAINER_MODELS_DIR,
    CONTAINER_PORT,
    DEFAULT_HOST_PORT,
)

SERVICE = "tabbyapi"
SERVICE_BASE = "tabbyapi.yaml"  # in compose/


@dataclass(frozen=True)
class ComposeInputs:
    """Validated values for compose.yaml and .env."""

    image: str
    model_folder: str
    device_ids: tuple[str, ...]
    gpu_reservation: bool
    start_period_s: int
    bind: str
    port: int
    models_dir: str
    uid: int
    gid: int


@lru_cache(maxsize=8)
def _read_base(name: str) -> str:
    return (COMPOSE_DIR / name).read_text(encoding="utf-8")


def compose_base(name: str) -> dict[str, Any]:
    """A base file of compose/ as data (a fresh copy each time: callers merge into it)."""
    try:
        data = yaml.safe_load(_read_base(name))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(
            f"compose base file {COMPOSE_DIR / name} is unreadable ({type(exc).__name__})",
            "restore it from the glm-deploy sources",
        ) from None
    if not isinstance(data, dict):
        raise BadInput(f"compose base file {COMPOSE_DIR / name} is not a mapping", "restore it")
    return data


def merge(base: dict[str, Any], decided: dict[str, Any], where: str = "") -> dict[str, Any]:
    """base with decided merged in, in base's key order (new keys last); a null left in base is an error."""
    merged: dict[str, Any] = {}
    for key, value in base.items():
        if key in decided:
            chosen = decided[key]
            both_maps = isinstance(value, dict) and isinstance(chosen, dict)
            merged[key] = merge(value, chosen, f"{where}{key}.") if both_maps else chosen
        elif value is None:
            raise BadInput(
                f"compose base key {where}{key} is left for the renderer, which did not decide it",
                "a glm-deploy bug: report it",
            )
        elif isinstance(value, dict):
            merged[key] = merge(value, {}, f"{where}{key}.")
        else:
            merged[key] = value
    merged.update((key, value) for key, value in decided.items() if key not in base)
    return merged


def health_test() -> list[str]:
    """The health check's command: healthy means "can serve" -- /health 200, or a one-token completion when
    TabbyAPI's /health is stuck at 503 after a failed generation (dockerfiles/healthcheck.py, in the image). The
    image's HEALTHCHECK, compose.yaml and the Swarm services run the same command."""
    return [
        "CMD",
        "python3",
        CONTAINER_HEALTHCHECK,
        f"http://127.0.0.1:{CONTAINER_PORT}",
        CONTAINER_API_TOKENS,
    ]


def health_timeout() -> str:
    """The health check's timeout, compose/tabbyapi.yaml's (the image's HEALTHCHECK uses it too)."""
    return str(compose_base(SERVICE_BASE)["healthcheck"]["timeout"])


def compose_dict(inputs: ComposeInputs) -> dict[str, Any]:
    """The compose model; ${GLM_*} values come from .env, with safe defaults when .env is missing."""
    service = merge(
        compose_base(SERVICE_BASE),
        {
            "image": validate.image_ref(inputs.image, "image"),
            "build": {"context": ".", "dockerfile": layout.DOCKERFILE},
            "user": "${GLM_UID:-10001}:${GLM_GID:-10001}",
            "ports": [
                {
                    "target": CONTAINER_PORT,
                    "published": f"${{GLM_PORT:-{DEFAULT_HOST_PORT}}}",
                    "host_ip": "${GLM_BIND:-127.0.0.1}",
                    "protocol": "tcp",
                }
            ],
            "volumes": [
                {
                    "type": "bind",
                    "source": f"${{GLM_MODELS_DIR:?set GLM_MODELS_DIR in .env}}/{inputs.model_folder}",
                    "target": f"{CONTAINER_MODELS_DIR}/{inputs.model_folder}",
                    "read_only": True,
                },
                {
                    "type": "bind",
                    "source": f"./{layout.CONFIG}",
                    "target": CONTAINER_CONFIG,
                    "read_only": True,
                },
                {
                    "type": "bind",
                    "source": f"./{layout.API_TOKENS}",
                    "target": CONTAINER_API_TOKENS,
                    "read_only": True,
                },
            ],
            "healthcheck": {"test": health_test(), "start_period": f"{inputs.start_period_s}s"},
        },
    )
    if inputs.gpu_reservation:
        service["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [
                        {
                            "driver": "nvidia",
                            "device_ids": [validate.device_id(d) for d in inputs.device_ids],
                            "capabilities": ["gpu"],
                        }
                    ]
                }
            }
        }
    return {"services": {SERVICE: service}}


def compose_yaml(inputs: ComposeInputs, plan_digest: str) -> str:
    """compose.yaml text."""
    header = (
        "# Rendered by glm-deploy (`deploy render`) for plan " + plan_digest + ". Do not edit: re-render.\n"
        "# What you may change (port, bind address, models directory) lives in .env.\n"
    )
    if not inputs.gpu_reservation:
        header += "# No GPU reservation: rendered with --no-gpu-reservation, for CPU-only test engines.\n"
    return header + yaml.safe_dump(compose_dict(inputs), sort_keys=False, default_flow_style=False)


def env_text(inputs: ComposeInputs) -> str:
    """.env: the values compose.yaml reads, single-quoted (dotenv takes single-quoted text literally)."""
    values = {
        "GLM_BIND": validate.bind_address(inputs.bind),
        "GLM_PORT": str(validate.port(inputs.port)),
        "GLM_MODELS_DIR": validate.host_path(inputs.models_dir),
        "GLM_UID": str(inputs.uid),
        "GLM_GID": str(inputs.gid),
    }
    lines = [
        "# glm-deploy: settings you may change without re-rendering (read by compose.yaml).",
        "# GLM_BIND: host address the API is published on (127.0.0.1 = this machine only).",
        "# GLM_MODELS_DIR: host folder holding the model folder; GLM_UID/GLM_GID: owner of api_tokens.yml.",
    ]
    lines += [f"{key}='{value}'" for key, value in values.items()]
    return "\n".join(lines) + "\n"

"""compose.yaml and .env for one TabbyAPI deployment, built as data and dumped as safe YAML, not templated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .. import validate
from ..facts import layout
from ..facts.runtime import (
    CONTAINER_API_TOKENS,
    CONTAINER_CONFIG,
    CONTAINER_MODELS_DIR,
    CONTAINER_PORT,
    DEFAULT_HOST_PORT,
)

SERVICE = "tabbyapi"
# TabbyAPI's own compose (docker/docker-compose.yml at the pin): 8 GiB of /dev/shm, unlimited locked memory,
# many open files (safetensors shards, sockets).
SHM_SIZE = "8gb"
NOFILE = 1048576
LOG_MAX_SIZE = "50m"
LOG_MAX_FILE = "5"


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


def compose_dict(inputs: ComposeInputs) -> dict[str, Any]:
    """The compose model; ${GLM_*} values come from .env, with safe defaults when .env is missing."""
    service: dict[str, Any] = {
        "image": validate.image_ref(inputs.image, "image"),
        "build": {"context": ".", "dockerfile": layout.DOCKERFILE},
        "init": True,
        "restart": "unless-stopped",
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
            {"type": "bind", "source": f"./{layout.CONFIG}", "target": CONTAINER_CONFIG, "read_only": True},
            {
                "type": "bind",
                "source": f"./{layout.API_TOKENS}",
                "target": CONTAINER_API_TOKENS,
                "read_only": True,
            },
        ],
        "shm_size": SHM_SIZE,
        "ulimits": {"memlock": -1, "nofile": {"soft": NOFILE, "hard": NOFILE}},
        "healthcheck": {
            "test": ["CMD", "curl", "-fsS", f"http://127.0.0.1:{CONTAINER_PORT}/health"],
            "interval": "30s",
            "timeout": "10s",
            "retries": 3,
            "start_period": f"{inputs.start_period_s}s",
        },
        "logging": {"driver": "json-file", "options": {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILE}},
    }
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

"""FleetPlan -> a `docker stack deploy` file, a gateway config, per-class image contexts and per-host compose files.

The stack (built as data, dumped as safe YAML):
- one TabbyAPI service per node class, placed by the node label glm-deploy.class, claiming its GPUs as Swarm
  generic resources (kind NVIDIA-GPU; Swarm rejects compose `devices` reservations), with config.yml as a Swarm
  config at /app/config.yml and the shared api_tokens.yml as a Swarm secret at /app/api_tokens.yml;
- healthchecks whose start_period comes from the renderer's formula (model size), and updates that start the new
  task first and stop the old one only when the new one is healthy (parallelism 1, start-first, rollback on
  failure): the last healthy replica is never taken down. An update therefore needs one replica's GPUs free in
  the class; until they are, the new task waits (pending) and the old one keeps serving;
- one endpoint: an HAProxy gateway that balances over every class's healthy tasks (Docker's DNS
  `tasks.<service>`), checks each replica's port (TCP: /health cannot tell one failed request from a replica that
  cannot serve; the Swarm healthcheck, the image's probe, can) and retries connection failures on another replica. One gateway is
  needed because two services cannot publish the same port. It runs on every node (global) and publishes the
  endpoint port there in host mode (works without IPVS), or through the routing mesh (`endpoint.mode: ingress`).
  Running on every node also works around moby/moby#44378: a task that claims generic resources and joins an
  overlay network is rejected ("node is missing network attachments") on a node where no other task has
  attached that network yet;
- every replica's API port also published in host mode on a port Swarm picks, so `deploy cluster verify` can
  check each replica on its own (the port answers only with the API key).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .. import __version__, validate
from ..atomic import write_text
from ..errors import BadInput
from ..facts import layout
from ..facts.layout import API_TOKENS
from ..facts.paths import COMPOSE_DIR
from ..facts.runtime import CONTAINER_API_TOKENS, CONTAINER_CONFIG, CONTAINER_MODELS_DIR, CONTAINER_PORT
from ..render.bundle import (
    BUILD_CONTEXT,
    IMAGE_USER_ID,
    RenderOptions,
    load_or_make_api_tokens,
    render_files,
)
from ..render.compose import SERVICE_BASE, compose_base, health_test, merge
from .fleet_plan import CLASS_LABEL, FleetPlan, NodeClass

GPU_KIND = "NVIDIA-GPU"
GATEWAY_SERVICE = "gateway"
GATEWAY_CONFIG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"
SECRET_MODE = 0o600
STACK_BASE = "stack.yaml"  # in compose/
GATEWAY_CONFIG_BASE = "haproxy.cfg"  # in compose/
CLASS_FILES = (*BUILD_CONTEXT, layout.DOCKERIGNORE, layout.CONFIG, layout.PLAN)


@dataclass(frozen=True)
class StackOptions:
    """Choices besides the fleet: images, health-check cadence, update monitoring, endpoint publish mode."""

    image: str | None = None  # one image for every class (default: fleet.yaml image, else per class)
    gateway_image: str | None = None  # default: fleet.yaml gateway_image
    health_interval_s: int | None = None  # None: compose/stack.yaml's (15 s)
    health_retries: int | None = None  # None: compose/stack.yaml's (3)
    monitor_s: int | None = (
        None  # Swarm watches each updated task this long (None: compose/stack.yaml's, 60 s)
    )
    endpoint_mode: str | None = None  # default: fleet.yaml endpoint.mode (host | ingress)
    ulimits: bool = True  # False only where the engine may not raise limits (no CAP_SYS_RESOURCE)
    force: bool = False


def _hash(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _class_files(
    node_class: NodeClass, fleet_plan: FleetPlan, out_dir: Path, api_tokens: str
) -> dict[str, Any]:
    """The renderer's files for a class (Dockerfile, config.yml, ...) and its manifest."""
    options = RenderOptions(
        models_dir=fleet_plan.fleet.models_dir,
        port=fleet_plan.fleet.port,
        bind=fleet_plan.fleet.bind,
        run_as=(IMAGE_USER_ID, IMAGE_USER_ID),
    )
    files = render_files(node_class.plan, out_dir / "classes" / node_class.name, options, api_tokens)
    return {"files": files, "manifest": json.loads(files[layout.MANIFEST][0])}


def gateway_config(fleet_plan: FleetPlan) -> str:
    """haproxy.cfg: compose/haproxy.cfg (one backend, Docker's embedded DNS), then a server-template per class."""
    stack = fleet_plan.fleet.name
    base = Template((COMPOSE_DIR / GATEWAY_CONFIG_BASE).read_text(encoding="utf-8"))
    lines = [base.substitute(container_port=CONTAINER_PORT).rstrip("\n")]
    for index, node_class in enumerate(fleet_plan.classes):
        slots = max(4, 2 * node_class.replicas + 2)  # room for start-first updates
        lines.append(
            f"    server-template c{index}- {slots} tasks.{stack}_{node_class.service}:{CONTAINER_PORT}"
        )
    return "\n".join(lines) + "\n"


def _tabby_service(
    node_class: NodeClass,
    image: str,
    config_key: str,
    start_period_s: int,
    folder: str,
    models_dir: str,
    options: StackOptions,
) -> dict[str, Any]:
    """One class's TabbyAPI service: compose/stack.yaml's defaults with this class's decisions."""
    single_host = compose_base(SERVICE_BASE)  # what a Swarm replica shares with a single-host deployment
    healthcheck: dict[str, Any] = {
        "test": health_test(),
        "timeout": single_host["healthcheck"]["timeout"],
        "start_period": f"{start_period_s}s",
    }
    if options.health_interval_s is not None:
        healthcheck["interval"] = f"{options.health_interval_s}s"
    if options.health_retries is not None:
        healthcheck["retries"] = options.health_retries
    deploy: dict[str, Any] = {
        "replicas": node_class.replicas,
        "placement": {"constraints": [f"node.labels.{CLASS_LABEL} == {node_class.name}"]},
        "resources": {
            "reservations": {
                "generic_resources": [
                    {"discrete_resource_spec": {"kind": GPU_KIND, "value": len(node_class.plan.per_gpu)}}
                ]
            }
        },
        "labels": {
            "io.glm-deploy.class": node_class.name,
            "io.glm-deploy.plan": node_class.plan.digest(),
        },
    }
    if options.monitor_s is not None:
        deploy["update_config"] = {"monitor": f"{options.monitor_s}s"}
        deploy["rollback_config"] = {"monitor": f"{options.monitor_s}s"}
    service = merge(
        compose_base(STACK_BASE)["tabbyapi"],
        {
            "image": validate.image_ref(image, "image"),
            "configs": [
                {
                    "source": config_key,
                    "target": CONTAINER_CONFIG,
                    "uid": str(IMAGE_USER_ID),
                    "gid": str(IMAGE_USER_ID),
                    "mode": 0o444,
                }
            ],
            "secrets": [
                {
                    "source": "api_tokens",
                    "target": CONTAINER_API_TOKENS,
                    "uid": str(IMAGE_USER_ID),
                    "gid": str(IMAGE_USER_ID),
                    "mode": 0o400,
                }
            ],
            "volumes": [
                {
                    "type": "bind",
                    "source": f"{models_dir}/{folder}",
                    "target": f"{CONTAINER_MODELS_DIR}/{folder}",
                    "read_only": True,
                },
                # Swarm has no shm_size; a tmpfs on /dev/shm of the same size does the same
                {
                    "type": "tmpfs",
                    "target": "/dev/shm",
                    "tmpfs": {"size": size_bytes(single_host["shm_size"])},
                },
            ],
            "ulimits": single_host["ulimits"],
            "ports": [{"target": CONTAINER_PORT, "protocol": "tcp", "mode": "host"}],
            "healthcheck": healthcheck,
            "logging": single_host["logging"],
            "deploy": deploy,
        },
    )
    if not options.ulimits:
        del service["ulimits"]
    return service


def _gateway_service(fleet_plan: FleetPlan, options: StackOptions, config_key: str) -> dict[str, Any]:
    """The endpoint: HAProxy on every node, on the node's port (host mode) or behind the routing mesh."""
    ingress = (options.endpoint_mode or fleet_plan.fleet.endpoint_mode) == "ingress"
    image = options.gateway_image or fleet_plan.fleet.gateway_image
    # Host-mode ports cannot be bound twice on a node, so a host-mode gateway is replaced stop-first.
    return merge(
        compose_base(STACK_BASE)["gateway"],
        {
            "image": validate.image_ref(image, "gateway image"),
            "command": ["haproxy", "-W", "-db", "-f", GATEWAY_CONFIG_PATH],
            "configs": [{"source": config_key, "target": GATEWAY_CONFIG_PATH, "mode": 0o444}],
            "ports": [
                {
                    "target": CONTAINER_PORT,
                    "published": fleet_plan.fleet.port,
                    "protocol": "tcp",
                    "mode": "ingress" if ingress else "host",
                }
            ],
            "deploy": {"update_config": {"order": "start-first" if ingress else "stop-first"}},
        },
    )


def size_bytes(text: str) -> int:
    """A compose size ("8gb", "512m", "1024") in bytes, with Docker's binary units."""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    if not match:
        raise BadInput(f"size {text!r} in a compose base file is not a Docker size", "e.g. 8gb")
    return int(match[1]) * 1024 ** " kmg".index(match[2] or " ")


def label_commands(fleet_plan: FleetPlan) -> list[str]:
    """`docker node update --label-add` for every node: its class, then its own labels (values are validated)."""
    commands = []
    for node_class in fleet_plan.classes:
        for node in node_class.nodes:
            labels = [f"{CLASS_LABEL}={node_class.name}"] + [f"{k}={v}" for k, v in node.labels]
            adds = " ".join(f"--label-add {label}" for label in labels)
            commands.append(f"docker node update {adds} {node.name}")
    return commands


def stack_files(
    fleet_plan: FleetPlan, out_dir: Path, options: StackOptions, api_tokens: str
) -> tuple[dict[str, tuple[str, int]], dict[str, Any]]:
    """Every file of the cluster bundle as {relative path: (text, mode)}, and the manifest (pure)."""
    if options.endpoint_mode not in (None, "host", "ingress"):
        raise BadInput(
            f"endpoint mode {options.endpoint_mode!r} is not host or ingress", "use host or ingress"
        )
    for value, what in (
        (options.health_interval_s, "health interval"),
        (options.monitor_s, "update monitor"),
        (options.health_retries, "health retries"),
    ):
        if value is not None:
            validate.positive_int(value, what, 3600)
    fleet = fleet_plan.fleet
    stack = fleet.name
    files: dict[str, tuple[str, int]] = {API_TOKENS: (api_tokens, SECRET_MODE)}
    services: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    classes_manifest = []
    for node_class in fleet_plan.classes:
        rendered = _class_files(node_class, fleet_plan, out_dir, api_tokens)
        manifest = rendered["manifest"]
        for name in CLASS_FILES:
            files[f"classes/{node_class.name}/{name}"] = rendered["files"][name]
        config_text = rendered["files"][layout.CONFIG][0]
        config_key = f"config_{node_class.name}"
        configs[config_key] = {
            "name": f"{stack}-{_hash(node_class.name + config_text)}",
            "file": f"./classes/{node_class.name}/{layout.CONFIG}",
        }
        image = options.image or fleet.image or manifest["image"]
        services[node_class.service] = _tabby_service(
            node_class,
            image,
            config_key,
            manifest["healthcheck_start_period_s"],
            manifest["model_folder"],
            fleet.models_dir,
            options,
        )
        classes_manifest.append(
            {
                "class": node_class.name,
                "service": f"{stack}_{node_class.service}",
                "image": image,
                "built_here": image == manifest["image"],
                "nodes": [n.name for n in node_class.nodes],
                "replicas": node_class.replicas,
                "gpus_per_replica": len(node_class.plan.per_gpu),
                "plan_digest": node_class.plan.digest(),
                "quant": node_class.plan.quant,
                "model_id": manifest["model_folder"],
                "context": node_class.plan.context,
                "cache_mode": node_class.plan.cache_mode,
                "healthcheck_start_period_s": manifest["healthcheck_start_period_s"],
            }
        )
    gateway_text = gateway_config(fleet_plan)
    files["gateway/haproxy.cfg"] = (gateway_text, 0o644)
    configs["gateway"] = {"name": f"{stack}-gw-{_hash(gateway_text)}", "file": "./gateway/haproxy.cfg"}
    services[GATEWAY_SERVICE] = _gateway_service(fleet_plan, options, "gateway")
    document = {
        "version": "3.9",
        "services": services,
        "configs": configs,
        # Swarm secrets cannot change: a new key gets a new name (a hash of the file, not the key itself).
        "secrets": {
            "api_tokens": {
                "name": f"{stack}-api-tokens-{_hash('glm-deploy:' + api_tokens)}",
                "file": f"./{API_TOKENS}",
            }
        },
    }
    header = (
        f"# Rendered by glm-deploy {__version__} (`deploy cluster render`) from {Path(fleet.source).name};"
        " do not edit: re-render.\n"
        f"# Deploy from this folder: docker stack deploy -c {layout.STACK} {stack}\n"
    )
    files[layout.STACK] = (
        header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False),
        0o644,
    )
    for node_class in fleet_plan.classes:
        for node in node_class.nodes:
            # The node's own GPUs (UUIDs when its detect JSON had them) in the class's plan.
            host_plan = dc_replace(node_class.plan, inventory=node.inventory)
            host_dir = out_dir / "hosts" / node.name
            host_options = RenderOptions(models_dir=fleet.models_dir, port=fleet.port, bind=fleet.bind)
            for name, entry in render_files(host_plan, host_dir, host_options, api_tokens).items():
                files[f"hosts/{node.name}/{name}"] = entry
    manifest = {
        "schema": 1,
        "glm_deploy_version": __version__,
        "stack": stack,
        "endpoint": {"port": fleet.port, "mode": options.endpoint_mode or fleet.endpoint_mode},
        "gateway_service": f"{stack}_{GATEWAY_SERVICE}",
        "classes": classes_manifest,
        "mixed": fleet_plan.mixed,
        "label_commands": label_commands(fleet_plan),
        "files": {
            name: _hash(text, 64)
            for name, (text, _) in sorted(files.items())
            if not name.endswith(API_TOKENS)
        },
    }
    files[layout.CLUSTER_MANIFEST] = (json.dumps(manifest, indent=2) + "\n", 0o644)
    return files, manifest


def _owner(files: dict[str, tuple[str, int]], name: str) -> tuple[int, int] | None:
    """Who must own a host bundle's key file: its compose user (only root can hand it over)."""
    if os.getuid() != 0 or not name.startswith("hosts/") or not name.endswith(API_TOKENS):
        return None
    manifest = json.loads(files[name[: -len(API_TOKENS)] + layout.MANIFEST][0])
    uid, gid = (int(x) for x in manifest["run_as"].split(":"))
    return uid, gid


def write_stack(
    fleet_plan: FleetPlan, out_dir: Path | str, options: StackOptions | None = None
) -> dict[str, Any]:
    """Render into out_dir: a new folder appears whole (staged, then renamed); an existing one of ours is
    updated file by file with cluster.json last, and folders of classes or hosts no longer in the fleet go.
    Re-rendering keeps the API key. Returns the manifest."""
    options = options or StackOptions()
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {out_dir} exists and is not a directory", "choose another --out")
    ours = (out_dir / layout.CLUSTER_MANIFEST).is_file()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ours and not options.force:
        raise BadInput(
            f"--out {out_dir} already holds other files", "choose an empty or new folder, or --force"
        )
    api_tokens = load_or_make_api_tokens(out_dir)  # the renderer's: a valid existing key file is kept
    files, manifest = stack_files(fleet_plan, out_dir, options, api_tokens)
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.render-", dir=out_dir.parent))
        try:
            for name, (text, mode) in files.items():
                write_text(staging / name, text, mode, _owner(files, name))
            os.chmod(staging, 0o755)
            os.rename(staging, out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return manifest
    for name in sorted(files, key=lambda n: n == layout.CLUSTER_MANIFEST):
        write_text(out_dir / name, files[name][0], files[name][1], _owner(files, name))
    for group in ("classes", "hosts"):
        keep = {name.split("/")[1] for name in files if name.startswith(f"{group}/")}
        folder = out_dir / group
        for stale in folder.iterdir() if folder.is_dir() else ():
            if stale.is_dir() and stale.name not in keep:
                shutil.rmtree(stale)
    return manifest

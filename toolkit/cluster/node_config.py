"""What one Swarm node needs before it can run the stack: engine settings and labels, computed from its GPUs.

- daemon.json: `node-generic-resources` advertises each GPU as NVIDIA-GPU=<NVML UUID> (Swarm schedules the
  stack's generic-resource claims against these), and the NVIDIA runtime as the default runtime (a Swarm service
  cannot choose a runtime).
- /etc/nvidia-container-runtime/config.toml: `swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"`, so the runtime
  exposes exactly the GPUs Swarm assigned to a task (Swarm passes them in that environment variable).
- the node's class label (the same name `deploy cluster render` derives from the same GPUs).
"""

from __future__ import annotations

from typing import Any

from ..detect.inventory import GpuInventory
from ..errors import BadInput
from .fleet import NODE_NAME
from .fleet_plan import CLASS_LABEL, class_name

GPU_KIND = "NVIDIA-GPU"
RUNTIME_CONFIG = "/etc/nvidia-container-runtime/config.toml"


def check_node_name(node_name: str) -> str:
    """A host name as `docker node ls` shows it (the label command is printed with it)."""
    if not NODE_NAME.fullmatch(node_name):
        raise BadInput(
            f"node name {node_name!r} is not a host name", "pass --node with the name `docker node ls` shows"
        )
    return node_name


def node_config(inventory: GpuInventory, node_name: str) -> dict[str, Any]:
    """The daemon.json fragment, runtime setting and label command for a node with these GPUs."""
    check_node_name(node_name)
    if not inventory.gpus:
        raise BadInput("no GPUs to advertise", "run on a GPU node, or pass --gpus / --detect-json")
    ids = [gpu.uuid or str(gpu.index) for gpu in sorted(inventory.gpus, key=lambda g: g.index)]
    label = class_name(inventory)
    notes = [
        (
            f"merge daemon_json into /etc/docker/daemon.json on {node_name}, then restart the engine "
            "(systemctl restart docker)"
        ),
        f'set {RUNTIME_CONFIG}: swarm-resource = "DOCKER_RESOURCE_{GPU_KIND}" (uncomment the line)',
        "run the label command on a manager",
    ]
    if any(gpu.uuid is None for gpu in inventory.gpus):
        notes.append(
            "GPU UUIDs unknown (spec input): indices are advertised; prefer `deploy node-config` on the "
            "node itself so the ids survive reboots and driver reloads"
        )
    return {
        "node": node_name,
        "class": label,
        "gpus": len(ids),
        "daemon_json": {
            "node-generic-resources": [f"{GPU_KIND}={gpu_id}" for gpu_id in ids],
            "default-runtime": "nvidia",
            "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "runtimeArgs": []}},
        },
        "nvidia_container_runtime": {"file": RUNTIME_CONFIG, "swarm-resource": f"DOCKER_RESOURCE_{GPU_KIND}"},
        "label_commands": [f"docker node update --label-add {CLASS_LABEL}={label} {node_name}"],
        "notes": notes,
    }

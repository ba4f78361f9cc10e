"""Checks before anything is downloaded or started: engine, GPU runtime, driver vs image CUDA, disk, port.

Each failing check raises EnvironmentMissing (exit 4) with one line naming the fix. The GPU checks are skipped
only by the explicit CPU-only option (--no-gpu), which test engines without GPUs use.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EnvironmentMissing
from ..facts.layout import MODEL_MARKER
from . import engine, hub


@dataclass(frozen=True)
class PreflightRequest:
    """What the deployment will need from this host."""

    gpu: bool
    bind: str
    port: int
    models_dir: Path
    model_dir_name: str
    model_bytes: int  # bytes of the model on disk once downloaded
    image_cuda: str | None  # CUDA version of the rendered image ("12.8"), None when unknown
    driver_cuda: str | None  # the host driver's CUDA version from NVML ("13.0"), None when unknown
    port_held_by_us: bool = False  # our own running container already publishes this port


def run_preflight(client: Any, request: PreflightRequest) -> list[str]:
    """Run every check in order (the first failure raises); returns notes on what was skipped."""
    notes = []
    if request.gpu:
        check_gpu_runtime(client)
        if request.image_cuda and request.driver_cuda:
            check_driver(request.image_cuda, request.driver_cuda)
        else:
            notes.append(
                "driver check skipped: the image's CUDA or the host's driver CUDA version is unknown"
            )
    else:
        notes.append("CPU-only engine (--no-gpu): NVIDIA runtime and driver checks skipped")
    target = request.models_dir / request.model_dir_name
    if not (target / MODEL_MARKER).is_file():
        hub.check_disk(target, request.model_bytes - _present_bytes(target))
    if not request.port_held_by_us:
        check_port(request.bind, request.port)
    return notes


def check_gpu_runtime(client: Any) -> None:
    """The engine must be able to hand GPUs to containers (nvidia runtime or NVIDIA CDI specs)."""
    if not engine.gpu_runtime_present(client):
        raise EnvironmentMissing(
            "the Docker engine has no NVIDIA runtime or CDI spec, so containers cannot get GPUs",
            "install nvidia-container-toolkit, run `sudo nvidia-ctk runtime configure --runtime=docker` and "
            "restart docker (CPU-only test engines: pass --no-gpu)",
        )


def check_driver(image_cuda: str, driver_cuda: str) -> None:
    """The host driver's CUDA version must be at least the image's (else: "unsatisfied condition: cuda>=")."""
    if _version(driver_cuda) < _version(image_cuda):
        raise EnvironmentMissing(
            f"the NVIDIA driver supports CUDA {driver_cuda} but the image needs CUDA {image_cuda}",
            "upgrade the driver, or re-plan for an older CUDA (deploy render --cuda 12 ...)",
        )


def check_port(bind: str, port: int) -> None:
    """Nothing may listen on bind:port yet (the engine would refuse to publish it)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EnvironmentMissing(
                    f"port {port} on {bind} is already in use",
                    "stop what holds it (ss -ltnp) or choose another with --port",
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise EnvironmentMissing(
                    f"{bind} is not an address of this host", "choose another --bind (127.0.0.1 by default)"
                ) from None
            raise EnvironmentMissing(
                f"cannot bind {bind}:{port} ({exc.strerror})", "choose another --port or --bind"
            ) from None


def _present_bytes(target: Path) -> int:
    """Bytes already downloaded there (a resumed download needs only the rest)."""
    if not target.is_dir():
        return 0
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and ".cache" not in p.parts)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split(".") if part.isdigit())

"""GpuInventory: the GPUs a plan is made for, detected through NVML or described by a --gpus spec."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import validate


@dataclass(frozen=True)
class Gpu:
    """One GPU as the planner sees it; free_mib is what a plan may use before headroom."""

    index: int
    name: str
    total_mib: int
    free_mib: int
    used_mib: int = 0
    uuid: str | None = None
    compute_capability: str | None = None  # "9.0"
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs of one host and its driver, from NVML ("nvml") or from a spec ("spec")."""

    gpus: tuple[Gpu, ...]
    source: str
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # "13.0"
    extra: dict[str, Any] = field(default_factory=dict)  # processes, MIG, topology: shown, not planned on

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the inverse of from_dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuInventory:
        """Rebuild an inventory from its JSON form (e.g. `deploy detect --json` of another host)."""
        gpus = tuple(
            Gpu(**{k: v for k, v in g.items() if k in Gpu.__dataclass_fields__}) for g in data["gpus"]
        )
        return cls(
            gpus=gpus,
            source=data.get("source", "file"),
            driver_version=data.get("driver_version"),
            cuda_driver_version=data.get("cuda_driver_version"),
            extra=data.get("extra") or {},
        )


def detect_nvml() -> GpuInventory:
    """This host's GPUs from NVML, planned on their free memory; EnvironmentMissing (exit 4) without driver/GPU."""
    from .nvml import detect_nvml as read_nvml

    return read_nvml()


def inventory_for(spec: str | None) -> GpuInventory:
    """The GPUs to plan for: a --gpus spec when one is given, else this host's (NVML)."""
    if spec is not None:
        from .gpu_spec import parse_gpu_spec

        return parse_gpu_spec(spec)
    return detect_nvml()


def inventory_from_json(data: Any, fail: Callable[[str], Exception]) -> GpuInventory:
    """Validate `deploy detect --json` output (GpuInventory.to_dict(), also a plan's inventory); fail(problem)
    builds the error."""
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list) or not data["gpus"]:
        raise fail("has no gpus list")
    gpus: list[Gpu] = []
    for position, gpu in enumerate(data["gpus"]):
        where = f"gpus[{position}]"
        if not isinstance(gpu, dict):
            raise fail(f"{where} must be a mapping")
        for key in ("index", "total_mib", "free_mib"):
            value = gpu.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 16 * 2**20:
                raise fail(f"{where}.{key} must be a whole number of MiB (or an index), got {value!r}")
        if gpu["total_mib"] == 0 or gpu["free_mib"] > gpu["total_mib"]:
            raise fail(f"{where}: free_mib {gpu['free_mib']} must be within total_mib {gpu['total_mib']} > 0")
        name = gpu.get("name")
        if not isinstance(name, str) or not name or len(name) > 100 or any(ord(c) < 32 for c in name):
            raise fail(f"{where}.name must be a GPU name, got {name!r}")
        uuid = gpu.get("uuid")
        if uuid is not None and (not isinstance(uuid, str) or not validate.DEVICE_ID.match(uuid)):
            raise fail(f"{where}.uuid {uuid!r} is not an NVML UUID")
        capability = gpu.get("compute_capability")
        if capability is not None and (
            not isinstance(capability, str) or not validate.COMPUTE_CAPABILITY.match(capability)
        ):
            raise fail(f"{where}.compute_capability {capability!r} is not of the form N.M")
        used = gpu.get("used_mib", 0)
        gpus.append(
            Gpu(
                index=gpu["index"],
                name=name,
                total_mib=gpu["total_mib"],
                free_mib=gpu["free_mib"],
                used_mib=used if isinstance(used, int) and not isinstance(used, bool) else 0,
                uuid=uuid,
                compute_capability=capability,
            )
        )
    if sorted(g.index for g in gpus) != list(range(len(gpus))):
        raise fail("gpu indices must be 0..n-1, each once")
    cuda = data.get("cuda_driver_version")
    if cuda is not None and (not isinstance(cuda, str) or not validate.CUDA_VERSION.match(cuda)):
        raise fail(f"cuda_driver_version {cuda!r} is not a version like 12.8")
    driver = data.get("driver_version")
    if driver is not None and (not isinstance(driver, str) or not re.fullmatch(r"[0-9][0-9.]{0,30}", driver)):
        raise fail(f"driver_version {driver!r} is not a version")
    return GpuInventory(
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        source=str(data.get("source", "file")),
        driver_version=driver,
        cuda_driver_version=cuda,
    )

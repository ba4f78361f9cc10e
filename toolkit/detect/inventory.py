"""GpuInventory: the GPUs a plan is made for, detected through NVML or described by a --gpus spec."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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

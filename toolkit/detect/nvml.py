"""NVML adapter: the host's GPUs as a GpuInventory (pynvml from nvidia-ml-py), free memory as the planner's input.

Required per GPU: name, UUID and memory. Everything else (compute capability, PCI bus id, processes, MIG mode,
NVLink, P2P, topology) is optional: a query the driver or GPU does not support (NVMLError_NotSupported, or any
other NVMLError such as NoPermission on a restricted host) leaves that field out instead of failing detection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import EnvironmentMissing
from .inventory import Gpu, GpuInventory

T = TypeVar("T")
MIB = 2**20
NO_GPU_HINT = "plan for another host with --gpus, e.g. `deploy plan --gpus 8x24GiB`"
TOPOLOGY_LEVELS = {
    0: "internal",
    10: "single-switch",
    20: "multi-switch",
    30: "host-bridge",
    40: "numa-node",
    50: "system",
}


def _text(value: Any) -> str:
    """pynvml returns str from some calls and bytes from others."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def detect_nvml() -> GpuInventory:
    """Read the GPUs through NVML; EnvironmentMissing (exit 4) when there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        raise EnvironmentMissing("nvidia-ml-py (pynvml) is not installed", NO_GPU_HINT) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise EnvironmentMissing(f"no NVIDIA driver found (NVML: {exc})", NO_GPU_HINT) from None
    try:
        return _read_inventory(pynvml)
    except pynvml.NVMLError as exc:
        raise EnvironmentMissing(f"NVML failed while reading the GPUs ({exc})", NO_GPU_HINT) from None
    finally:
        pynvml.nvmlShutdown()


def _read_inventory(nvml: Any) -> GpuInventory:
    """All GPUs NVML sees, with the driver and the host-level extras."""

    def optional(query: Callable[[], T]) -> T | None:
        try:
            return query()
        except nvml.NVMLError:
            return None

    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise EnvironmentMissing("the NVIDIA driver is loaded but reports no GPU", NO_GPU_HINT)
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    gpus = []
    extras: list[dict[str, Any]] = []
    for index, handle in enumerate(handles):
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        capability = optional(lambda h=handle: nvml.nvmlDeviceGetCudaComputeCapability(h))
        pci = optional(lambda h=handle: nvml.nvmlDeviceGetPciInfo(h))
        gpus.append(
            Gpu(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                total_mib=memory.total // MIB,
                free_mib=memory.free // MIB,
                used_mib=memory.used // MIB,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
                pci_bus_id=_text(pci.busId) if pci is not None else None,
            )
        )
        extras.append(_device_extra(nvml, handle, optional))
    cuda = optional(nvml.nvmlSystemGetCudaDriverVersion_v2)
    return GpuInventory(
        gpus=tuple(gpus),
        source="nvml",
        driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
        cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
        extra={"devices": extras, "peers": _peers(nvml, handles, optional)},
    )


def _device_extra(nvml: Any, handle: Any, optional: Callable[[Callable[[], Any]], Any]) -> dict[str, Any]:
    """Processes holding memory, MIG mode and active NVLinks of one GPU (fields NVML cannot report are left out)."""
    extra: dict[str, Any] = {}
    processes = []
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for process in optional(lambda q=query: q(handle)) or []:
            used = getattr(process, "usedGpuMemory", None)
            name = optional(lambda pid=process.pid: nvml.nvmlSystemGetProcessName(pid))
            processes.append(
                {
                    "pid": process.pid,
                    "name": _text(name) if name is not None else None,
                    "used_mib": used // MIB if isinstance(used, int) else None,
                }
            )
    extra["processes"] = processes
    mig = optional(lambda: nvml.nvmlDeviceGetMigMode(handle))
    if mig is not None:
        extra["mig"] = {"current": bool(mig[0]), "pending": bool(mig[1])}
    links = []
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        state = optional(lambda n=link: nvml.nvmlDeviceGetNvLinkState(handle, n))
        if state is None:
            break  # no NVLink, or no more links
        if state:
            remote = optional(lambda n=link: nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, n))
            links.append(
                {"link": link, "remote_pci_bus_id": _text(remote.busId) if remote is not None else None}
            )
    if links:
        extra["nvlinks"] = links
    return extra


def _peers(
    nvml: Any, handles: list[Any], optional: Callable[[Callable[[], Any]], Any]
) -> list[dict[str, Any]]:
    """For each GPU pair: the PCIe topology level, and whether P2P reads and NVLink P2P work."""
    peers = []
    for a in range(len(handles)):
        for b in range(a + 1, len(handles)):
            pair: dict[str, Any] = {"gpus": [a, b]}
            first, second = handles[a], handles[b]
            level = optional(lambda x=first, y=second: nvml.nvmlDeviceGetTopologyCommonAncestor(x, y))
            if level is not None:
                pair["topology"] = TOPOLOGY_LEVELS.get(int(level), str(level))
            # nvml.h's NVML_P2P_CAPS_INDEX_READ / _NVLINK; not pynvml's constants: nvidia-ml-py 13.x defines
            # READ as the tuple (0,), which ctypes refuses (seen on the H200 host, benchmarks/memory_calibration)
            for key, index in (("p2p_read", 0), ("p2p_nvlink", 2)):
                status = optional(lambda x=first, y=second, i=index: nvml.nvmlDeviceGetP2PStatus(x, y, i))
                if status is not None:
                    pair[key] = status == nvml.NVML_P2P_STATUS_OK
            peers.append(pair)
    return peers

"""`deploy detect`: what NVML sees on this host (GPUs, driver, processes, MIG, NVLink/P2P), as a table or JSON."""

from __future__ import annotations

import argparse
from typing import Any

from ..detect.inventory import GpuInventory, detect_nvml
from ..output import emit_json


def register(subparsers: Any) -> None:
    """Add `deploy detect`."""
    parser = subparsers.add_parser(
        "detect",
        help="list this host's GPUs through NVML",
        description="GPUs, driver and CUDA driver version, processes holding GPU memory, MIG mode and NVLink/P2P "
        "topology. Exit 4 when there is no NVIDIA driver or GPU (plan for another host with "
        "`deploy plan --gpus`).",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the inventory as JSON (input for planning)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Detect and print; EnvironmentMissing (exit 4) propagates to the CLI as one line."""
    inventory = detect_nvml()
    if args.json:
        emit_json(inventory.to_dict())
    else:
        print_inventory(inventory)
    return 0


def print_inventory(inventory: GpuInventory) -> None:
    """One row per GPU, then processes, MIG and peer links where NVML reported them."""
    from rich.table import Table

    from ..output import console

    out = console()
    if not out.is_terminal:
        out.width = 200  # pipes and logs get whole bus ids and UUIDs
    out.print(f"driver {inventory.driver_version or '?'}, CUDA driver {inventory.cuda_driver_version or '?'}")
    table = Table(show_edge=False, pad_edge=False)
    for header in ("GPU", "name", "total MiB", "free MiB", "used MiB", "CC", "PCI bus", "UUID"):
        table.add_column(header)
    for gpu in inventory.gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            str(gpu.total_mib),
            str(gpu.free_mib),
            str(gpu.used_mib),
            gpu.compute_capability or "-",
            gpu.pci_bus_id or "-",
            gpu.uuid or "-",
        )
    out.print(table)
    devices = inventory.extra.get("devices", [])
    for gpu, extra in zip(inventory.gpus, devices):
        for process in extra.get("processes", []):
            used = process.get("used_mib")
            out.print(
                f"GPU {gpu.index}: pid {process['pid']} {process.get('name') or ''} "
                f"{'' if used is None else f'{used} MiB'}".rstrip()
            )
        if "mig" in extra:
            mig = extra["mig"]
            out.print(
                f"GPU {gpu.index}: MIG {'on' if mig['current'] else 'off'}"
                f"{' (pending change)' if mig['current'] != mig['pending'] else ''}"
            )
        if extra.get("nvlinks"):
            out.print(f"GPU {gpu.index}: {len(extra['nvlinks'])} active NVLink(s)")
    for pair in inventory.extra.get("peers", []):
        facts = [pair["topology"]] if "topology" in pair else []
        facts += [
            f"{key.replace('_', ' ')} {'yes' if pair[key] else 'no'}"
            for key in ("p2p_read", "p2p_nvlink")
            if key in pair
        ]
        if facts:
            out.print(f"GPU {pair['gpus'][0]} <-> GPU {pair['gpus'][1]}: {', '.join(facts)}")

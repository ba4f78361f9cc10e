"""`deploy node-config`: the daemon.json fragment, runtime setting and labels a Swarm GPU node needs."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

from ..detect.inventory import inventory_for
from ..errors import BadInput


def register(subparsers: Any) -> None:
    """Add `deploy node-config`."""
    parser = subparsers.add_parser(
        "node-config",
        help="print the engine settings and labels this Swarm node needs (from NVML)",
        description="Advertise the node's GPUs to Swarm (daemon.json node-generic-resources with NVML GPU UUIDs), "
        "make the NVIDIA runtime the default, and label the node with its class. Exit 4 without "
        "NVML (give --gpus or --detect-json to compute it for another node).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--gpus", metavar="SPEC", help="a GPU spec such as 8x24GiB instead of NVML (no UUIDs)"
    )
    source.add_argument(
        "--detect-json",
        type=Path,
        metavar="FILE",
        help="`deploy detect --json` output of the node instead of NVML",
    )
    parser.add_argument("--node", help="the node's name in `docker node ls` (default: this host name)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def _inventory(args: argparse.Namespace) -> Any:
    """A detect JSON file, else a spec, else NVML."""
    if args.detect_json:
        from .. import inputs
        from ..detect.inventory import inventory_from_json

        hint = "give `deploy detect --json` output"
        data = inputs.parse_json(
            inputs.read_text(args.detect_json, "--detect-json", hint=hint),
            "--detect-json",
            args.detect_json,
            hint,
        )
        return inventory_from_json(
            data,
            lambda problem: BadInput(
                f"--detect-json {args.detect_json}: {problem}", "give `deploy detect --json` output"
            ),
        )
    return inventory_for(args.gpus or None)


def run(args: argparse.Namespace) -> int:
    """Print the node's settings (no secrets involved)."""
    from ..cluster.node_config import check_node_name, node_config
    from ..output import console, emit_json

    node = args.node or socket.gethostname()
    check_node_name(node)  # the flag before NVML: a bad name is exit 2 on any machine
    config = node_config(_inventory(args), node)
    if args.json:
        emit_json(config)
        return 0
    out = console()
    out.print(f"node {config['node']}: {config['gpus']} GPU(s), class {config['class']}")
    out.print("\n/etc/docker/daemon.json (merge these keys, then restart the engine):")
    out.print(json.dumps(config["daemon_json"], indent=2), markup=False)
    runtime = config["nvidia_container_runtime"]
    out.print(f'\n{runtime["file"]}:\nswarm-resource = "{runtime["swarm-resource"]}"', markup=False)
    out.print("\non a manager:")
    for command in config["label_commands"]:
        out.print(command, markup=False)
    for note in config["notes"][3:]:
        out.print(f"\nnote: {note}", markup=False)
    return 0

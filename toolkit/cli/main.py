"""`deploy` entry point: registers the command modules, parses arguments, maps errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ToolkitError
from . import auto, bench, cluster, detect, lifecycle, node_config, plan, reference, render, verify

# One module per command (or group); each has register(subparsers). Help lists them in this order.
COMMANDS = (auto, bench, cluster, detect, lifecycle, node_config, plan, reference, render, verify)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand (or group) per command module."""
    parser = argparse.ArgumentParser(
        prog="deploy",
        description="Plan, render, deploy and verify GLM-4.7 EXL3 endpoints on TabbyAPI.",
        epilog="Exit codes: 0 ok, 2 bad input, 3 nothing fits, 4 environment missing, 5 verification failed.",
    )
    parser.add_argument("--version", action="version", version=f"glm-deploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected failures print one line on stderr and return their exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except ToolkitError as error:
        print(f"deploy {args.command}: {error.line()}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"deploy {args.command}: interrupted", file=sys.stderr)
        return 130

"""`deploy` entry point: finds the command modules, parses arguments, maps errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from . import __version__, commands
from .errors import ToolkitError


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per module in toolkit/commands; each module has register(subparsers)."""
    parser = argparse.ArgumentParser(
        prog="deploy",
        description="Plan, render, deploy and verify GLM-4.7 EXL3 endpoints on TabbyAPI.",
        epilog="Exit codes: 0 ok, 2 bad input, 3 nothing fits, 4 environment missing, 5 verification failed.",
    )
    parser.add_argument("--version", action="version", version=f"glm-deploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{module_info.name}").register(subparsers)
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


if __name__ == "__main__":
    sys.exit(main())

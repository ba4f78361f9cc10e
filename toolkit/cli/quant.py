"""`deploy quant`: exact quant sizes and mixed-precision quants between published branches."""

from __future__ import annotations

from typing import Any

from .quant_mix import register_mix


def register(subparsers: Any) -> None:
    """The `quant` group; each action module adds its own subcommand."""
    group = subparsers.add_parser("quant", help="exact quant sizes; mixed-precision quants between branches")
    register_mix(group.add_subparsers(dest="action", metavar="ACTION", required=True))

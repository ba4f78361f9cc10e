"""`deploy` with `quant mix` reachable, for tests written before the `quant` group is wired into the CLI."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from toolkit.cli.quant_mix import register_mix

cli = importlib.import_module("toolkit.cli.main")


def deploy_with_quant(monkeypatch: Any) -> Callable[[list[str]], int]:
    """main() itself when a `quant` group is wired; else main() with a `quant` group holding `mix` only."""
    if not any(getattr(c, "__name__", "").endswith(".quant") for c in cli.COMMANDS):

        def register(subparsers: Any) -> None:
            group = subparsers.add_parser("quant", help="quant sizes and mixes")
            register_mix(group.add_subparsers(dest="action", metavar="ACTION", required=True))

        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, SimpleNamespace(register=register)))
    return cli.main

"""One output layer: the same result as a rich table for people or as JSON for machines."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console


def emit_json(data: Any) -> None:
    """Print one JSON object on stdout (nothing else goes to stdout in --json mode)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def console() -> Console:
    """Human output on stdout; rich drops colour and markup when stdout is not a terminal."""
    return Console(highlight=False, soft_wrap=True)


def status_console() -> Console:
    """Progress and notes on stderr, so stdout stays clean for pipes and --json."""
    return Console(stderr=True, highlight=False, soft_wrap=True)

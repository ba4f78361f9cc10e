"""One output layer: the same result as a rich table for people or as JSON for machines; progress on stderr.

Nothing printed is read as rich markup: text from servers, files and the command line reaches the screen as the
characters it is (styles, where wanted, come from rich Text objects, see mark()); secrets are redacted from JSON
as from every other output (toolkit.redact).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.text import Text

from .redact import redact_data

MARK_STYLES = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}


def json_safe(value: Any) -> Any:
    """A JSON-ready value with secrets redacted and non-finite numbers (which JSON cannot carry) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def emit_json(data: Any) -> None:
    """Print one JSON object on stdout (nothing else goes to stdout in --json mode)."""
    sys.stdout.write(
        json.dumps(redact_data(json_safe(data)), indent=2, sort_keys=False, allow_nan=False) + "\n"
    )


def console() -> Console:
    """Human output on stdout, never interpreted as markup; rich drops colour when stdout is not a terminal."""
    return Console(highlight=False, soft_wrap=True, markup=False)


def status_console() -> Console:
    """Progress and notes on stderr, so stdout stays clean for pipes and --json (never interpreted as markup)."""
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def mark(word: str, text: str = "") -> Text:
    """A PASS/FAIL/SKIP word in its colour, then plain text (never markup)."""
    return Text.assemble((word, f"bold {MARK_STYLES.get(word, '')}".strip()), " " + text if text else "")


class Progress:
    """Notes and a live status line on stderr (plain lines when stderr is not a terminal, nothing with --quiet)."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = status_console()
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._status: Any = None
        self._last = ""

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        """A note that is always shown (stderr), --json or not: something changed from what was asked."""
        self.console.print(text, markup=False, highlight=False)

    @contextmanager
    def status(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner line that update() rewrites; in logs, each distinct update once."""
        self.note(text)
        if not self.live:
            yield self._plain_update
            return
        with self.console.status(text) as status:
            yield lambda line: status.update(f"{text}  {line[-150:]}")

    @contextmanager
    def bar(self, text: str, total: int) -> Iterator[ByteBar]:
        """A byte progress bar (rich, when stderr is a terminal); in logs, one plain line per advance."""
        self.note(text)
        if not self.live:
            yield ByteBar(total, self._plain_update)
            return
        from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns = (BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn())
        with RichProgress("{task.description}", *columns, console=self.console, transient=True) as shown:
            task = shown.add_task("", total=total)
            yield ByteBar(
                total,
                lambda line: shown.update(task, description=line[-60:]),
                lambda done: shown.update(task, completed=done),
            )

    def _plain_update(self, line: str) -> None:
        if line != self._last and not self.quiet:
            self._last = line
            self.console.print(f"  {line[-200:]}", markup=False, highlight=False)


class ByteBar:
    """What a bar's caller moves: bytes done (advance) and the latest line of the work (line)."""

    def __init__(
        self,
        total: int,
        show_line: Callable[[str], None],
        show_done: Callable[[int], None] | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self._show_line = show_line
        self._show_done = show_done

    def advance(self, n: int, line: str) -> None:
        """n more bytes are done; line says what (shown with the running total in logs)."""
        self.done += n
        if self._show_done is None:
            self._show_line(f"{line}: {_size(self.done)} of {_size(self.total)}")
            return
        self._show_done(self.done)
        self._show_line(line)

    def line(self, text: str) -> None:
        """The work's latest line of output."""
        self._show_line(text)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

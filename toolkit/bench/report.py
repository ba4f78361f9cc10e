"""The sweep for people: a heading, a throughput table, a latency table, and the warnings; a progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .metrics import Distribution
from .result import BenchResult


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def heading(result: BenchResult) -> list[str]:
    """What was measured, in two lines."""
    exact = "exact, server tokenizer" if result.input_exact else "approximate: no tokenizer endpoint"
    slo = ", ".join(f"{k} <= {v:g} ms" for k, v in result.slo_ms.items())
    return [
        f"deploy bench {result.url} ({result.endpoint}, model {result.model_id or 'unknown'})",
        f"input {result.input_len} tokens ({exact}), output {result.output_len} tokens (EOS banned), "
        f"warm-up {result.warmup}" + (f", SLO {slo}" if slo else ""),
    ]


def throughput_table(result: BenchResult) -> Table:
    """Per level: requests done and failed, the level's wall time, and the throughputs."""
    table = Table(box=None, header_style="bold")
    for column in ("conc", "ok", "failed", "time s", "req/s", "out tok/s", "total tok/s"):
        table.add_column(column, justify="right")
    if result.slo_ms:
        table.add_column("goodput req/s", justify="right")
    for level in result.levels:
        m = level.metrics
        row = [
            str(level.concurrency),
            str(m.completed),
            str(m.failed),
            _num(m.duration_s, 2),
            _num(m.request_throughput, 2),
            _num(m.output_throughput),
            _num(m.total_token_throughput),
        ]
        if result.slo_ms:
            row.append(_num(m.request_goodput, 2))
        table.add_row(*row)
    return table


def latency_table(result: BenchResult) -> Table:
    """Per level and metric (TTFT, TPOT, ITL, E2EL): mean, median and the percentiles, in ms."""
    table = Table(box=None, header_style="bold")
    for column in ("conc", "ms", "mean", "median", *(f"p{q}" for q in result.percentiles)):
        table.add_column(column, justify="right" if column != "ms" else "left")
    for level in result.levels:
        for name in ("ttft", "tpot", "itl", "e2el"):
            dist: Distribution | None = getattr(level.metrics, name)
            values = (
                [] if dist is None else [dist.mean_ms, dist.median_ms, *(v for _, v in dist.percentiles_ms)]
            )
            cells = [_num(v, 0 if v >= 1000 else 1) for v in values] or ["-"] * (2 + len(result.percentiles))
            table.add_row(
                str(level.concurrency) if name == "ttft" else "",
                name.upper(),
                *cells,
                end_section=name == "e2el",
            )
    return table


def print_report(result: BenchResult, out: Console) -> None:
    """Everything a person needs, on stdout."""
    for line in heading(result):
        out.print(line)
    out.print(throughput_table(result))
    out.print(latency_table(result))
    counted = {lv.metrics.tokens_from_usage for lv in result.levels if lv.metrics.completed}
    if counted == {False}:
        out.print(
            "output tokens counted from streamed chunks (the server sent no usage): a chunk may hold more "
            "than one token"
        )
    for level in result.levels:
        for message, count in level.metrics.errors.items():
            out.print(f"concurrency {level.concurrency}: {count} failed: {message}")
    for warning in result.to_dict()["warnings"]:
        out.print(f"warning: {warning}")


class RichProgress:
    """A progress bar on stderr (drawn only on a terminal); notes are printed as lines either way."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._task: TaskID | None = None

    def start(self) -> None:
        """Show the bar (on a terminal)."""
        self._progress.start()

    def stop(self) -> None:
        """Remove the bar."""
        self._progress.stop()

    def phase(self, label: str, total: int) -> None:
        """Replace the bar with a new phase."""
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(label, total=total)

    def advance(self) -> None:
        """One step."""
        if self._task is not None:
            self._progress.advance(self._task)

    def note(self, text: str) -> None:
        """A line above the bar (or alone, without a terminal)."""
        self._progress.console.print(text, markup=False, highlight=False)

"""`deploy` entry point: registers the command modules, parses arguments, maps errors to exit codes.

Every expected failure is one line on stderr, `deploy COMMAND: what is wrong -- what to do`, with its documented
exit code: argparse's usage errors too (exit 2, pointing at --help), and a flag value holding a control character
(a newline, a NUL byte, an escape) before anything else looks at it. Both output streams pass through the
redactor (toolkit.redact), so no key the run has read can be printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__, redact
from ..errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, BadInput, ToolkitError
from . import (
    auto,
    bench,
    cluster,
    detect,
    lifecycle,
    node_config,
    plan,
    quant,
    quant_mix,
    reference,
    render,
    verify,
)

# One module per command (or group); each has register(subparsers). Help lists them in this order. A module adding
# subcommands to a group another module made (`deploy quant ...`) asks options.command_group for it, after it here.
COMMANDS = (
    auto,
    bench,
    cluster,
    detect,
    lifecycle,
    node_config,
    plan,
    quant,
    quant_mix,
    reference,
    render,
    verify,
)


class UsageError(BadInput):
    """A command line argparse cannot parse (exit 2), said in one line with the --help that explains it."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors instead of a usage dump (subcommand parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand (or group) per command module."""
    parser = Parser(
        prog="deploy",
        description="Plan, render, deploy and verify GLM-4.7 EXL3 endpoints on TabbyAPI.",
        epilog="Exit codes: 0 ok, 2 bad input, 3 nothing fits, 4 environment missing, 5 verification failed.",
    )
    parser.add_argument("--version", action="version", version=f"glm-deploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def check_argv(argv: Sequence[str]) -> None:
    """No flag value may hold a control character: names, paths and numbers never need one."""
    for position, value in enumerate(argv):
        bad = next((char for char in value if ord(char) < 32 or ord(char) == 127), None)
        if bad is not None:
            flag = argv[position - 1] if position and argv[position - 1].startswith("-") else "an argument"
            raise BadInput(
                f"{flag} {redact.printable(value, 80)} holds a control character ({bad!r})",
                "remove newlines and other control characters from the value",
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected failures print one line on stderr and return their exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = redact.RedactingStream(sys.stdout), redact.RedactingStream(sys.stderr)  # type: ignore[assignment]
    try:
        return _run(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _line(error: ToolkitError) -> str:
    """The error's one line: the message shortened (a 5000-digit value stays out), the hint always whole."""
    message = redact.printable(error.message, 600)
    return f"{message} -- {redact.printable(error.hint, 600)}" if error.hint else message


def _run(argv: list[str]) -> int:
    parser = build_parser()
    command = "deploy"
    try:
        check_argv(argv)
        args = parser.parse_args(argv)
        command = f"deploy {args.command}" if getattr(args, "command", None) else "deploy"
        if not getattr(args, "run", None):
            raise BadInput("no command given", "see `deploy --help`")
        return int(args.run(args) or 0)
    except UsageError as error:
        print(_line(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ToolkitError as error:
        print(f"{command}: {_line(error)}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        # Whatever the host refused that no step anticipated (a full disk, a vanished folder): one line, exit 4.
        where = f" ({error.filename})" if error.filename else ""
        print(
            f"{command}: {error.strerror or error}{where} -- check the disk and the paths given",
            file=sys.stderr,
        )
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130

"""The README's "Two commands", read from README.md so that tests and CI run exactly what users are told to."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def two_commands(readme: Path = README) -> tuple[str, str]:
    """(install-and-run command, test command): the indented lines of the "## Two commands" section, in order."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]
    if len(commands) != 2:
        raise AssertionError(
            f"README's Two commands section has {len(commands)} command lines, not 2: {commands}"
        )
    return commands[0], commands[1]


def install_command(readme: Path = README) -> str:
    """The install part of the first command (what comes before `&& deploy auto`)."""
    first, _ = two_commands(readme)
    install, sep, rest = first.partition(" && ")
    if not sep or rest != "deploy auto":
        raise AssertionError(f"README's first command is not `<install> && deploy auto`: {first!r}")
    return install

"""The README's two commands, CI and the set-up scripts agree, and none of them relies on the system pip."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.readme import install_command, two_commands

ROOT = Path(__file__).resolve().parents[2]
# pip run by the system Python, at a command position (the venv's own `"$VENV/bin/python" -m pip` is fine)
SYSTEM_PIP = re.compile(
    r"(^|&&|;|\||\(|\bthen|\bdo)\s*(sudo\s+)?(python3(\.\d+)?\s+-m\s+pip|pip3?)\s", re.MULTILINE
)


def test_readme_has_the_install_and_the_test_command() -> None:
    first, test = two_commands()
    assert first == f"{install_command()} && deploy auto"
    assert (ROOT / install_command().split()[0]).is_file()
    assert test.startswith("scripts/setup-dev.sh && ")


def test_ci_runs_exactly_the_readme_test_command_with_docker_required() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    _, test = two_commands()
    assert test in lines
    assert lines.index("export GLM_DEPLOY_REQUIRE_DOCKER=1") < lines.index(test)


def test_no_command_users_or_ci_run_calls_the_system_pip() -> None:
    texts = {"README commands": "\n".join(two_commands()), ".ci/run": (ROOT / ".ci" / "run").read_text()}
    for script in ("install.sh", "setup-dev.sh", "make-test-base-image.sh"):
        texts[script] = (ROOT / "scripts" / script).read_text()
    for name, text in texts.items():
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not SYSTEM_PIP.search(code), f"{name} calls pip outside the virtual environment"


def test_install_script_refuses_unknown_options_in_one_line() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "install.sh"), "--frobnicate"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "usage" in result.stderr

"""Options shared by several commands behave the same in each: --port is one checked type everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.cli import main


@pytest.mark.parametrize("command", ["render", "auto"])
@pytest.mark.parametrize("port", ["http", "0", "65536", "-1"])
def test_a_bad_port_is_one_line_and_exit_2_in_every_command(command, port, tmp_path: Path, capsys) -> None:
    args = [command, "--gpus", "2xH200", "--out", str(tmp_path / "out"), f"--port={port}"]
    code = main(args + (["--yes"] if command == "auto" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    shown = port if port.lstrip("-").isdigit() else repr(port)  # a number is echoed as the number
    assert err == f"deploy {command}: --port {shown} is not a TCP port -- use 1-65535"
    assert not (tmp_path / "out").exists()

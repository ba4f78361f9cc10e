"""`deploy quant mix` from the command line: exit codes 0/2/4/5, one-line errors, --json."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from toolkit.quant import mix
from toolkit.quant.storage import read_storage

from .cli_wiring import deploy_with_quant


@pytest.fixture()
def deploy(monkeypatch):
    return deploy_with_quant(monkeypatch)


def _args(lower, upper, target):
    return ["quant", "mix", "--lower", str(lower), "--upper", str(upper), "--target-gib", str(target / 2**30)]


def test_a_mix_from_the_command_line(deploy, quant, double, tmp_path, capsys):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    target = (read_storage(lower).vram_bytes + read_storage(upper).vram_bytes) // 2
    argv = [*_args(lower, upper, target), "--out", str(out), "--python", sys.executable]
    assert deploy([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and not result["reused"] and "modules" not in result
    assert result["actual_bytes"] <= target and result["runner"]["kind"] == "python"
    assert deploy(argv) == 0
    said = capsys.readouterr()
    assert said.out.startswith(f"reused {out}: ") and "by card" in said.out


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--target-gib", "nan"], "--target-gib nan is not a number above 0"),
        (["--target-gib", "lots"], "--target-gib 'lots' is not a number"),
        (["--recipe", "nonesuch"], "--recipe 'nonesuch' is not a recipe"),
        (["--image", "bad image!"], "--image 'bad image!' is not a Docker image reference"),
    ],
)
def test_bad_input_is_exit_2_in_one_line(deploy, quant, tmp_path, capsys, extra, said):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    argv = ["quant", "mix", "--lower", str(lower), "--upper", str(upper), "--out", str(tmp_path / "m")]
    if "--target-gib" not in extra:
        argv += ["--target-gib", str(read_storage(lower).vram_bytes / 2**30)]
    if "--image" not in extra:
        extra = [*extra, "--python", sys.executable]
    assert deploy([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_not_enough_disk_is_exit_4(deploy, quant, tmp_path, capsys, monkeypatch):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    monkeypatch.setattr(mix.shutil, "disk_usage", lambda _: SimpleNamespace(free=2**30))
    argv = [*_args(lower, upper, read_storage(lower).vram_bytes), "--out", str(tmp_path / "m")]
    assert deploy([*argv, "--python", sys.executable]) == 4
    assert "not enough disk" in capsys.readouterr().err


def test_a_result_that_differs_from_the_plan_is_exit_5(deploy, quant, double, tmp_path, capsys, monkeypatch):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    job = mix._job
    monkeypatch.setattr(
        mix, "_job", lambda *a: {**job(*a), "overrides": {}}
    )  # the assembly takes only the base
    target = read_storage(upper).vram_bytes
    argv = [*_args(lower, upper, target), "--out", str(out), "--python", sys.executable]
    assert deploy(argv) == 5
    err = capsys.readouterr().err
    assert "not the planned tensors" in err and not out.exists()

"""Class 8, input before environment: a bad flag is exit 2 on any machine, before NVML or Docker are touched.

The sandbox has no NVIDIA driver and no reachable Docker engine, so an environment check that ran first would
answer exit 4 instead of naming the bad flag.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import assert_one_line, snapshot

BAD_FLAGS = {
    "plan unknown quant": (["plan", "--quant", "9bpw_H9"], "9bpw_H9"),
    "plan unknown cache": (["plan", "--cache", "9,9"], "9,9"),
    "plan card cache spelling": (["plan", "--cache", "k5v4"], "k5v4"),
    "plan unknown split": (["plan", "--split", "diagonal"], "diagonal"),
    "plan zero context": (["plan", "--context", "0"], "--context"),
    "plan context above the model": (["plan", "--context", "999999999"], "--context"),
    "plan negative headroom": (["plan", "--headroom-mib", "-5"], "--headroom-mib"),
    "plan unknown profile": (["plan", "--profile", "nope"], "nope"),
    "render unknown quant": (["render", "--quant", "9bpw_H9", "--out", "{out}"], "9bpw_H9"),
    "render bad tabby ref": (["render", "--tabby-ref", "main;id", "--out", "{out}"], "--tabby-ref"),
    "render bad bind": (["render", "--bind", "localhost", "--out", "{out}"], "--bind"),
    "render port zero": (["render", "--port", "0", "--out", "{out}"], "--port"),
    "render relative models dir": (["render", "--models-dir", "models", "--out", "{out}"], "--models-dir"),
    "render bad cache": (["render", "--cache", "k5v4", "--out", "{out}"], "k5v4"),
    "auto unknown quant": (["auto", "--quant", "9bpw_H9", "--yes", "--out", "{out}"], "9bpw_H9"),
    "auto bad port": (["auto", "--port", "70000", "--yes", "--out", "{out}"], "--port"),
    "auto bad bind": (["auto", "--bind", "localhost", "--yes", "--out", "{out}"], "--bind"),
    "auto bad cuda": (["auto", "--cuda", "11", "--yes", "--out", "{out}"], "--cuda"),
    "auto relative models dir": (
        ["auto", "--models-dir", "models", "--yes", "--out", "{out}"],
        "--models-dir",
    ),
    "auto negative ready timeout": (
        ["auto", "--ready-timeout", "-1", "--yes", "--out", "{out}"],
        "--ready-timeout",
    ),
    "auto missing token file": (["auto", "--hf-token-file", "{missing}", "--yes", "--out", "{out}"], "token"),
    "node-config bad node name": (["node-config", "--node", "bad name!"], "bad name!"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_named_before_nvml(case, cli, sandbox) -> None:
    argv, named = BAD_FLAGS[case]
    values = {"out": str(sandbox.work / "out"), "missing": str(sandbox.work / "no-such-token")}
    before = snapshot(sandbox.root)
    line = assert_one_line(cli(*[a.format(**values) for a in argv]), 2)
    assert named in line and "NVML" not in line, line
    assert snapshot(sandbox.root) == before


LIFECYCLE = {
    "up negative ready timeout": ["up", "--ready-timeout", "-1"],
    "up nan ready timeout": ["up", "--ready-timeout", "nan"],
    "logs bad tail": ["logs", "--tail", "lots"],
    "logs negative tail": ["logs", "--tail", "-3"],
    "fetch-model missing token file": ["fetch-model", "--hf-token-file", "{missing}"],
    "fetch-model token file is a folder": ["fetch-model", "--hf-token-file", "{folder}"],
}


@pytest.mark.parametrize("case", sorted(LIFECYCLE))
def test_bad_flags_are_named_before_docker_or_the_hub(case, cli, sandbox) -> None:
    bundle = sandbox.work / "bundle"
    assert cli("render", "--gpus", "1xH200", "--out", str(bundle)).code == 0
    values = {"missing": str(sandbox.work / "no-such-token"), "folder": str(sandbox.work)}
    line = assert_one_line(cli(*[a.format(**values) for a in LIFECYCLE[case]], "--out", str(bundle)), 2)
    assert "Docker" not in line and "hub" not in line, line


def test_environment_is_still_exit_4_when_the_input_is_good(cli, sandbox) -> None:
    line = assert_one_line(cli("plan"), 4)
    assert "NVML" in line or "driver" in line

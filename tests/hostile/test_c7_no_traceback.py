"""Class 7, no traceback anywhere: every bad flag, value, file or path is one line with its exit code.

argparse's usage dumps become one line with a hint; huge integers, NaN/inf where a number is expected,
non-UTF-8 files, invalid URLs, unwritable or odd output paths and an empty --out are each one line, exit 2 (or 4
where the environment is at fault), and nothing is half-written.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from tests.hostile.conftest import ROOT, assert_one_line, snapshot

USAGE_ERRORS = {
    "no command": [],
    "unknown command": ["frobnicate"],
    "unknown flag": ["plan", "--gpus", "2xH200", "--bogus"],
    "missing required flag": ["reference", "record", "--out", "ref.json"],
    "missing value": ["plan", "--gpus"],
    "not a number": ["verify", "--url", "http://127.0.0.1:9", "--max-kl", "abc"],
    "integer overflow of a flag": ["verify", "--url", "http://127.0.0.1:9", "--expect-context", "9" * 5000],
    "reference without action": ["reference"],
    "cluster without subcommand": ["cluster"],
    "cluster unknown subcommand": ["cluster", "launch"],
    "quant without subcommand": ["quant"],
    "quant sizes without a source": ["quant", "sizes"],
    "quant sizes with two sources": ["quant", "sizes", "--model-dir", ".", "--quant", "3bpw_H6"],
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_with_a_hint(case, cli) -> None:
    line = assert_one_line(cli(*USAGE_ERRORS[case]), 2)
    assert "--help" in line


NUMBERS = {
    "gpu count of 5000 digits": ["plan", "--gpus", "9" * 5000 + "x24GiB"],
    "gpu size of 5000 digits": ["plan", "--gpus", "2x24." + "9" * 5000 + "GiB"],
    "context of 5000 digits": ["plan", "--gpus", "2xH200", "--context", "9" * 5000],
    "headroom of 5000 digits": ["plan", "--gpus", "2xH200", "--headroom-mib", "9" * 5000],
    "port of 30 digits": ["render", "--gpus", "2xH200", "--out", "{out}", "--port", "9" * 30],
    "max-kl nan": ["verify", "--url", "http://127.0.0.1:9", "--max-kl", "nan"],
    "max-kl inf": ["verify", "--url", "http://127.0.0.1:9", "--max-kl", "inf"],
    "wait nan": ["verify", "--url", "http://127.0.0.1:9", "--wait", "nan"],
    "wait inf": ["verify", "--url", "http://127.0.0.1:9", "--wait", "inf"],
    "wait 1e400": ["verify", "--url", "http://127.0.0.1:9", "--wait", "1e400"],
    "timeout nan": ["verify", "--url", "http://127.0.0.1:9", "--timeout", "nan"],
    "timeout zero": ["verify", "--url", "http://127.0.0.1:9", "--timeout", "0"],
    "record timeout inf": [
        "reference",
        "record",
        "--url",
        "http://127.0.0.1:9",
        "--out",
        "{out}.json",
        "--timeout",
        "inf",
    ],
    "cluster wait inf": ["cluster", "verify", "--inventory", "{fleet}", "--wait", "inf"],
    "up ready-timeout nan": ["up", "--out", "{bundle}", "--ready-timeout", "nan"],
    "up ready-timeout negative": ["up", "--out", "{bundle}", "--ready-timeout", "-1"],
    "auto ready-timeout inf": [
        "auto",
        "--gpus",
        "2xH200",
        "--yes",
        "--out",
        "{out}",
        "--ready-timeout",
        "inf",
    ],
    "logs tail 1e999": ["logs", "--out", "{bundle}", "--tail", "1e999"],
    "top-k of 5000 digits": [
        "reference",
        "record",
        "--url",
        "http://127.0.0.1:9",
        "--out",
        "{out}.json",
        "--top-k",
        "9" * 5000,
    ],
}


@pytest.fixture()
def prepared(cli, sandbox) -> dict[str, str]:
    """A rendered bundle and a fleet file for the cases that need one."""
    bundle = sandbox.work / "bundle"
    assert cli("render", "--gpus", "1xH200", "--out", str(bundle)).code == 0
    fleet = sandbox.work / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump({"nodes": [{"name": "gpu-a", "gpus": "1xH200", "url": "http://127.0.0.1:9"}]})
    )
    return {"bundle": str(bundle), "fleet": str(fleet), "out": str(sandbox.work / "new-out")}


@pytest.mark.parametrize("case", sorted(NUMBERS))
def test_odd_numbers_are_one_line(case, deploy, sandbox, prepared) -> None:
    before = snapshot(sandbox.root)
    assert_one_line(deploy(*[a.format(**prepared) for a in NUMBERS[case]], timeout=60), 2)
    assert snapshot(sandbox.root) == before


def _profile_with(edit) -> str:
    data = yaml.safe_load((ROOT / "profiles" / "glm-4.7.yaml").read_text())
    edit(data)
    return yaml.safe_dump(data)


PROFILES = {
    "huge hidden size": lambda d: d["architecture"].update(hidden_size=10**400),
    "huge vocabulary": lambda d: d["architecture"].update(vocab_size=10**30),
    "infinite kl": lambda d: d["quants"][0].update(kl_ref_quant=float("inf")),
    "nan bpw": lambda d: d["quants"][0].update(bpw=float("nan")),
    "huge chunk size": lambda d: d["serving"].update(chunk_size=10**300),
    "huge overhead": lambda d: d["memory_overhead"].update(base_mib=1e300),
}


@pytest.mark.parametrize("case", sorted(PROFILES))
def test_odd_numbers_in_a_profile_are_one_line(case, cli, sandbox) -> None:
    path = sandbox.work / "profile.yaml"
    path.write_text(_profile_with(PROFILES[case]))
    assert_one_line(cli("plan", "--gpus", "2xH200", "--profile", str(path)), 2)


NOT_UTF8 = b"\xff\xfe\x00bad\x80\x81"


@pytest.mark.parametrize(
    "flag",
    [
        "--api-key-file",
        "--reference",
        "--prompts",
        "--plan",
        "--inventory",
        "--detect-json",
        "--profile",
        "--hf-token-file",
    ],
)
def test_non_utf8_files_are_one_line(flag, cli, sandbox, prepared, monkeypatch) -> None:
    path = sandbox.work / (
        "input.yaml" if flag in ("--prompts", "--inventory", "--profile") else "input.json"
    )
    path.write_bytes(NOT_UTF8)
    argv = {
        "--api-key-file": ["verify", "--url", "http://127.0.0.1:9", "--api-key-file", str(path)],
        "--reference": ["verify", "--url", "http://127.0.0.1:9", "--reference", str(path)],
        "--prompts": [
            "reference",
            "record",
            "--url",
            "http://127.0.0.1:9",
            "--prompts",
            str(path),
            "--out",
            prepared["out"] + ".json",
        ],
        "--plan": ["render", "--plan", str(path), "--out", prepared["out"]],
        "--inventory": ["cluster", "plan", "--inventory", str(path)],
        "--detect-json": ["node-config", "--detect-json", str(path), "--node", "gpu-a"],
        "--profile": ["plan", "--gpus", "2xH200", "--profile", str(path)],
        "--hf-token-file": ["fetch-model", "--out", prepared["bundle"], "--hf-token-file", str(path)],
    }[flag]
    monkeypatch.delenv("HF_TOKEN")
    assert_one_line(cli(*argv), 2)


def test_a_non_utf8_deployment_key_file_is_one_line(cli, sandbox, prepared) -> None:
    (Path(prepared["bundle"]) / "api_tokens.yml").write_bytes(NOT_UTF8)
    assert_one_line(cli("render", "--gpus", "1xH200", "--out", prepared["bundle"]), 2)


INVALID_URLS = [
    "http://",
    "https://",
    "http://[::1",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:abc",
    "http://exa mple.com",
    "http://127.0.0.1:5000/\n",
    "http://127.0.0.1:5000/v1?x=1#frag",
    "http://127.0.0.1:5000\x00",
    "http://\u2603.example:5000",
    "HTTP://127.0.0.1:5000\r\nX: y",
]


@pytest.mark.parametrize("url", INVALID_URLS)
@pytest.mark.parametrize("command", ["verify", "record", "cluster verify"])
def test_invalid_urls_are_one_line(url, command, cli, sandbox, prepared) -> None:
    argv = {
        "verify": ["verify", "--url", url],
        "record": ["reference", "record", "--url", url, "--out", prepared["out"] + ".json"],
        "cluster verify": ["cluster", "verify", "--inventory", prepared["fleet"], "--url", url],
    }[command]
    assert_one_line(cli(*argv), 2)


def _odd_outputs(sandbox) -> dict[str, str]:
    a_file = sandbox.work / "a-file"
    a_file.write_text("x")
    fifo = sandbox.work / "a-fifo"
    os.mkfifo(fifo)
    # A socket stands in for a device: not a regular file, and nothing on the host is at risk if a regression
    # renamed a report over it (a real /dev node would be replaced when the suite runs as root).
    sock = sandbox.work / "a-socket"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.close()
    return {
        "empty": "",
        "a folder": str(sandbox.work),
        "under a file": str(a_file / "sub"),
        "a fifo": str(fifo),
        "in /proc": "/proc/self/nope/out",
        "a socket": str(sock),
        "nul byte": str(sandbox.work / "x\x00y"),
    }


@pytest.mark.parametrize(
    "case", ["empty", "a folder", "under a file", "a fifo", "in /proc", "a socket", "nul byte"]
)
def test_odd_junit_paths_are_refused_before_any_request(case, cli, sandbox, honest_tabby) -> None:
    junit = _odd_outputs(sandbox)[case]
    seen = len(honest_tabby.seen)
    before = snapshot(sandbox.root)
    run = cli("verify", "--url", honest_tabby.url, "--api-key-file", str(sandbox.key_file), "--junit", junit)
    assert_one_line(run, 2)
    assert len(honest_tabby.seen) == seen and snapshot(sandbox.root) == before


@pytest.mark.parametrize(
    "case", ["empty", "a folder", "under a file", "a fifo", "in /proc", "a socket", "nul byte"]
)
@pytest.mark.parametrize("command", ["render", "record", "cluster render", "auto"])
def test_odd_out_paths_are_one_line_and_write_nothing(case, command, cli, sandbox, prepared) -> None:
    out = _odd_outputs(sandbox)[case]
    before = snapshot(sandbox.root)
    argv = {
        "render": ["render", "--gpus", "1xH200", "--out", out],
        "record": ["reference", "record", "--url", "http://127.0.0.1:9", "--out", out],
        "cluster render": ["cluster", "render", "--inventory", prepared["fleet"], "--out", out],
        "auto": ["auto", "--gpus", "1xH200", "--yes", "--no-gpu", "--out", out],
    }[command]
    run = cli(*argv)
    assert run.code in (2, 4) and len([line for line in run.err.splitlines() if line.strip()]) == 1, run.text
    assert snapshot(sandbox.root) == before


@pytest.mark.parametrize("broken", ["list", "missing keys", "wrong types", "not json"])
def test_a_broken_manifest_is_one_line(broken, cli, sandbox, prepared) -> None:
    manifest = Path(prepared["bundle"]) / "render.json"
    manifest.write_text(
        {
            "list": "[1, 2]",
            "missing keys": "{}",
            "not json": "{nope",
            "wrong types": '{"models_dir": 5, "model_folder": [], "port": "x", "bind": {}}',
        }[broken]
    )
    for command in ("fetch-model", "up", "status", "down", "logs"):
        assert_one_line(cli(command, "--out", prepared["bundle"]), 2)

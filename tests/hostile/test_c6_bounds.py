"""Class 6, bounded time and memory: overall deadlines on network work, size caps on every input.

Servers that trickle one byte every 2 s (body or headers), hang, answer with huge bodies or gzip bombs; input files
that are gzip bombs, sparse multi-GiB files, deeply nested JSON/YAML, FIFOs, devices or folders. Each ends in
bounded time and memory with one line: exit 5 for a server (a failed check), exit 2 for an input file, exit 4 for a
hub. These run as processes with a wall-clock limit (and a memory limit for the bombs), so a regression fails
instead of hanging or exhausting the suite.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.hostile.conftest import API_KEY, assert_one_line
from tests.hostile.servers import (
    Answer,
    HostileHub,
    HostileTabby,
    HubFile,
    gzip_bomb_answer,
    gzip_bomb_bytes,
    huge_json,
    json_bytes,
    trickle,
)

# A run against a stalling server must end within its deadline plus this (process start, imports, one poll).
SLACK_S = 12.0
MEMORY_GIB = 1.5


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """4 MiB of gzip that inflates to 4 GiB of zeros."""
    return gzip_bomb_bytes(4)


HEALTH = json_bytes({"status": "healthy", "issues": []})
STALLS = {
    "health body one byte every 2 s": {"/health": trickle(HEALTH, 2.0)},
    "health headers one byte every 2 s": {"/health": trickle(HEALTH, 2.0, headers_too=True)},
    "model card one byte every 2 s": {"/v1/model": trickle(json_bytes({"id": "tiny"}) * 50, 2.0)},
    "chat one byte every 2 s": {
        "/v1/chat/completions": trickle(b'{"choices": []}' * 50, 2.0, headers_too=True)
    },
}


@pytest.mark.parametrize("case", sorted(STALLS))
def test_verify_has_an_overall_deadline(case, deploy, sandbox, tmp_path) -> None:
    with HostileTabby(tmp_path / "server", API_KEY, raw=STALLS[case]) as server:
        run = deploy(
            "verify",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--timeout",
            "3",
            timeout=60,
        )
    assert run.code == 5 and run.seconds < 3 + SLACK_S, (run.seconds, run.text[-500:])
    assert "timed out" in run.out or "deadline" in run.out


def test_the_kl_phase_is_inside_the_deadline(deploy, sandbox, reference_file, tmp_path) -> None:
    raw = {"/v1/completions": trickle(b'{"choices": []}' * 100, 2.0)}
    with HostileTabby(tmp_path / "server", API_KEY, raw=raw) as server:
        run = deploy(
            "verify",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--reference",
            str(reference_file),
            "--timeout",
            "5",
            timeout=60,
        )
    assert run.code == 5 and run.seconds < 5 + SLACK_S, run.seconds


def test_wait_is_bounded_against_a_hanging_server(deploy, sandbox, tmp_path) -> None:
    hang = {path: trickle(HEALTH, 30.0, headers_too=True) for path in ("/health", "/v1/model")}
    with HostileTabby(tmp_path / "server", API_KEY, raw=hang) as server:
        run = deploy(
            "verify",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--wait",
            "2",
            timeout=90,
        )
    assert run.code == 5 and run.seconds < 2 + SLACK_S, run.seconds


def test_record_has_an_overall_deadline_and_writes_nothing(deploy, sandbox, prompts_file, tmp_path) -> None:
    raw = {"/v1/token/encode": trickle(json_bytes({"tokens": [1, 2, 3]}) * 20, 2.0)}
    out = sandbox.work / "ref.json.gz"
    with HostileTabby(tmp_path / "server", API_KEY, raw=raw) as server:
        run = deploy(
            "reference",
            "record",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--out",
            str(out),
            "--prompts",
            str(prompts_file),
            "--timeout",
            "3",
            timeout=60,
        )
    assert run.code == 5 and run.seconds < 3 + SLACK_S and not out.exists(), (run.seconds, run.text[-500:])


def test_cluster_verify_has_an_overall_deadline(deploy, sandbox, tmp_path) -> None:
    with HostileTabby(tmp_path / "server", API_KEY, raw={"/health": trickle(HEALTH, 2.0)}) as server:
        fleet = sandbox.work / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"nodes": [{"name": "gpu-a", "gpus": "1xH200", "url": server.url}]}))
        run = deploy(
            "cluster",
            "verify",
            "--inventory",
            str(fleet),
            "--no-endpoint",
            "--api-key-file",
            str(sandbox.key_file),
            "--timeout",
            "3",
            timeout=60,
        )
    assert run.code == 5 and run.seconds < 3 + SLACK_S, run.seconds


BIG_ANSWERS = {
    "huge health": lambda bomb: {"/health": huge_json(80)},
    "huge model card": lambda bomb: {"/v1/model": huge_json(80, "id")},
    "gzip bomb health": lambda bomb: {"/health": gzip_bomb_answer(bomb)},
    "gzip bomb model card": lambda bomb: {"/v1/model": gzip_bomb_answer(bomb)},
    "gzip bomb chat": lambda bomb: {"/v1/chat/completions": gzip_bomb_answer(bomb)},
    "endless body": lambda bomb: {
        "/health": Answer(body=b'{"status": "' + b"A" * (300 << 20), content_length=False)
    },
}


@pytest.mark.parametrize("case", sorted(BIG_ANSWERS))
def test_answers_are_size_capped_compressed_and_inflated(case, deploy, sandbox, bomb, tmp_path) -> None:
    with HostileTabby(tmp_path / "server", API_KEY, raw=BIG_ANSWERS[case](bomb)) as server:
        run = deploy(
            "verify",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--json",
            timeout=120,
            memory_gib=MEMORY_GIB,
        )
    assert run.code == 5, run.text[-1000:]
    report = json.loads(run.out)
    assert any("larger than" in check["detail"] for check in report["checks"]), report["checks"]


def _sparse(path: Path, gib: int = 8) -> Path:
    with path.open("wb") as handle:
        handle.truncate(gib << 30)
    return path


def _nested_json(depth: int = 200_000) -> str:
    return "[" * depth + "]" * depth


def _nested_yaml(depth: int = 50_000) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


# (subcommand argv with {file}, how to make the hostile input)
INPUTS = {
    "--api-key-file": ["verify", "--url", "http://127.0.0.1:9", "--api-key-file", "{file}"],
    "--reference": ["verify", "--url", "http://127.0.0.1:9", "--reference", "{file}"],
    "--plan": ["render", "--plan", "{file}", "--out", "{out}"],
    "--inventory": ["cluster", "plan", "--inventory", "{file}"],
    "--prompts": [
        "reference",
        "record",
        "--url",
        "http://127.0.0.1:9",
        "--prompts",
        "{file}",
        "--out",
        "{out}.json",
    ],
    "--detect-json": ["node-config", "--detect-json", "{file}", "--node", "gpu-a"],
    "--profile": ["plan", "--gpus", "2xH200", "--profile", "{file}"],
}


def _make(kind: str, folder: Path, bomb: bytes, flag: str) -> Path:
    suffix = {
        "--reference": ".json.gz" if kind == "gzip bomb" else ".json",
        "--profile": ".yaml",
        "--inventory": ".yaml",
        "--prompts": ".yaml",
    }.get(flag, ".json")
    path = folder / f"input{suffix}"
    if kind == "gzip bomb":
        path.write_bytes(bomb)
    elif kind == "sparse 8 GiB":
        _sparse(path)
    elif kind == "deep nesting":
        yaml_like = flag in ("--inventory", "--prompts", "--profile", "--api-key-file")
        path.write_text(_nested_yaml() if yaml_like else _nested_json())
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "/dev/zero":
        return Path("/dev/zero")
    return path


KINDS = ["sparse 8 GiB", "deep nesting", "fifo", "folder", "/dev/zero"]
CASES = [(flag, kind) for flag in sorted(INPUTS) for kind in KINDS] + [("--reference", "gzip bomb")]


@pytest.mark.parametrize("flag,kind", CASES)
def test_hostile_input_files_are_refused_in_bounded_time_and_memory(
    flag, kind, deploy, sandbox, bomb
) -> None:
    path = _make(kind, sandbox.work, bomb, flag)
    out = sandbox.work / "out"
    argv = [a.format(file=path, out=out) for a in INPUTS[flag]]
    run = deploy(*argv, timeout=60, memory_gib=MEMORY_GIB)
    line = assert_one_line(run, 2)
    assert str(path) in line or flag in line, line
    assert not out.exists() and not Path(f"{out}.json").exists()


def test_a_hub_token_file_that_is_a_fifo_is_refused(deploy, cli, sandbox) -> None:
    out = sandbox.work / "bundle"
    assert cli("render", "--gpus", "1xH200", "--out", str(out)).code == 0
    fifo = sandbox.work / "token"
    os.mkfifo(fifo)
    assert_one_line(deploy("fetch-model", "--out", str(out), "--hf-token-file", str(fifo), timeout=60), 2)


def test_a_plan_on_stdin_is_size_capped(deploy, sandbox) -> None:
    out = sandbox.work / "bundle"
    stdin = b"{" + b" " * (300 << 20)
    run = deploy("render", "--plan", "-", "--out", str(out), stdin=stdin, timeout=60, memory_gib=MEMORY_GIB)
    assert_one_line(run, 2)
    assert not out.exists()


def test_a_huge_hub_listing_is_refused_in_bounded_time(deploy, cli, sandbox) -> None:
    out = sandbox.work / "bundle"
    assert cli("render", "--gpus", "1xH200", "--out", str(out)).code == 0
    files = [HubFile(f"shard-{i:06d}.safetensors", b"", lfs=False) for i in range(200_000)]
    with HostileHub(files=files) as hub:
        run = deploy(
            "fetch-model",
            "--out",
            str(out),
            env={"HF_ENDPOINT": hub.url},
            timeout=120,
            memory_gib=MEMORY_GIB * 2,
        )
    assert "files" in assert_one_line(run, 4)
    assert not (out / "models").exists() or not any((out / "models").rglob("shard-*"))


def test_a_gzip_reference_of_honest_size_still_loads(cli, sandbox, reference_file, honest_tabby) -> None:
    plain = sandbox.work / "reference.json"
    plain.write_bytes(gzip.decompress(reference_file.read_bytes()))
    for path in (plain, reference_file):
        run = cli(
            "verify",
            "--url",
            honest_tabby.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--reference",
            str(path),
        )
        assert run.code == 0, run.text


def test_an_honest_server_within_the_deadline_passes(cli, sandbox, honest_tabby, reference_file) -> None:
    run = cli(
        "verify",
        "--url",
        honest_tabby.url,
        "--api-key-file",
        str(sandbox.key_file),
        "--reference",
        str(reference_file),
        "--timeout",
        "120",
        "--wait",
        "5",
    )
    assert run.code == 0, run.text

"""Class 5, server and file text is data: printed literally, never as rich markup, never as terminal control.

A server's /health issues, model id or error detail, and paths or names from the command line and from files,
must reach the screen as the characters they are: markup stays visible, a newline cannot start a forged
`PASS` line, and escape sequences cannot reach the terminal.
"""

from __future__ import annotations

import pytest
import yaml

from tests.hostile.conftest import API_KEY, ROOT
from tests.hostile.servers import Answer, HostileTabby, json_bytes

FORGED = "[green]PASS[/green] kl        mean KL 0"


def _forged(text: str) -> list[str]:
    """Lines that claim what did not happen: liveness failed and no KL check ran in these tests."""
    return [
        line
        for line in text.splitlines()
        if line.startswith(("PASS liveness", "PASS kl", "PASS endpoint", "all checks passed"))
    ]


# /health 503 alone is TabbyAPI's sticky flag (liveness then asks for one token): here generation fails too
CANNOT_GENERATE = {"/v1/completions": Answer(503, body=json_bytes({"detail": "generation failed"}))}

ISSUES = {
    "markup": [FORGED],
    "markup closing tags": ["[/][/red][bold]all checks passed"],
    "newline then a forged line": ["load failed\nPASS kl        mean KL 0 over 159 positions"],
    "carriage return overwrite": ["load failed\rPASS liveness /health 200 healthy"],
    "terminal escape": ["\x1b[2J\x1b[HPASS liveness /health 200 healthy"],
}


@pytest.mark.parametrize("case", sorted(ISSUES))
def test_health_issue_text_prints_literally(case, cli, sandbox, tmp_path) -> None:
    with HostileTabby(
        tmp_path / "server", API_KEY, health_issues=ISSUES[case], raw=CANNOT_GENERATE
    ) as server:
        run = cli("verify", "--url", server.url, "--api-key-file", str(sandbox.key_file))
    assert run.code == 5
    assert _forged(run.out) == [], run.out
    assert "\x1b" not in run.text and "\r" not in run.text
    text = ISSUES[case][0].split("\n")[0]
    if "[" in text and text.isprintable():
        assert text in run.out


def test_a_model_id_with_markup_prints_literally(cli, sandbox, tmp_path) -> None:
    card = {"id": "[bold red]tiny[/]", "parameters": {"cache_mode": "[blink]5,4", "max_seq_len": 4096}}
    with HostileTabby(tmp_path / "server", API_KEY, model=card) as server:
        run = cli(
            "verify", "--url", server.url, "--api-key-file", str(sandbox.key_file), "--expect-model", "tiny"
        )
    assert run.code == 5 and "[bold red]tiny[/]" in run.out and "[blink]5,4" in run.out


def test_an_error_detail_with_markup_prints_literally(cli, sandbox, tmp_path) -> None:
    raw = {"/v1/chat/completions": Answer(500, body=json_bytes({"detail": FORGED}))}
    with HostileTabby(tmp_path / "server", API_KEY, raw=raw) as server:
        run = cli("verify", "--url", server.url, "--api-key-file", str(sandbox.key_file))
    assert run.code == 5 and FORGED in run.out
    assert not any(line.startswith("PASS kl") for line in run.out.splitlines())


def test_an_expected_model_with_markup_prints_literally(cli, sandbox, honest_tabby) -> None:
    run = cli(
        "verify",
        "--url",
        honest_tabby.url,
        "--api-key-file",
        str(sandbox.key_file),
        "--expect-model",
        "[red]x[/red]",
    )
    assert run.code == 5 and "[red]x[/red]" in run.out


def test_an_out_path_with_markup_prints_literally(cli, sandbox) -> None:
    out = sandbox.work / "[bold]bundle[/bold]"
    run = cli("render", "--gpus", "1xH200", "--out", str(out), "--models-dir", "/srv/models")
    assert run.code == 0 and str(out) in run.out


def test_a_profile_display_name_with_markup_prints_literally(cli, sandbox) -> None:
    data = yaml.safe_load((ROOT / "profiles" / "glm-4.7.yaml").read_text())
    data["display_name"] = "[red]GLM[/red] \x1b[31mred"
    path = sandbox.work / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    run = cli("plan", "--profile", str(path), "--gpus", "2xH200")
    assert run.code == 0 and "[red]GLM[/red]" in run.out and "\x1b" not in run.out


def test_cluster_verify_prints_server_text_literally(cli, sandbox, tmp_path) -> None:
    with HostileTabby(
        tmp_path / "server", API_KEY, health_issues=[FORGED + "\nPASS endpoint"], raw=CANNOT_GENERATE
    ) as server:
        fleet = sandbox.work / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"nodes": [{"name": "gpu-a", "gpus": "1xH200", "url": server.url}]}))
        run = cli(
            "cluster",
            "verify",
            "--inventory",
            str(fleet),
            "--no-endpoint",
            "--api-key-file",
            str(sandbox.key_file),
        )
    assert run.code == 5 and _forged(run.out) == [] and "[green]PASS[/green]" in run.out

"""Class 2, keys never leave their file: not in any output, report, reference or written file; not on curl's argv.

Keys an HTTP client cannot send (control characters, non-ASCII) are refused without being echoed; servers that
reflect the key back (in an error detail, a model id) see it redacted everywhere; URL credentials
(`http://user:pass@host`) are refused without being echoed or stored; the printed curl line reads the key from a
0600 header file (`-H @file`), so it never appears on a command line.
"""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.hostile.conftest import API_KEY, HF_TOKEN, assert_one_line, files_holding
from tests.hostile.servers import Answer, Canary, HostileHub, HostileTabby, free_port, json_bytes

PASSWORD = "s3cretPassw0rdCanary"

BAD_KEY_FILES = {
    "NUL inside": (API_KEY + "\x00tail\n").encode(),
    "escape inside": (API_KEY + "\x1b[2Jtail\n").encode(),
    "non-ASCII": (API_KEY + "é\n").encode(),
    "yaml key with a newline": yaml.safe_dump({"api_key": API_KEY + "\nX-Injected: 1"}).encode(),
    "yaml key with a carriage return": yaml.safe_dump({"api_key": API_KEY + "\rX"}).encode(),
    "yaml key list with a tab": yaml.safe_dump({"api_key": [API_KEY + "\tx"]}).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_KEY_FILES))
def test_a_key_http_cannot_carry_is_refused_without_echo(case, cli, sandbox, tmp_path) -> None:
    key_file = sandbox.root / "bad-key"
    key_file.write_bytes(BAD_KEY_FILES[case])
    junit = sandbox.work / "junit.xml"
    with Canary() as server:
        run = cli("verify", "--url", server.url, "--api-key-file", str(key_file), "--junit", str(junit))
        assert not server.seen, "a request went out with a key the client cannot send"
    assert_one_line(run, 2)
    assert files_holding(sandbox.root, skip=(key_file, sandbox.key_file, sandbox.token_file)) == []


def test_a_bad_key_in_the_environment_is_refused_without_echo(cli, sandbox, monkeypatch) -> None:
    monkeypatch.setenv("DEPLOY_API_KEY", API_KEY + "\x1b[2Jx")
    with Canary() as server:
        run = cli("verify", "--url", server.url, "--json")
        assert not server.seen
    assert_one_line(run, 2)


REFLECTED = {
    "/v1/model 401 detail": {
        "/v1/model": Answer(401, body=json_bytes({"detail": f"Invalid API key {API_KEY}"}))
    },
    "/v1/model 500 text": {
        "/v1/model": Answer(
            500, headers=(("Content-Type", "text/plain"),), body=f"bad key {API_KEY}".encode()
        )
    },
    "chat error detail": {
        "/v1/chat/completions": Answer(
            400, body=json_bytes({"detail": [{"msg": f"key {API_KEY} is not allowed here"}]})
        )
    },
    # /health 503 alone is TabbyAPI's sticky flag (liveness then asks for one token): that fails here too
    "health issue": {
        "/health": Answer(503, body=json_bytes({"issues": [{"description": f"auth {API_KEY}"}]})),
        "/v1/completions": Answer(503, body=json_bytes({"detail": f"generation failed for {API_KEY}"})),
    },
    "model id": {
        "/v1/model": Answer(body=json_bytes({"id": API_KEY, "parameters": {"cache_mode": API_KEY}}))
    },
}


@pytest.mark.parametrize("case", sorted(REFLECTED))
@pytest.mark.parametrize("form", ["text", "json"])
def test_a_server_reflecting_the_key_never_gets_it_printed_or_written(
    case, form, cli, sandbox, reference_file, tmp_path
) -> None:
    junit = sandbox.work / "report.xml"
    with HostileTabby(tmp_path / "server", API_KEY, raw=REFLECTED[case]) as server:
        run = cli(
            "verify",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--reference",
            str(reference_file),
            "--junit",
            str(junit),
            "--expect-model",
            "tiny",
            *(["--json"] if form == "json" else []),
        )
    assert run.code == 5
    if form == "json":
        json.loads(run.out)
    assert junit.is_file() and files_holding(sandbox.root, skip=(sandbox.key_file, sandbox.token_file)) == []


def test_a_reference_never_stores_a_reflected_key(cli, sandbox, prompts_file, tmp_path) -> None:
    card = {"id": f"model-{API_KEY}", "parameters": {"cache_mode": "5,4", "max_seq_len": 4096}}
    out = sandbox.work / "ref.json"
    with HostileTabby(tmp_path / "server", API_KEY, model=card) as server:
        run = cli(
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
        )
    assert run.code in (0, 5)
    assert files_holding(sandbox.root, skip=(sandbox.key_file, sandbox.token_file)) == []


USERINFO_URLS = [
    f"http://user:{PASSWORD}@127.0.0.1:{{port}}",
    f"http://{PASSWORD}@127.0.0.1:{{port}}/",
    f"https://admin:{PASSWORD}@localhost:{{port}}/v1",
]


@pytest.mark.parametrize("template", USERINFO_URLS)
@pytest.mark.parametrize("command", ["verify", "record", "cluster verify"])
def test_url_credentials_are_refused_never_echoed_or_stored(
    template, command, cli, sandbox, tmp_path
) -> None:
    with Canary() as server:
        url = template.format(port=server.url.rsplit(":", 1)[1])
        if command == "verify":
            run = cli("verify", "--url", url, "--json", "--junit", str(sandbox.work / "j.xml"))
        elif command == "record":
            run = cli("reference", "record", "--url", url, "--out", str(sandbox.work / "ref.json"))
        else:
            fleet = sandbox.work / "fleet.yaml"
            fleet.write_text(yaml.safe_dump({"nodes": [{"name": "gpu-a", "gpus": "1xH200"}]}))
            run = cli(
                "cluster",
                "verify",
                "--inventory",
                str(fleet),
                "--url",
                url,
                "--api-key-file",
                str(sandbox.key_file),
            )
        assert not server.seen
    assert_one_line(run, 2)
    assert PASSWORD not in run.text
    assert files_holding(sandbox.root, (PASSWORD,)) == []


def test_fleet_node_url_credentials_are_never_echoed(cli, sandbox) -> None:
    fleet = sandbox.work / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {"nodes": [{"name": "gpu-a", "gpus": "1xH200", "url": f"http://ops:{PASSWORD}@10.0.0.5:5000"}]}
        )
    )
    run = cli("cluster", "plan", "--inventory", str(fleet))
    assert_one_line(run, 2)
    assert PASSWORD not in run.text


def test_the_curl_line_reads_the_key_from_a_0600_header_file(cli, sandbox, tmp_path) -> None:
    out = sandbox.work / "bundle"
    run = cli("render", "--gpus", "1xH200", "--out", str(out), "--port", str(free_port()))
    assert run.code == 0
    key = yaml.safe_load((out / "api_tokens.yml").read_text())["api_key"]
    curl = next(line.strip() for line in run.out.splitlines() if line.strip().startswith("then: curl "))
    command = curl.removeprefix("then: ")
    argv = shlex.split(command)
    assert key not in command and "$(" not in command and "`" not in command
    header_arg = next(a for a in argv if a.startswith("@"))
    assert argv[argv.index(header_arg) - 1] == "-H"
    header_file = Path(header_arg[1:])
    assert header_file.parent == out
    assert stat.S_IMODE(header_file.stat().st_mode) == 0o600
    assert header_file.read_text() == f"X-API-Key: {key}\n"
    with HostileTabby(tmp_path / "server", key) as server:
        argv = [server.url + a[a.index("/v1/") :] if a.startswith("http://") else a for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["choices"][0]["message"]


@pytest.mark.parametrize("status", [401, 403, 500])
def test_hub_reflecting_the_token_never_gets_it_printed(status, deploy, sandbox) -> None:
    out = sandbox.work / "bundle"
    assert deploy("render", "--gpus", "1xH200", "--out", str(out)).code == 0
    with HostileHub(error=(status, f"Invalid token {HF_TOKEN} for this repo")) as hub:
        run = deploy("fetch-model", "--out", str(out), env={"HF_ENDPOINT": hub.url})
        assert any(s.headers.get("authorization") == f"Bearer {HF_TOKEN}" for s in hub.seen)
    assert run.code in (2, 4)
    assert files_holding(sandbox.root, (HF_TOKEN,), skip=(sandbox.token_file,)) == []


def test_a_hub_redirect_never_carries_the_token_elsewhere(deploy, sandbox) -> None:
    out = sandbox.work / "bundle"
    assert deploy("render", "--gpus", "1xH200", "--out", str(out)).code == 0
    with Canary() as elsewhere, HostileHub(redirect_to=elsewhere.url) as hub:
        run = deploy("fetch-model", "--out", str(out), env={"HF_ENDPOINT": hub.url})
        assert hub.seen
        assert not any(HF_TOKEN in value for s in elsewhere.seen for value in s.headers.values())
    assert run.code in (2, 4)

"""Class 3, files: nothing outside the deployment is touched, and nothing half-written is left behind.

File names from a hub, render.json, the state file or a plan are validated before any file operation; `down
--purge` deletes only the model folder glm-deploy downloaded and the key files it wrote; `deploy auto` never
overwrites a folder it did not render and writes nothing before its preflight passes; re-rendering onto an
occupied path is refused whole (one line, exit 2, every file as it was).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hostile.conftest import ORIGINAL_DOCKER_HOST, assert_one_line, snapshot
from tests.hostile.servers import HostileHub, HubFile

VICTIM_TEXT = "precious data, not glm-deploy's\n"


def _victim(sandbox) -> Path:
    victim = sandbox.root / "victim"
    victim.write_text(VICTIM_TEXT)
    return victim


def _render(cli, out: Path, *extra: str) -> None:
    assert cli("render", "--gpus", "1xH200", "--out", str(out), *extra).code == 0


TRAVERSALS = {
    "dot-dot": "../../../../victim",
    "dot-dot inside": "weights/../../../../../victim",
    "absolute": "{victim}",
    "dot-dot segment only": "..",
    "empty segment": "weights//x.safetensors",
    "trailing newline": "config.json\n",
}


@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_hub_file_names_outside_the_model_folder_are_refused(case, deploy, cli, sandbox) -> None:
    victim = _victim(sandbox)
    out = sandbox.work / "bundle"
    _render(cli, out)
    before = snapshot(sandbox.root)
    name = TRAVERSALS[case].format(victim=victim)
    files = [HubFile("config.json", b"{}"), HubFile(name, b"x" * 32, lfs=True)]
    with HostileHub(files=files) as hub:
        run = deploy("fetch-model", "--out", str(out), env={"HF_ENDPOINT": hub.url})
    line = assert_one_line(run, 4)
    assert "file name" in line
    assert victim.read_text() == VICTIM_TEXT
    after = snapshot(sandbox.root)
    assert {
        path for path in after if path not in before and not path.startswith("work/bundle/models")
    } == set()


def _tamper(out: Path, name: str, **changes: object) -> None:
    path = out / name
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_purge_with_a_model_folder_escaping_the_models_dir_is_refused(cli, sandbox) -> None:
    victim_dir = sandbox.root / "victim-dir"
    victim_dir.mkdir()
    (victim_dir / "keep").write_text(VICTIM_TEXT)
    out = sandbox.work / "bundle"
    _render(cli, out)
    _tamper(out, "render.json", model_folder="../../../victim-dir")
    run = cli("down", "--out", str(out), "--purge")
    assert_one_line(run, 2)
    assert (victim_dir / "keep").read_text() == VICTIM_TEXT


@pytest.fixture()
def real_engine(docker_client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Docker engine (`down` finds no container for the sandbox bundle and goes on to the purge)."""
    if ORIGINAL_DOCKER_HOST is None:
        monkeypatch.delenv("DOCKER_HOST")
    else:
        monkeypatch.setenv("DOCKER_HOST", ORIGINAL_DOCKER_HOST)


@pytest.mark.docker
def test_purge_deletes_only_a_folder_glm_deploy_downloaded(cli, sandbox, real_engine) -> None:
    elsewhere = sandbox.root / "elsewhere"
    quant_dir = elsewhere / "3.15bpw-tuned"
    quant_dir.mkdir(parents=True)
    (quant_dir / "keep").write_text(VICTIM_TEXT)
    out = sandbox.work / "bundle"
    _render(cli, out, "--models-dir", str(elsewhere))
    assert_one_line(cli("down", "--out", str(out), "--purge"), 2)
    assert (quant_dir / "keep").read_text() == VICTIM_TEXT


@pytest.mark.docker
def test_purge_still_deletes_a_completed_download(cli, sandbox, real_engine) -> None:
    out = sandbox.work / "bundle"
    _render(cli, out)
    render = json.loads((out / "render.json").read_text())
    quant_dir = out / "models" / render["model_folder"]
    quant_dir.mkdir(parents=True)
    (quant_dir / "config.json").write_text("{}")
    marker = {
        "repo": render["hf_repo"],
        "revision": render["quant"],
        "commit": "0" * 40,
        "files": {"config.json": 2},
    }
    (quant_dir / ".glm-deploy-complete.json").write_text(json.dumps(marker))
    assert cli("down", "--out", str(out), "--purge").code == 0
    assert not quant_dir.exists() and not (out / "api_tokens.yml").exists()


@pytest.mark.parametrize(
    "name", ["../../victim", "/{victim}", "api_tokens.yml/../../../victim", "deploy-state.json"]
)
def test_purge_with_a_foreign_key_file_name_is_refused(name, cli, sandbox) -> None:
    victim = _victim(sandbox)
    out = sandbox.work / "bundle"
    _render(cli, out)
    _tamper(out, "render.json", api_tokens=name.format(victim=str(victim).lstrip("/")))
    run = cli("down", "--out", str(out), "--purge")
    assert_one_line(run, 2)
    assert victim.read_text() == VICTIM_TEXT


@pytest.mark.parametrize(
    "field,value",
    [
        ("container_name", "someone-elses-container"),
        ("container_name", "glm-deploy-0123456789\n"),
        ("out_dir", "/etc"),
        ("port", "5000; rm -rf /"),
    ],
)
def test_a_tampered_state_file_is_bad_input(field, value, cli, sandbox) -> None:
    out = sandbox.work / "bundle"
    _render(cli, out)
    state = {
        "out_dir": str(out),
        "container_name": "glm-deploy-0123456789",
        "container_id": "abc",
        "image": "glm-deploy/tabbyapi:x",
        "image_id": "sha256:0",
        "config_sha256": "0",
        "bind": "127.0.0.1",
        "port": 5000,
        "model_id": "3.15bpw-tuned",
        "gpu": True,
        "plan_sha256": "",
    }
    state[field] = value
    (out / "deploy-state.json").write_text(json.dumps(state))
    run = cli("down", "--out", str(out))
    assert "deploy-state.json" in assert_one_line(run, 2)


def test_auto_never_overwrites_a_folder_it_did_not_render(cli, sandbox) -> None:
    out = sandbox.work / "mine"
    out.mkdir()
    (out / "Dockerfile").write_text("FROM scratch\n# my own\n")
    (out / "config.yml").write_text("mine: true\n")
    before = snapshot(out)
    run = cli("auto", "--gpus", "1xH200", "--out", str(out), "--yes", "--no-gpu")
    assert_one_line(run, 2)
    assert snapshot(out) == before


def test_auto_writes_nothing_before_its_preflight_passes(cli, sandbox) -> None:
    out = sandbox.work / "fresh"
    before = snapshot(sandbox.root)
    run = cli("auto", "--gpus", "1xH200", "--out", str(out), "--yes", "--no-gpu")
    assert_one_line(run, 4)
    assert not out.exists() and snapshot(sandbox.root) == before


@pytest.mark.parametrize("occupied", ["config.yml", "compose.yaml", "render.json", "api_tokens.yml"])
def test_rerender_onto_an_occupied_path_is_refused_whole(occupied, cli, sandbox) -> None:
    out = sandbox.work / "bundle"
    _render(cli, out)
    target = out / occupied
    target.unlink()
    target.mkdir()
    (target / "inside").write_text("x")
    before = snapshot(sandbox.root)
    run = cli("render", "--gpus", "2xH200", "--out", str(out), "--force")
    assert_one_line(run, 2)
    assert snapshot(sandbox.root) == before


def test_a_symlinked_key_file_is_not_read_as_the_deployment_key(cli, sandbox) -> None:
    outside = sandbox.root / "outside-keys.yml"
    outside.write_text("api_key: " + "a" * 32 + "\nadmin_key: " + "b" * 32 + "\n")
    out = sandbox.work / "bundle"
    out.mkdir()
    (out / "api_tokens.yml").symlink_to(outside)
    run = cli("render", "--gpus", "1xH200", "--out", str(out), "--force")
    assert_one_line(run, 2)
    assert outside.read_text().startswith("api_key: aaaa")


def test_rerender_replaces_a_symlink_not_its_target(cli, sandbox) -> None:
    victim = _victim(sandbox)
    out = sandbox.work / "bundle"
    _render(cli, out)
    (out / "config.yml").unlink()
    (out / "config.yml").symlink_to(victim)
    assert cli("render", "--gpus", "2xH200", "--out", str(out), "--force").code == 0
    assert victim.read_text() == VICTIM_TEXT and not (out / "config.yml").is_symlink()

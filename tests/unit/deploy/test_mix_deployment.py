"""A deployment of a mix without Docker: render -> fetch-model (both branches from the fake hub, a test double of
Hugging Face, through HF_ENDPOINT) -> mix-model (exllamav3's assembly by a local Python with the exllamav3 TEST
DOUBLE) -> what up and the reference read, through the real `deploy` CLI. The image runner is tested on the real
engine in tests/docker/test_deploy.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hf_hub import FakeHub, FakeRepo
from tests.unit.quant.conftest import DOUBLE_DIR
from tests.unit.quant.exl3_folders import MIX_LOWER, MIX_UPPER, mix_branches, read_tensor
from toolkit.deploy.deployment import load_deployment
from toolkit.deploy.mix_step import model_marker
from toolkit.deploy.retry import replan
from toolkit.deploy.steps import check_model_in_place, model_folders
from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import EnvironmentMissing
from toolkit.facts.layout import MODEL_MARKER
from toolkit.facts.profiles import load_profile
from toolkit.plan.memory import weights_bytes
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import make_plan
from toolkit.quant.mix import MIX_MANIFEST
from toolkit.quant.storage import read_storage
from toolkit.render.bundle import RenderOptions, render_bundle

ROOT = Path(__file__).resolve().parents[3]
REPO = "mratsim/GLM-4.7-EXL3"
SPEC = f"mix:{MIX_LOWER}+{MIX_UPPER}@110"
NAME = f"mix-{MIX_LOWER}-{MIX_UPPER}-110GiB"


def _render(out: Path, models: Path, context: int = 65536) -> None:
    plan = make_plan(
        load_profile("glm-4.7"), parse_gpu_spec("1x144GiB"), PlanRequest(quant=SPEC, context=context)
    )
    render_bundle(
        plan, out, RenderOptions(port=5123, models_dir=str(models), gpu_reservation=False, force=True)
    )


NO_HUB = "http://127.0.0.1:9"  # for commands that must not need the hub


def _deploy(hub_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_TOKEN": "",
        "HF_HUB_DISABLE_XET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(DOUBLE_DIR)]),
    }
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _shards_served(hub: FakeHub) -> int:
    """How many shard files the fake hub has sent (from itself or its storage server)."""
    return sum(
        1 for r in hub.requests if r.method == "GET" and str(r.file).endswith(".safetensors") and r.content
    )


def _json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_render_names_the_mix_and_load_deployment_checks_it(tmp_path: Path) -> None:
    out, models = tmp_path / "out", tmp_path / "models"
    _render(out, models)
    dep = load_deployment(out)
    assert dep.model_folder == NAME and dep.model_dir == models / NAME
    assert dep.plan.mix is not None and dep.manifest["mix"] == json.loads(json.dumps(dep.plan.mix.to_dict()))
    assert f"model_name: {NAME}\n" in (out / "config.yml").read_text()
    assert f"/app/models/{NAME}" in (out / "compose.yaml").read_text()
    assert model_folders(dep) == [models / NAME, models / MIX_LOWER, models / MIX_UPPER]
    manifest = json.loads((out / "render.json").read_text())
    manifest["mix"]["upper"] = "3bpw_H6"
    (out / "render.json").write_text(json.dumps(manifest))
    refused = _deploy(NO_HUB, "fetch-model", "--out", str(out))
    assert refused.returncode == 2 and "mix is not the plan's mix" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_out_of_memory_retry_keeps_the_mix(tmp_path: Path) -> None:
    out, models = tmp_path / "out", tmp_path / "models"
    _render(out, models, context=131072)
    again = replan(load_deployment(out), 65536)
    assert again.plan.mix == load_deployment(out).plan.mix and again.plan.quant == NAME
    assert again.plan.context == 65536


def test_fetch_then_mix_then_the_model_is_in_place(tmp_path: Path) -> None:
    out, models = tmp_path / "out", tmp_path / "models"
    _render(out, models)
    branches = mix_branches(tmp_path / "hub")
    with FakeHub([FakeRepo(REPO, branches)]) as hub:
        with pytest.raises(EnvironmentMissing) as missing:  # what up and the reference step ask first
            check_model_in_place(load_deployment(out))
        assert "`deploy fetch-model" in missing.value.line() and "`deploy mix-model" in missing.value.line()
        fetched = _json(_deploy(hub.url, "fetch-model", "--out", str(out), "--json"))
        assert fetched["mix"] == NAME and not fetched["mix_in_place"]
        sources = {s["revision"]: s for s in fetched["sources"]}
        assert set(sources) == {MIX_LOWER, MIX_UPPER}
        for branch, source in sources.items():
            assert source["commit"] == hub.repos[REPO].commit(branch)
            marker = json.loads((models / branch / MODEL_MARKER).read_text())
            assert marker["commit"] == source["commit"]
        mixed = _json(_deploy(hub.url, "mix-model", "--out", str(out), "--python", sys.executable, "--json"))
        assert mixed["path"] == str(models / NAME) and not mixed["reused"] and mixed["test_double"]
        assert [s["commit"] for s in mixed["sources"]] == [
            sources[MIX_LOWER]["commit"],
            sources[MIX_UPPER]["commit"],
        ]
        assert mixed["recipe"]["sha256"] == load_deployment(out).plan.mix.recipe_sha256  # type: ignore[union-attr]
        lower, upper = read_storage(models / MIX_LOWER), read_storage(models / MIX_UPPER)
        # 110 GiB at its share of the way between the branches as exllamav3 stores GLM-4.7's (the memory model)
        arch = load_profile("glm-4.7").architecture
        low, high = (weights_bytes(arch, load_profile("glm-4.7").quant(b)) for b in (MIX_LOWER, MIX_UPPER))
        share = (110 * 2**30 - low) / (high - low)
        assert mixed["target_bytes"] == lower.vram_bytes + int(share * (upper.vram_bytes - lower.vram_bytes))
        assert lower.vram_bytes < mixed["actual_bytes"] <= mixed["target_bytes"]
        manifest = json.loads((models / NAME / MIX_MANIFEST).read_text())
        assert set(manifest["modules"].values()) == {MIX_LOWER, MIX_UPPER}
        for key, source in manifest["modules"].items():
            for tensor in lower.modules[key].shapes:
                assert read_tensor(models / NAME, tensor) == read_tensor(models / source, tensor)

        marker = model_marker(load_deployment(out))
        assert marker is not None and marker["revision"] == NAME and marker["commit"] == manifest["key"]
        again = _json(_deploy(hub.url, "mix-model", "--out", str(out), "--python", sys.executable, "--json"))
        assert again["reused"] and again["key"] == manifest["key"]
        served = _shards_served(hub)
        assert _json(_deploy(hub.url, "fetch-model", "--out", str(out), "--json"))["mix_in_place"]
        assert _shards_served(hub) == served  # nothing downloaded again
    # the branches may go once the mix is in place: it stays usable, and mix-model keeps it
    for branch in (MIX_LOWER, MIX_UPPER):
        (models / branch / MODEL_MARKER).unlink()
    assert model_marker(load_deployment(out)) is not None
    kept = _deploy(NO_HUB, "mix-model", "--out", str(out), "--python", sys.executable)
    assert kept.returncode == 0 and "mix reused" in kept.stdout and "keeping the mix in place" in kept.stderr
    # a shard gone from the mix: it is no longer in place
    next((models / NAME).glob("*.safetensors")).unlink()
    assert model_marker(load_deployment(out)) is None


def test_branches_of_two_codebooks_are_refused_before_their_shards_are_downloaded(tmp_path: Path) -> None:
    out, models = tmp_path / "out", tmp_path / "models"
    _render(out, models)
    with FakeHub([FakeRepo(REPO, mix_branches(tmp_path / "hub", upper_codebook="mul1"))]) as hub:
        refused = _deploy(hub.url, "fetch-model", "--out", str(out))
        assert not _shards_served(hub)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and f"{MIX_UPPER} cannot be mixed with {MIX_LOWER}: codebook mul1 is not mcg" in lines[0]
    )
    assert not list(models.rglob("*.safetensors")) and not (models / NAME).exists()


def test_mix_model_on_a_branch_deployment_is_bad_input(tmp_path: Path) -> None:
    plan = make_plan(load_profile("glm-4.7"), parse_gpu_spec("1x144GiB"), PlanRequest(quant="3bpw_H6"))
    render_bundle(plan, tmp_path / "out", RenderOptions(port=5123, models_dir=str(tmp_path / "models")))
    result = _deploy(NO_HUB, "mix-model", "--out", str(tmp_path / "out"))
    assert (
        result.returncode == 2 and "deploys the branch 3bpw_H6: there is no mix to assemble" in result.stderr
    )


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

"""Xet-backed files (how the GLM-4.7 quants are stored) through `deploy fetch-model`, the real huggingface_hub and
hf_xet clients, against the fake hub in Xet mode (tests/fake_hf_hub, a test double: its CAS server records what it
is asked but does not implement Xet reconstruction, so a Xet transfer through it fails after asking).

Each run is a subprocess, as a user runs it: huggingface_hub reads HF_HUB_DISABLE_XET when it is imported.
What happens and why is in docs/downloads.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hf_hub import FakeHub, FakeRepo
from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.facts.layout import MODEL_MARKER
from toolkit.facts.profiles import load_profile
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import make_plan
from toolkit.render.bundle import RenderOptions, render_bundle

ROOT = Path(__file__).resolve().parents[3]
REPO = "mratsim/GLM-4.7-EXL3"
QUANT = "3bpw_H6"
SHARD = "model-00001-of-00001.safetensors"
MIB = 2**20
SECRET = "hf_xet_test_token_0123456789"


@pytest.fixture()
def site(tmp_path: Path) -> dict[str, Path]:
    """A rendered deployment (models under tmp) and the quant folder the fake hub serves as its branch."""
    plan = make_plan(
        load_profile("glm-4.7"), parse_gpu_spec("1x144GiB"), PlanRequest(quant=QUANT, context=65536)
    )
    out, models, source = tmp_path / "out", tmp_path / "models", tmp_path / "src"
    render_bundle(plan, out, RenderOptions(models_dir=str(models), gpu_reservation=False, force=True))
    source.mkdir()
    (source / "config.json").write_text('{"architectures": ["Glm4MoeForCausalLM"]}')
    (source / SHARD).write_bytes(random.Random(11).randbytes(32 * MIB))
    return {"out": out, "models": models, "source": source, "home": tmp_path / "hf-home"}


def _fetch(site: dict[str, Path], hub: FakeHub, **env: str) -> subprocess.CompletedProcess[str]:
    """`deploy fetch-model --json` with the token in HF_TOKEN and a private HF_HOME (no saved token, no caches)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    base.update(HF_ENDPOINT=hub.url, HF_TOKEN=SECRET, HF_HOME=str(site["home"]), PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "fetch-model", "--out", str(site["out"]), "--json"],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_with_hf_xet_a_xet_file_is_asked_of_xet_storage_with_a_xet_token(site: dict[str, Path]) -> None:
    pytest.importorskip("hf_xet", reason="hf_xet is not installed: huggingface_hub would take the plain path")
    with FakeHub([FakeRepo(REPO, {QUANT: site["source"]})], token=SECRET, xet=True) as hub:
        result = _fetch(site, hub, HF_XET_CLIENT_RETRY_MAX_ATTEMPTS="1")
        xet_hash = hub.repos[REPO].resolve(QUANT)[1][SHARD].xet_hash
        requests = list(hub.requests)
    token_requests = [r for r in requests if r.server == "hub" and "/xet-read-token/" in r.path]
    cas = [r for r in requests if r.server == "cas"]
    assert token_requests and all(
        r.credential == "hf-token" for r in token_requests
    )  # the hub token, to the hub
    assert any(r.path.endswith(f"/reconstructions/{xet_hash}") for r in cas)  # the Xet path was taken
    assert {r.credential for r in cas} == {"xet-token"}  # the CAS gets the short-lived Xet token, never HF's
    assert not [r for r in requests if r.server == "storage"]  # no plain-HTTP download of the shard
    # The failed transfer is one line with exit 4, not a traceback, and nothing is marked complete.
    assert result.returncode == 4, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert (
        line.startswith(f"deploy fetch-model: download of {REPO}@{QUANT} failed")
        and "HF_HUB_DISABLE_XET=1" in line
    )
    assert "Traceback" not in result.stderr and SECRET not in result.stdout + result.stderr
    assert not (site["models"] / QUANT / MODEL_MARKER).exists()


def test_with_xet_disabled_the_xet_file_comes_over_http_from_storage_and_resumes_there(
    site: dict[str, Path],
) -> None:
    with FakeHub([FakeRepo(REPO, {QUANT: site["source"]})], token=SECRET, xet=True) as hub:
        hub.drop_once(SHARD, after_bytes=28 * MIB)  # late in the file: the client has kept some of it
        result = _fetch(site, hub, HF_HUB_DISABLE_XET="1")
        requests, gets = list(hub.requests), hub.gets(SHARD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["revision"] == QUANT
    assert not [r for r in requests if r.server == "cas" or "/xet-read-token/" in r.path]
    assert [(g.server, g.credential) for g in gets] == [("storage", None), ("storage", None)]
    assert not any(r.credential for r in requests if r.server == "storage")  # the token stayed on the hub
    assert (
        gets[0].range is None and 0 < int(gets[1].range.removeprefix("bytes=").removesuffix("-")) <= 28 * MIB
    )
    data = (site["models"] / QUANT / SHARD).read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256((site["source"] / SHARD).read_bytes()).digest()
    assert (site["models"] / QUANT / MODEL_MARKER).is_file()


def test_with_xet_disabled_damaged_bytes_still_fail_the_sha256_check(site: dict[str, Path]) -> None:
    with FakeHub([FakeRepo(REPO, {QUANT: site["source"]})], token=SECRET, xet=True) as hub:
        hub.corrupt(SHARD)
        result = _fetch(site, hub, HF_HUB_DISABLE_XET="1")
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert "do not match the hub's hashes" in result.stderr.strip().splitlines()[-1]
    assert not (site["models"] / QUANT / MODEL_MARKER).exists()

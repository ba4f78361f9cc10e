"""LFS downloads the way the real hub serves them: a 302 from the hub to a storage host (the fake hub's second
server, a test double of the CDN), followed by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import httpx
import pytest

from tests.fake_hf_hub import FakeHub, FakeRepo
from toolkit.deploy import hub as hubmod
from toolkit.errors import EnvironmentMissing

REPO = "mratsim/GLM-4.7-EXL3"
BRANCH = "4bpw_H6"
MIB = 2**20
SECRET = "hf_redirect_test_token_0123456789"
BIG, SMALL = "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"
BIG_MIB = 32
# Cut late in the file: whatever block size the client writes in, it has kept some of the bytes by then.
CUT_MIB = 28


@pytest.fixture()
def quant(tmp_path: Path) -> Path:
    """A small quant folder: a config (a git file) and two LFS shards."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Glm4MoeForCausalLM"]}')
    rng = random.Random(7)
    (folder / SMALL).write_bytes(rng.randbytes(1 * MIB))
    (folder / BIG).write_bytes(rng.randbytes(BIG_MIB * MIB))
    return folder


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lfs_bytes_come_from_storage_and_the_token_never_leaves_the_hub(tmp_path: Path, quant: Path) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, {BRANCH: quant})], token=SECRET) as hub:
        hubmod.fetch_model(REPO, BRANCH, models, SECRET, endpoint=hub.url, progress=False)
        # The storage URL is only good with the hub's signature: the client used the redirect as given.
        sha = hashlib.sha256((quant / BIG).read_bytes()).hexdigest()
        assert httpx.get(f"{hub.storage_url}/lfs/{sha}").status_code == 403
        requests = list(hub.requests)
    for name in (SMALL, BIG, "config.json"):
        assert _sha(models / BRANCH / name) == _sha(quant / name)
    served_by = {r.file: r.server for r in requests if r.method == "GET" and r.content}
    assert served_by == {SMALL: "storage", BIG: "storage", "config.json": "hub"}
    assert all(r.credential == "hf-token" for r in requests if r.server == "hub")
    assert [r.credential for r in requests if r.server == "storage" and r.file] == [None, None]


def test_a_cut_storage_connection_resumes_with_a_range_request_against_storage(
    tmp_path: Path, quant: Path
) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, {BRANCH: quant})], token=SECRET) as hub:
        hub.drop_once(BIG, after_bytes=CUT_MIB * MIB)
        hubmod.fetch_model(REPO, BRANCH, models, SECRET, endpoint=hub.url, progress=False)
        gets = hub.gets(BIG)
    assert [(g.server, g.credential) for g in gets] == [("storage", None), ("storage", None)]
    assert gets[0].range is None and gets[1].range is not None
    resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= CUT_MIB * MIB  # the rest of the file, not all of it again
    assert _sha(models / BRANCH / BIG) == _sha(quant / BIG)


def test_bytes_damaged_in_transit_fail_the_sha256_check_and_a_later_run_repairs_only_them(
    tmp_path: Path, quant: Path
) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, {BRANCH: quant})]) as hub:
        hub.corrupt(BIG)  # same size, one byte flipped: only the hash check can tell
        with pytest.raises(EnvironmentMissing) as error:
            hubmod.fetch_model(REPO, BRANCH, models, None, endpoint=hub.url, progress=False)
        assert BIG in error.value.line() and "hashes" in error.value.line() and error.value.exit_code == 4
        assert len(hub.gets(BIG)) == 2  # fetched again once before giving up
        assert hubmod.read_marker(models / BRANCH, REPO, BRANCH) is None  # never marked complete
        hub.clear_faults()
        before = len(hub.requests)
        result = hubmod.fetch_model(REPO, BRANCH, models, None, endpoint=hub.url, progress=False)
        refetched = {r.file for r in hub.requests[before:] if r.method == "GET" and r.content}
    assert not result.reused and refetched == {BIG}
    assert _sha(models / BRANCH / BIG) == _sha(quant / BIG)

"""Model download through the real huggingface_hub client against the fake hub (tests/fake_hf_hub, a test double)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_hf_hub import FakeHub, FakeRepo
from toolkit.deploy import hub as hubmod
from toolkit.errors import BadInput, EnvironmentMissing

REPO = "mratsim/GLM-4.7-EXL3"
ROOT = Path(__file__).resolve().parents[3]
MIB = 2**20


def _quant_folder(root: Path, name: str, shard_bytes: list[int], seed: int) -> Path:
    """A small fake EXL3 quant folder: config, quantization config, safetensors shards of random bytes."""
    folder = root / "src" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"architectures": ["Glm4MoeForCausalLM"], "seed": {seed}}}')
    (folder / "quantization_config.json").write_text(f'{{"bits": {seed}}}')
    rng = __import__("random").Random(seed)
    for i, size in enumerate(shard_bytes, 1):
        (folder / f"model-{i:05d}-of-{len(shard_bytes):05d}.safetensors").write_bytes(rng.randbytes(size))
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_tree(source: Path, target: Path) -> None:
    for src in source.iterdir():
        assert _sha(target / src.name) == _sha(src), src.name


@pytest.fixture()
def quants(tmp_path: Path) -> dict[str, Path]:
    return {
        "3.84bpw-tuned": _quant_folder(tmp_path, "a", [3 * MIB, 24 * MIB], seed=3),
        "main": _quant_folder(tmp_path, "b", [1 * MIB], seed=9),
    }


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests decide the token themselves: no HF_TOKEN, no saved token from the host."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored"))


def test_branch_revision_download_verifies_and_marks_complete(
    tmp_path: Path, quants: dict[str, Path]
) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, quants)]) as hub:
        result = hubmod.fetch_model(REPO, "3.84bpw-tuned", models, None, endpoint=hub.url, progress=False)
        commit = hub.repos[REPO].commit("3.84bpw-tuned")
    target = models / "3.84bpw-tuned"
    assert result.path == str(target) and result.commit == commit and not result.reused
    assert result.files == 4 and result.total_bytes == sum(
        p.stat().st_size for p in quants["3.84bpw-tuned"].iterdir()
    )
    _same_tree(quants["3.84bpw-tuned"], target)  # the branch's content, not main's
    assert hubmod.read_marker(target, REPO, "3.84bpw-tuned")["commit"] == commit


def test_complete_download_is_reused_without_network(tmp_path: Path, quants: dict[str, Path]) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, quants)]) as hub:
        hubmod.fetch_model(REPO, "main", models, None, endpoint=hub.url, progress=False)
        before = len(hub.requests)
        again = hubmod.fetch_model(REPO, "main", models, None, endpoint=hub.url, progress=False)
        assert again.reused and len(hub.requests) == before


def test_damaged_file_is_fetched_again_and_only_it(tmp_path: Path, quants: dict[str, Path]) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, quants)]) as hub:
        hubmod.fetch_model(REPO, "3.84bpw-tuned", models, None, endpoint=hub.url, progress=False)
        shard = models / "3.84bpw-tuned" / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:MIB])  # truncated, e.g. by a full disk
        before = len(hub.requests)
        result = hubmod.fetch_model(REPO, "3.84bpw-tuned", models, None, endpoint=hub.url, progress=False)
        fetched = {r.file for r in hub.requests[before:] if r.method == "GET" and r.content}
    assert not result.reused and fetched == {shard.name}
    _same_tree(quants["3.84bpw-tuned"], models / "3.84bpw-tuned")


def test_dropped_connection_resumes_with_a_range_request(tmp_path: Path, quants: dict[str, Path]) -> None:
    big = "model-00002-of-00002.safetensors"
    with FakeHub([FakeRepo(REPO, quants)]) as hub:
        hub.drop_once(big, after_bytes=22 * MIB)  # late in the file: the client has kept some of it
        hubmod.fetch_model(REPO, "3.84bpw-tuned", tmp_path / "models", None, endpoint=hub.url, progress=False)
        gets = hub.gets(big)
    # The retry asks for the rest (from wherever the client had written up to), not the whole file again.
    assert len(gets) == 2 and gets[0].range is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 22 * MIB
    assert {g.server for g in gets} == {"storage"}  # LFS bytes come from storage, as the real hub redirects
    assert _sha(tmp_path / "models" / "3.84bpw-tuned" / big) == _sha(quants["3.84bpw-tuned"] / big)


def test_interrupted_run_resumes_without_refetching_finished_files(
    tmp_path: Path, quants: dict[str, Path]
) -> None:
    """A fetch killed mid-file (through HF_ENDPOINT, as a user would run it); the next run completes it."""
    big, small = "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"
    models = tmp_path / "models"
    target = models / "3.84bpw-tuned"
    with FakeHub([FakeRepo(REPO, quants)]) as hub:
        release = hub.stall(big, after_bytes=12 * MIB)
        code = (
            "import sys; from pathlib import Path; from toolkit.deploy.hub import fetch_model; "
            f"fetch_model({REPO!r}, '3.84bpw-tuned', Path(sys.argv[1]), None, progress=False)"
        )
        env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(ROOT), "HF_TOKEN": ""}
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(models)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not ((target / small).is_file() and hub.gets(big)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (target / small).is_file() and hub.gets(big), "the first run never got going"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            release.set()
        assert not (target / big).exists() and hubmod.read_marker(target, REPO, "3.84bpw-tuned") is None
        hub.clear_faults()
        small_gets = len(hub.gets(small))
        result = hubmod.fetch_model(REPO, "3.84bpw-tuned", models, None, endpoint=hub.url, progress=False)
        assert len(hub.gets(small)) == small_gets  # the finished shard was kept
    assert not result.reused
    _same_tree(quants["3.84bpw-tuned"], target)


def test_token_from_env_or_file_reaches_the_hub_and_is_never_shown(
    tmp_path: Path, quants: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_test_secret_token_0123456789"
    with FakeHub([FakeRepo(REPO, quants)], token=secret) as hub:
        with pytest.raises(EnvironmentMissing) as refused:
            hubmod.fetch_model(
                REPO, "main", tmp_path / "m0", hubmod.resolve_token(), endpoint=hub.url, progress=False
            )
        assert "HF_TOKEN" in refused.value.line() and secret not in refused.value.line()

        token_file = tmp_path / "token"
        token_file.write_text(secret + "\n")
        hubmod.fetch_model(
            REPO, "main", tmp_path / "m1", hubmod.resolve_token(token_file), endpoint=hub.url, progress=False
        )
        monkeypatch.setenv("HF_TOKEN", secret)
        hubmod.fetch_model(
            REPO, "main", tmp_path / "m2", hubmod.resolve_token(), endpoint=hub.url, progress=False
        )
        assert all(r.authorized for r in hub.on("hub") if r.method == "GET" and "/resolve/" in r.path)
        assert hub.on("storage") and not any(r.credential for r in hub.on("storage"))  # never off the hub
    for folder in ("m1", "m2"):
        stored = b"".join(p.read_bytes() for p in (tmp_path / folder).rglob("*") if p.is_file())
        assert secret.encode() not in stored


def test_unreadable_token_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        hubmod.resolve_token(tmp_path / "missing")


def test_unknown_branch_is_bad_input(tmp_path: Path, quants: dict[str, Path]) -> None:
    with FakeHub([FakeRepo(REPO, quants)]) as hub, pytest.raises(BadInput) as error:
        hubmod.fetch_model(REPO, "9bpw", tmp_path / "models", None, endpoint=hub.url, progress=False)
    assert error.value.exit_code == 2 and "9bpw" in error.value.line()


def test_unreachable_hub_is_environment_missing(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentMissing) as error:
        hubmod.fetch_model(
            REPO, "main", tmp_path / "models", None, endpoint="http://127.0.0.1:9", progress=False
        )
    assert error.value.exit_code == 4


def test_verify_files_reports_a_flipped_byte(tmp_path: Path, quants: dict[str, Path]) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, quants)]) as hub:
        hubmod.fetch_model(REPO, "main", models, None, endpoint=hub.url, progress=False)
        snapshot = hubmod.remote_snapshot(REPO, "main", None, hub.url)
    shard = models / "main" / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert hubmod.verify_files(snapshot, models / "main") == [shard.name]


def test_disk_check_refuses_when_the_model_does_not_fit(tmp_path: Path) -> None:
    hubmod.check_disk(tmp_path / "models" / "x", 1024)
    with pytest.raises(EnvironmentMissing) as error:
        hubmod.check_disk(tmp_path / "models" / "x", 2**60)
    assert error.value.exit_code == 4 and "--models-dir" in error.value.line()


def test_unsafe_revision_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        hubmod.model_path(tmp_path, "../etc")

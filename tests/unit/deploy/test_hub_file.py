"""One file of a branch (a quant's size map) through the real huggingface_hub client against the fake hub
(tests/fake_hf_hub, a test double): pinned to the branch's commit, kept where fetch-model looks, size-capped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fake_hf_hub import FakeHub, FakeRepo
from toolkit.deploy import hub as hubmod
from toolkit.errors import BadInput, EnvironmentMissing

REPO = "mratsim/GLM-4.7-EXL3"
FIXTURES = Path(__file__).resolve().parents[1] / "quant" / "fixtures"
SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored"))


@pytest.fixture()
def branches(tmp_path: Path) -> dict[str, Path]:
    """Two branches holding the tiny quants' files and a 4 MiB shard each (which a size map must never fetch)."""
    found = {}
    for branch, fixture in (("2bpw_H6", "tiny-2bpw"), ("4bpw_H6", "tiny-4bpw")):
        folder = tmp_path / "src" / branch
        shutil.copytree(FIXTURES / fixture, folder)
        (folder / SHARD).write_bytes(bytes(range(256)) * 16384)
        found[branch] = folder
    return found


def test_only_the_file_is_fetched_pinned_to_the_branch_commit(
    tmp_path: Path, branches: dict[str, Path]
) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, branches)]) as hub:
        got = hubmod.fetch_file(
            REPO,
            "4bpw_H6",
            models,
            None,
            limit=1 << 20,
            endpoint=hub.url,
            progress=False,
            filename="quantization_config.json",
        )
        commit = hub.repos[REPO].commit("4bpw_H6")
        assert not hub.gets(SHARD)
        resolved = [r.path for r in hub.on("hub") if "/resolve/" in r.path]
        assert resolved and all(
            f"/resolve/{commit}/" in path for path in resolved
        )  # the commit, not the branch
    assert got.commit == commit and not got.reused
    assert Path(got.path) == models / "4bpw_H6" / "quantization_config.json"
    assert Path(got.path).read_bytes() == (branches["4bpw_H6"] / "quantization_config.json").read_bytes()
    assert sorted(p.name for p in (models / "4bpw_H6").iterdir()) == [".cache", "quantization_config.json"]


def test_fetch_model_later_keeps_the_file_and_a_complete_folder_needs_no_network(
    tmp_path: Path, branches: dict[str, Path]
) -> None:
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, branches)]) as hub:
        hubmod.fetch_file(
            REPO,
            "2bpw_H6",
            models,
            None,
            limit=1 << 20,
            endpoint=hub.url,
            progress=False,
            filename="quantization_config.json",
        )
        hubmod.fetch_model(REPO, "2bpw_H6", models, None, endpoint=hub.url, progress=False)
        assert len(hub.gets("quantization_config.json")) == 1  # the model download kept it
        assert len(hub.gets(SHARD)) == 1
    again = hubmod.fetch_file(
        REPO,
        "2bpw_H6",
        models,
        None,
        limit=1 << 20,
        endpoint="http://127.0.0.1:9",
        progress=False,
        filename="quantization_config.json",
    )
    assert again.reused and again.size == (branches["2bpw_H6"] / "quantization_config.json").stat().st_size


def test_a_file_above_the_limit_is_refused_before_a_byte_is_fetched(
    tmp_path: Path, branches: dict[str, Path]
) -> None:
    with FakeHub([FakeRepo(REPO, branches)]) as hub:
        with pytest.raises(EnvironmentMissing) as refused:
            hubmod.fetch_file(
                REPO,
                "2bpw_H6",
                tmp_path / "models",
                None,
                limit=1000,
                endpoint=hub.url,
                progress=False,
                filename="quantization_config.json",
            )
        assert not hub.gets("quantization_config.json")
    assert refused.value.exit_code == 4 and "more than" in refused.value.line()


def test_a_branch_without_the_file_or_an_unknown_branch_is_bad_input(
    tmp_path: Path, branches: dict[str, Path]
) -> None:
    (branches["4bpw_H6"] / "quantization_config.json").unlink()
    with FakeHub([FakeRepo(REPO, branches)]) as hub:
        for branch, expected in (
            ("4bpw_H6", "has no quantization_config.json"),
            ("9bpw", "branch not found"),
        ):
            with pytest.raises(BadInput) as refused:
                hubmod.fetch_file(
                    REPO,
                    branch,
                    tmp_path / "models",
                    None,
                    limit=1 << 20,
                    endpoint=hub.url,
                    progress=False,
                    filename="quantization_config.json",
                )
            assert expected in refused.value.line()

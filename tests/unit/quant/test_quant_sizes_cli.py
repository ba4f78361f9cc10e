"""`deploy quant sizes` as a user runs it: a real process, a local folder or one branch of the fake hub (tests/
fake_hf_hub, a test double of Hugging Face) through HF_ENDPOINT, the table, --json and the exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hf_hub import FakeHub, FakeRepo
from tests.unit.quant import glm47_storage
from toolkit.quant.storage import QUANT_CONFIG, read_storage

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).with_name("fixtures")
REPO = "mratsim/GLM-4.7-EXL3"
SHARD = "model-00001-of-00001.safetensors"


def deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "quant", "sizes", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": "", **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deploy quant: "), lines
    return lines[0]


def test_a_local_quant_prints_groups_layers_and_says_it_is_not_on_the_card() -> None:
    result = deploy("--model-dir", str(FIXTURES / "mix-probe"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for group in (
        "attention",
        "shared_experts",
        "routed_gate_up",
        "routed_down",
        "dense_mlp",
        "router",
        "head",
    ):
        assert f"\n{group} " in out
    assert "embedding (system RAM)" in out and "codebook mul1" in out
    assert "not a branch on the card" in out
    storage = read_storage(FIXTURES / "mix-probe")
    assert re.search(rf"VRAM weights\s*│\s*{storage.vram_bytes / 2**20:.2f} │", out)  # MiB for a tiny model


def test_json_carries_exact_bytes_per_group_and_layer_runs() -> None:
    result = deploy("--model-dir", str(FIXTURES / "mix-probe"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    storage = read_storage(FIXTURES / "mix-probe")
    assert report["vram_bytes"] == storage.vram_bytes
    assert {row["group"]: row["bytes"] for row in report["groups"]} == storage.by_group()
    assert sum(row["share"] for row in report["groups"] if row["share"] is not None) == pytest.approx(
        1, abs=1e-3
    )
    assert [(r["first"], r["last"]) for r in report["layers"]] == [(0, 0), (1, 5)]
    assert (
        report["layers"][1]["bits"]["attention"] == 4.0 and report["layers"][1]["bits"]["routed_down"] == 2.0
    )
    assert report["card"] is None and report["source"] == {
        "kind": "folder",
        "path": str(FIXTURES / "mix-probe"),
        "branch": None,
    }


def test_a_folder_named_after_a_branch_is_checked_against_the_card(tmp_path: Path) -> None:
    """A true 3bpw_H6 agrees with the card's 124 GiB; a 2 bpw file in a folder of that name is flagged."""
    folder = tmp_path / "3bpw_H6"
    folder.mkdir()
    (folder / QUANT_CONFIG).write_text(glm47_storage.quantization_config_text(3.0, 6))
    agrees = deploy("--model-dir", str(folder))
    assert agrees.returncode == 0, agrees.stderr
    assert "card: 3bpw_H6 124 GiB; exact 123.87 GiB: agrees" in agrees.stdout
    (folder / QUANT_CONFIG).write_text(glm47_storage.quantization_config_text(2.0, 6))
    flagged = deploy("--model-dir", str(folder), "--json")
    assert flagged.returncode == 0, flagged.stderr
    card = json.loads(flagged.stdout)["card"]
    assert card["branch"] == "3bpw_H6" and card["agrees"] is False and card["difference_gib"] < -40


def test_a_branch_fetches_only_its_size_map_pinned_to_its_commit(tmp_path: Path) -> None:
    branch = tmp_path / "src" / "3bpw_H6"
    branch.mkdir(parents=True)
    (branch / QUANT_CONFIG).write_text(glm47_storage.quantization_config_text(3.0, 6))
    (branch / SHARD).write_bytes(b"\0" * (8 << 20))
    models = tmp_path / "models"
    with FakeHub([FakeRepo(REPO, {"3bpw_H6": branch})]) as hub:
        result = deploy(
            "--quant", "3bpw_H6", "--models-dir", str(models), "--json", env={"HF_ENDPOINT": hub.url}
        )
        assert result.returncode == 0, result.stderr
        assert not hub.gets(SHARD)
        commit = hub.repos[REPO].commit("3bpw_H6")
    report = json.loads(result.stdout)
    assert report["source"]["kind"] == "hub" and report["source"]["commit"] == commit
    assert report["source"]["path"] == str(models / "3bpw_H6" / QUANT_CONFIG)
    assert report["card"]["agrees"] is True and report["card"]["card_gib"] == 124
    assert report["vram_bytes"] == read_storage(branch).vram_bytes


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert "is not a folder" in one_line_error(deploy("--model-dir", str(tmp_path / "missing")), 2)
    assert "cannot read the quant's storage map" in one_line_error(deploy("--model-dir", str(tmp_path)), 2)
    shutil.copytree(FIXTURES / "tiny-2bpw", tmp_path / "q")
    text = (tmp_path / "q" / QUANT_CONFIG).read_text().replace('"mul1_multiplier"', '"mcg_multiplier"', 1)
    (tmp_path / "q" / QUANT_CONFIG).write_text(text)
    assert "mixes codebooks" in one_line_error(deploy("--model-dir", str(tmp_path / "q")), 2)
    assert "is not a branch name" in one_line_error(deploy("--quant", "../x"), 2)
    with FakeHub([FakeRepo(REPO, {"main": FIXTURES / "tiny-2bpw"})]) as hub:
        missing = deploy("--quant", "9bpw", "--models-dir", str(tmp_path / "m"), env={"HF_ENDPOINT": hub.url})
    assert "branch not found on the hub" in one_line_error(missing, 2)

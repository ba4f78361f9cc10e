"""The reference entry point (with the test double of its GPU boundary) and `deploy verify` judging a computed
quant reference by the serving-path bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tabby_test_server import testing
from toolkit.cli import main
from toolkit.facts.layout import DEPLOYMENT_REFERENCE
from toolkit.facts.serving_path import (
    load_serving_path,
)
from toolkit.verify import reference_entry
from toolkit.verify.reference import load_prompts, load_reference, prompts_sha256

ROOT = Path(__file__).resolve().parents[3]
DOUBLE = "tests.tabby_test_server.backend"
KEY = "deployment-reference-test-key"


@pytest.fixture()
def quant_folder(tmp_path) -> Path:
    """A downloaded quant folder as the test double reads it: the name carries the bits, config.json exists."""
    folder = tmp_path / "models" / "4bpw_H6"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))
    return folder


def test_entry_point_imports_only_what_the_image_has():
    """Inside the TabbyAPI image there is no httpx, docker, rich, jinja2 or huggingface_hub."""
    code = (
        "import sys, toolkit.verify.reference_entry\n"
        "heavy = {'httpx', 'docker', 'rich', 'jinja2', 'huggingface_hub', 'pynvml', 'torch', 'exllamav3'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_entry_point_with_the_test_double_writes_the_reference_and_what_it_was_made_with(
    quant_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(reference_entry.TEST_DOUBLE_ENV, DOUBLE)
    out = tmp_path / "out"
    code = reference_entry.main(
        ["--model-dir", str(quant_folder), "--out", str(out), "--model-commit", "c0ffee", "--key", "k1"]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "[reference] TEST DOUBLE prompt 40/40" in err and f"wrote {out / DEPLOYMENT_REFERENCE}" in err
    reference = load_reference(out / DEPLOYMENT_REFERENCE)
    settings = reference.settings
    assert reference.kind == "quantized" and reference.model_id == "4bpw_H6" and reference.positions == 159
    assert (
        settings["model_commit"] == "c0ffee" and settings["key"] == "k1" and settings["source"] == "compute"
    )
    assert settings["prompts_sha256"] == prompts_sha256(load_prompts()) and settings["cache_mode"] == "FP16"
    assert settings["backend"].startswith("test-double") and settings["peak_gpu_mib"] is None
    assert settings["max_seq_len"] >= max(p.token_count for q in reference.prompts for p in q.positions)
    assert settings["load_seconds"] >= 0 and settings["compute_seconds"] > 0
    assert not [p for p in out.iterdir() if p.name != DEPLOYMENT_REFERENCE]  # no temp file left behind


def test_the_named_test_double_wins_over_an_importable_exllamav3(quant_folder, monkeypatch):
    """The CPU test image carries the mix assembly's exllamav3 TEST DOUBLE, which cannot compute: where the variable
    names the reference's double, that one computes."""
    monkeypatch.setenv(reference_entry.TEST_DOUBLE_ENV, DOUBLE)
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "exllamav3_double"))
    assert reference_entry.importlib.util.find_spec("exllamav3") is not None
    backend = reference_entry.open_backend(quant_folder)
    assert backend.name.startswith("test-double") and backend.model_id == "4bpw_H6"


def test_entry_point_without_exllamav3_or_a_test_double_exits_4(quant_folder, tmp_path, monkeypatch, capsys):
    """Never silently a test double: without the variable, a host without exllamav3 is an environment problem."""
    monkeypatch.delenv(reference_entry.TEST_DOUBLE_ENV, raising=False)
    if reference_entry.importlib.util.find_spec("exllamav3") is not None:
        pytest.skip("exllamav3 is installed here")
    out = tmp_path / "out"
    assert reference_entry.main(["--model-dir", str(quant_folder), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "needs exllamav3 and torch" in err and "Traceback" not in err and not out.exists()
    assert reference_entry.main(["--model-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert reference_entry.main(["--model-dir", str(quant_folder), "--out", str(out), "--top-k", "0"]) == 2


def test_verify_judges_a_computed_quant_reference_by_the_serving_path_bound(
    quant_folder, tmp_path, monkeypatch, capsys
):
    """The same 4-bit weights served pass under the bound for the expected cache mode; 3-bit weights fail."""
    monkeypatch.setenv(reference_entry.TEST_DOUBLE_ENV, DOUBLE)
    assert reference_entry.main(["--model-dir", str(quant_folder), "--out", str(tmp_path / "ref")]) == 0
    reference = tmp_path / "ref" / DEPLOYMENT_REFERENCE
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    servers = {}
    try:
        for bits in (4, 3):
            (tmp_path / f"s{bits}").mkdir()
            servers[bits] = testing.start(
                tmp_path / f"s{bits}",
                api_key=KEY,
                model={"model_name": "4bpw_H6", "cache_mode": "FP16", "reasoning": True},
                test_server={"bits": bits},
            )
        capsys.readouterr()
        results = {}
        for bits, server in servers.items():
            code = main(
                [
                    "verify",
                    "--url",
                    server.url,
                    "--api-key-file",
                    str(key_file),
                    "--reference",
                    str(reference),
                    "--expect-cache-mode",
                    "FP16",
                    "--json",
                ]
            )
            results[bits] = (code, json.loads(capsys.readouterr().out))
    finally:
        for server in servers.values():
            server.stop()
    (same_code, same), (other_code, other) = results[4], results[3]
    bound = load_serving_path().bound("FP16")
    assert same_code == 0 and same["kl"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert same["kl"]["threshold"] == bound.value and same["kl"]["threshold_source"] == bound.source
    assert other_code == 5 and other["kl"]["mean"] > 10 * bound.value


def test_verify_needs_a_url_or_a_deployment_folder(tmp_path, capsys):
    assert main(["verify"]) == 2
    assert "verify needs --url or --out" in capsys.readouterr().err
    assert main(["verify", "--out", str(tmp_path)]) == 2
    assert "holds no rendered deployment" in capsys.readouterr().err

"""The mix entry point: lean imports, one-line failures with their exit codes, JSON-line events on stdout, and
override globs that select exactly the planned modules."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.quant import mix_entry

from .conftest import DOUBLE_DIR
from .exl3_folders import Shape, linears, make_quant

ROOT = Path(__file__).resolve().parents[3]


def _entry(job: Path, pythonpath: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.quant.mix_entry", "--job", str(job)],
        cwd=ROOT,
        env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_entry_point_imports_nothing_else_of_the_toolkit():
    """It runs in the deployment's image with the package mounted alone: stdlib until exllamav3."""
    code = (
        "import sys, toolkit.quant.mix_entry\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'toolkit', 'yaml', 'numpy', 'rich', 'docker', 'httpx', 'torch', 'exllamav3'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['toolkit', 'toolkit.quant', 'toolkit.quant.mix_entry']"


def test_a_bad_job_is_exit_2_in_one_line_and_nothing_on_stdout(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"base_dir": "/a", "out_dir": "/b", "sources": [], "shard_size_mb": 8192}))
    done = _entry(job, str(DOUBLE_DIR))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "[mix] error: the job names no sources besides the base\n"


@pytest.mark.skipif(importlib.util.find_spec("exllamav3") is not None, reason="exllamav3 is installed here")
def test_without_exllamav3_it_is_exit_4(tmp_path):
    lower = make_quant(tmp_path / "2", 2)
    upper = make_quant(tmp_path / "4", 4)
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "base_dir": str(lower),
                "sources": [{"id": "4", "dir": str(upper)}],
                "out_dir": str(tmp_path / "out"),
                "shard_size_mb": 1,
                "overrides": {},
            }
        )
    )
    done = _entry(job, "")
    assert done.returncode == 4 and "[mix] error: exllamav3 is not importable here" in done.stderr
    assert not (tmp_path / "out").exists()


def test_events_are_json_lines_on_stdout_and_exllamav3_prints_go_to_stderr(tmp_path):
    lower = make_quant(tmp_path / "2", 2)
    upper = make_quant(tmp_path / "4", 4)
    keys = [k for k, _, _ in linears(Shape()) if ".experts." in k]
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "base_dir": str(lower),
                "sources": [{"id": "4", "dir": str(upper)}],
                "out_dir": str(tmp_path / "out"),
                "shard_size_mb": 1,
                "overrides": {k: "4" for k in keys},
            }
        )
    )
    done = _entry(job, str(DOUBLE_DIR))
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["start", "shard", "done"]
    assert events[0]["test_double"] and events[1] == {
        "event": "shard",
        "index": 1,
        "count": 1,
        "bytes": (tmp_path / "out" / "model.safetensors").stat().st_size,
    }
    assert events[2]["overrides"] == len(keys) and events[2]["head_bits"] == 6
    assert "-- Writing model.safetensors" in done.stderr


def _selects(globs: list[str], name: str) -> bool:
    """exllamav3's glob semantics (VariantSafetensorsCollection.compile_star_globs): '*' is any text, whole key."""
    return any(re.fullmatch(".*".join(map(re.escape, g.split("*"))), name) for g in globs)


KEYS = [k for k, _, _ in linears(Shape(experts=6, layers=4))]


@settings(max_examples=80, deadline=None)
@given(
    choice=st.lists(st.sampled_from([None, "a", "b"]), min_size=len(KEYS), max_size=len(KEYS)),
    whole_layers=st.booleans(),
)
def test_override_globs_select_exactly_each_modules_planned_source(choice, whole_layers):
    overrides = {k: c for k, c in zip(KEYS, choice) if c is not None}
    if whole_layers:  # every expert of a layer from one source, as a recipe step does it
        overrides = {k: "a" for k in KEYS if ".experts." in k and k.startswith("model.layers.1.")} | {
            k: "b" for k in KEYS if ".experts." in k and k.startswith("model.layers.2.")
        }
    globs = mix_entry.override_globs(overrides, KEYS)
    for key in KEYS:
        for tensor in (f"{key}.trellis", f"{key}.suh", f"{key}.mcg"):
            chosen = [source for source, patterns in globs.items() if _selects(patterns, tensor)]
            assert chosen == ([overrides[key]] if key in overrides else []), (key, globs)
    if whole_layers:
        assert sum(len(g) for g in globs.values()) == 2 * 3  # one glob per layer and projection

"""The deployment reference step without an engine: its reuse key, the command the container runs, bad input."""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.cli import main
from toolkit.deploy.reference_step import container_command, reference_key
from toolkit.verify import reference_entry
from toolkit.verify.reference import load_prompts, prompts_sha256


def test_reuse_key_changes_with_what_the_reference_depends_on():
    marker = {"repo": "mratsim/GLM-4.7-EXL3", "revision": "4bpw_H6", "commit": "a" * 40, "files": {"x": 1}}
    prompts = prompts_sha256(load_prompts())
    key = reference_key(marker, "sha256:1", prompts)
    assert key == reference_key({**marker, "files": {"y": 2}}, "sha256:1", prompts)  # sizes are not content
    assert key != reference_key({**marker, "commit": "b" * 40}, "sha256:1", prompts)
    assert key != reference_key(marker, "sha256:2", prompts)  # another image: another exllamav3 or TabbyAPI
    assert key != reference_key(marker, "sha256:1", prompts_sha256(load_prompts()[:-1]))
    assert key != reference_key(marker, "sha256:1", prompts, top_k=100)


def test_the_container_command_runs_the_entry_point_on_the_mounted_folder():
    command = container_command("/app/models/4bpw_H6", "c0ffee", "k1")
    assert command[:3] == ["python3", "-m", "toolkit.verify.reference_entry"]
    assert reference_entry._parser().parse_args(command[3:]).model_dir == Path("/app/models/4bpw_H6")


def test_reference_deployment_without_a_rendering_is_bad_input(tmp_path, capsys):
    assert main(["reference", "deployment", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy reference:") and "Traceback" not in err
    assert not os.path.exists(tmp_path / "none")

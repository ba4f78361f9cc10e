"""Class 4, validation matches whole strings, and a tampered plan.json is checked for meaning.

`$` in a Python pattern also matches before a trailing newline; a name, ref, path, UUID, label or cache mode
ending in "\\n" must be refused wherever it enters (flags, plan.json, fleet.yaml, detect JSON). A plan.json
edited by hand must still describe a plan the profile and the GPUs allow.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.hostile.conftest import assert_one_line

FLAGS_WITH_NEWLINE = {
    "render --tabby-ref": ["render", "--gpus", "1xH200", "--out", "{out}", "--tabby-ref", "e632af4\n"],
    "render --models-dir": ["render", "--gpus", "1xH200", "--out", "{out}", "--models-dir", "/srv/models\n"],
    "render --bind": ["render", "--gpus", "1xH200", "--out", "{out}", "--bind", "127.0.0.1\n"],
    "render --port": ["render", "--gpus", "1xH200", "--out", "{out}", "--port", "5000\n"],
    "plan --quant": ["plan", "--gpus", "1xH200", "--quant", "3.15bpw-tuned\n"],
    "plan --cache": ["plan", "--gpus", "1xH200", "--cache", "5,4\n"],
    "plan --profile": ["plan", "--gpus", "1xH200", "--profile", "glm-4.7\n"],
    "node-config --node": ["node-config", "--gpus", "1x24GiB", "--node", "gpu-a\n"],
    "verify --expect-cache-mode": ["verify", "--url", "http://127.0.0.1:9", "--expect-cache-mode", "5,4\n"],
    "verify --expect-quant": ["verify", "--url", "http://127.0.0.1:9", "--expect-quant", "4bpw_H6\n"],
}


@pytest.mark.parametrize("case", sorted(FLAGS_WITH_NEWLINE))
def test_a_trailing_newline_in_a_flag_is_refused(case, cli, sandbox) -> None:
    out = sandbox.work / "bundle"
    argv = [a.format(out=out) for a in FLAGS_WITH_NEWLINE[case]]
    assert_one_line(cli(*argv), 2)
    assert not out.exists()


FLEET = {
    "name": "glm",
    "models_dir": "/srv/glm-deploy/models",
    "nodes": [{"name": "gpu-a", "gpus": "1xH200", "labels": {"rack": "r1"}}],
    "requirements": {"context": 32768},
}

FLEET_EDITS = {
    "stack name": lambda f: f.update(name="glm\n"),
    "profile": lambda f: f.update(profile="glm-4.7\n"),
    "models_dir": lambda f: f.update(models_dir="/srv/models\n"),
    "node name": lambda f: f["nodes"][0].update(name="gpu-a\n"),
    "label key": lambda f: f["nodes"][0].update(labels={"rack\n": "r1"}),
    "label value": lambda f: f["nodes"][0].update(labels={"rack": "r1\n"}),
    "node url": lambda f: f["nodes"][0].update(url="http://10.0.0.5:5000\n"),
    "quant": lambda f: f["requirements"].update(quant="4bpw_H6\n"),
    "cache": lambda f: f["requirements"].update(cache="5,4\n"),
    "image": lambda f: f.update(image="registry:5000/glm/tabby:v1\n"),
    "gateway image": lambda f: f.update(gateway_image="haproxy:2.8\n"),
}


@pytest.mark.parametrize("case", sorted(FLEET_EDITS))
def test_a_trailing_newline_in_fleet_yaml_is_refused(case, cli, sandbox) -> None:
    fleet = json.loads(json.dumps(FLEET))
    FLEET_EDITS[case](fleet)
    path = sandbox.work / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    out = sandbox.work / "fleet-out"
    assert_one_line(cli("cluster", "render", "--inventory", str(path), "--out", str(out)), 2)
    assert not out.exists()


DETECT = {
    "source": "nvml",
    "driver_version": "580.95.05",
    "cuda_driver_version": "13.0",
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "total_mib": 143771,
            "free_mib": 143000,
            "used_mib": 771,
            "uuid": "GPU-f3f01bca-4aa0-2d94-8f9e-4319960df65b",
            "compute_capability": "9.0",
        }
    ],
}

DETECT_EDITS = {
    "uuid": lambda d: d["gpus"][0].update(uuid="GPU-f3f01bca\n"),
    "compute capability": lambda d: d["gpus"][0].update(compute_capability="9.0\n"),
    "cuda version": lambda d: d.update(cuda_driver_version="13.0\n"),
    "driver version": lambda d: d.update(driver_version="580.95\n"),
    "gpu name": lambda d: d["gpus"][0].update(name="NVIDIA H200\n"),
}


@pytest.mark.parametrize("case", sorted(DETECT_EDITS))
def test_a_trailing_newline_in_detect_json_is_refused(case, cli, sandbox) -> None:
    detect = json.loads(json.dumps(DETECT))
    DETECT_EDITS[case](detect)
    path = sandbox.work / "detect.json"
    path.write_text(json.dumps(detect))
    assert_one_line(cli("node-config", "--detect-json", str(path), "--node", "gpu-a"), 2)


@pytest.fixture()
def plan_json(cli, sandbox) -> dict[str, Any]:
    """A real plan for 2 x H200 (`deploy plan --json`), for editing."""
    run = cli("plan", "--gpus", "2xH200", "--json")
    assert run.code == 0
    return json.loads(run.out)


def _set(path: tuple[Any, ...], value: Any):
    def edit(plan: dict[str, Any]) -> None:
        target = plan
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


PLAN_EDITS = {
    "quant with newline": _set(("quant",), "6bpw_H8\n"),
    "profile with newline": _set(("profile",), "glm-4.7\n"),
    "cache mode with newline": _set(("cache_mode",), "8,8\n"),
    "hf_repo with newline": _set(("hf_repo",), "mratsim/GLM-4.7-EXL3\n"),
    "uuid with newline": _set(("inventory", "gpus", 0, "uuid"), "GPU-0\n"),
    "quant not in the profile": _set(("quant",), "9bpw_H9"),
    "another repository": _set(("hf_repo",), "someone/other-model"),
    "context as a string": _set(("context",), "32768"),
    "context fractional": _set(("context",), 32768.5),
    "context boolean": _set(("context",), True),
    "context negative": _set(("context",), -1),
    "context beyond the model": _set(("context",), 10**12),
    "cache_size below context": _set(("cache_size",), 256),
    "split tp on one GPU": lambda p: (p.update(split="tp"), p.update(per_gpu=p["per_gpu"][:1])),
    "split unknown": _set(("split",), "diagonal"),
    "per-GPU index not a GPU": _set(("per_gpu", 1, "index"), 7),
    "per-GPU index twice": _set(("per_gpu", 1, "index"), 0),
    "more allocations than GPUs": lambda p: p["per_gpu"].append(dict(p["per_gpu"][0], index=2)),
    "GPU over its usable memory": _set(("per_gpu", 0, "weights_mib"), 10**6),
    "usable above total": _set(("per_gpu", 0, "usable_mib"), 10**7),
    "weights not the quant's": _set(("weights_gib",), 1.0),
    "bpw not the quant's": _set(("bpw",), 2.0),
    "weights_gib infinite": _set(("weights_gib",), float("inf")),
    "gpu_split too long": _set(("gpu_split",), [10.0, 10.0, 10.0]),
    "free memory above total": _set(("inventory", "gpus", 0, "free_mib"), 10**7),
}


@pytest.mark.parametrize("case", sorted(PLAN_EDITS))
def test_a_tampered_plan_is_refused_before_anything_is_written(case, cli, sandbox, plan_json) -> None:
    PLAN_EDITS[case](plan_json)
    path = sandbox.work / "plan.json"
    path.write_text(json.dumps(plan_json, allow_nan=True))
    out = sandbox.work / "bundle"
    assert_one_line(cli("render", "--plan", str(path), "--out", str(out)), 2)
    assert not out.exists()


def test_an_untampered_plan_still_renders(cli, sandbox, plan_json) -> None:
    path = sandbox.work / "plan.json"
    path.write_text(json.dumps(plan_json))
    assert cli("render", "--plan", str(path), "--out", str(sandbox.work / "bundle")).code == 0


def test_a_tampered_plan_in_a_rendered_folder_is_refused(cli, sandbox) -> None:
    out = sandbox.work / "bundle"
    assert cli("render", "--gpus", "1xH200", "--out", str(out)).code == 0
    plan = json.loads((out / "plan.json").read_text())
    plan["quant"] = "3.15bpw-tuned\n"
    (out / "plan.json").write_text(json.dumps(plan))
    assert_one_line(cli("fetch-model", "--out", str(out)), 2)

"""Golden files: the full rendering of two reference plans, reviewed by eye once.

Regenerate after an intended change with
    GLM_DEPLOY_UPDATE_GOLDEN=1 python3 -m pytest tests/unit/render/test_render_golden.py
and review the diff (git diff tests/unit/render/golden/) before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.render.render_plans import SERVING, host, make_plan
from toolkit.detect.inventory import GpuInventory
from toolkit.facts.profiles import load_profile
from toolkit.plan.plan import Plan, PlanRequest
from toolkit.plan.planner import make_plan as plan_with_planner
from toolkit.render.bundle import API_TOKENS, RenderOptions, render_files

GOLDEN = Path(__file__).with_name("golden")
UPDATE = os.environ.get("GLM_DEPLOY_UPDATE_GOLDEN") == "1"
# Not a secret: a fixed stand-in so the goldens do not depend on `secrets`; api_tokens.yml is never a golden
# file.
TOKENS = "api_key: 00000000000000000000000000000000\nadmin_key: 11111111111111111111111111111111\n"


def planned(inventory: GpuInventory, request: PlanRequest) -> Plan:
    """A reference plan as the planner makes it (so a golden never shows a plan `deploy plan` would not give)."""
    return plan_with_planner(load_profile("glm-4.7"), inventory, request)


REFERENCES = {
    # 8 x RTX 4090 (as NVML reports them, CUDA 12.8 driver), `deploy plan --split layer`: the consumer multi-GPU
    # case, planned by the planner itself (it picks 3.15bpw-tuned, cache 8,8, 131072 tokens, and proposes a mix with
    # 4bpw_H6 for the 17.8 GiB it leaves unused at 32768 tokens).
    "8x24GiB-layer": planned(host(8, "rtx4090", driver_cuda="12.8"), PlanRequest(split="layer")),
    # 2 x H200, tensor parallel, CUDA 13.2 driver: the datacenter case, full context (a hand-built plan; its
    # quant, context, cache mode and split are what `deploy plan --quant 5bpw_H8 --context max` gives).
    "2xH200-tp": make_plan(
        2,
        "tp",
        "h200",
        quant="5bpw_H8",
        weights_gib=206.0,
        context=202752,
        cache_mode="8,8",
        driver_cuda="13.2",
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_rendering_matches_the_golden_files(name: str) -> None:
    options = RenderOptions(serving=SERVING, run_as=(10001, 10001), models_dir="/srv/models")
    files = render_files(REFERENCES[name], Path("/srv/glm-deploy"), options, TOKENS)
    folder = GOLDEN / name
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, (text, _mode) in files.items():
            if file_name != API_TOKENS:
                (folder / file_name).write_text(text)
    expected = {p.name for p in folder.iterdir()}
    assert expected == set(files) - {API_TOKENS}
    for file_name in sorted(expected):
        assert files[file_name][0] == (folder / file_name).read_text(), (
            f"{name}/{file_name} differs from its golden file "
            "(GLM_DEPLOY_UPDATE_GOLDEN=1 regenerates; review the diff)"
        )

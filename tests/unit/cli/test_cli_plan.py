"""`deploy plan` / `deploy detect` as a user runs them: a real process, every exit code, the --json contract."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.facts.tabby_pin import load_tabby_pin
from toolkit.plan.plan import Plan

ROOT = Path(__file__).resolve().parents[3]
HEAVY_MODULES = ("docker", "httpx", "huggingface_hub", "numpy", "jinja2")


def deploy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, command: str = "plan") -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deploy {command}: ")
    return lines[0]


def nvml_available() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


NO_NVML = pytest.mark.skipif(nvml_available(), reason="this host has an NVIDIA driver: exit 4 cannot happen")


VIEW_KEYS = {
    "decode_bound",
    "chunk_trade",
}  # shown with the plan, not part of the hand-off (render ignores them)


def test_json_is_the_plan_contract_and_its_views() -> None:
    result = deploy("plan", "--gpus", "8x24GiB", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert VIEW_KEYS <= set(shown) and shown["chunk_trade"] is None
    data = {key: value for key, value in shown.items() if key not in VIEW_KEYS}
    assert set(data) == {
        "profile",
        "hf_repo",
        "quant",
        "bpw",
        "weights_gib",
        "context",
        "max_context",
        "cache_size",
        "cache_mode",
        "split",
        "gpu_split",
        "chunk_size",
        "headroom_mib",
        "per_gpu",
        "expected",
        "rejected",
        "inventory",
        "stack",
        "mix_proposal",  # null, or the mix that would fill a gap (toolkit/plan/gap.py)
    }
    assert set(data["stack"]) == {
        "tabbyapi",
        "exllamav3",
        "torch",
        "cuda",
        "python",
        "calibration",
        "calibrated",
        "uncalibrated_margin",
    }
    assert data["split"] in ("single", "tp", "layer")
    assert data["gpu_split"] is None or all(isinstance(x, float) for x in data["gpu_split"])
    assert isinstance(data["cache_mode"], str) and data["cache_mode"] == "FP16" or "," in data["cache_mode"]
    for allocation in data["per_gpu"]:
        assert set(allocation) == {
            "index",
            "total_mib",
            "usable_mib",
            "weights_mib",
            "cache_mib",
            "overhead_mib",
            "free_after_mib",
        }
        assert all(isinstance(v, int) for v in allocation.values())
    assert set(data["expected"]) == {"kl", "top1", "ppl"}
    assert data["rejected"] and all(set(r) == {"quant", "reason", "short_by_mib"} for r in data["rejected"])
    assert len(data["per_gpu"]) == 8 and data["inventory"]["source"] == "spec"
    # the hand-off carries mix_proposal only when there is one (plans without stay byte-identical)
    handoff = {key: value for key, value in data.items() if key != "mix_proposal" or value is not None}
    assert json.loads(json.dumps(Plan.from_dict(data).to_dict())) == handoff


def test_json_honours_every_option() -> None:
    result = deploy(
        "plan",
        "--profile",
        "glm-4.7",
        "--gpus",
        "2xH200",
        "--context",
        "65536",
        "--cache",
        "6,5",
        "--quant",
        "4bpw_H6",
        "--split",
        "layer",
        "--headroom-mib",
        "512",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["quant"], data["context"], data["cache_mode"], data["headroom_mib"]) == (
        "4bpw_H6",
        65536,
        "6,5",
        512,
    )
    assert data["split"] in ("layer", "single")


def test_json_shows_the_pinned_stack_and_its_calibration() -> None:
    pin = load_tabby_pin()
    for cuda, args in (("12", []), ("13", ["--cuda", "13"])):
        result = deploy("plan", "--gpus", "2xH200", "--json", *args)
        assert result.returncode == 0, result.stderr
        stack = json.loads(result.stdout)["stack"]
        assert stack == {
            "tabbyapi": pin.ref,
            "exllamav3": pin.exllamav3,
            "torch": pin.variant(cuda).torch,
            "cuda": cuda,
            "python": pin.python,
            "calibration": pin.exllamav3,
            "calibrated": True,
            "uncalibrated_margin": None,
        }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--exllamav3", "1.4.2"], "no memory calibration for exllamav3 1.4.2"),
        (["--tabby-ref", "ccd171c"], "TabbyAPI ccd171c is not the stack glm-4.7's memory was calibrated on"),
        (["--exllamav3", "1.4"], "no memory calibration for exllamav3 1.4"),
        (["--exllamav3", "1.6.5; id"], "is not a package version"),
    ],
)
def test_an_uncalibrated_stack_is_refused_with_exit_2(args: list[str], fragment: str) -> None:
    line = assert_one_line_error(deploy("plan", "--gpus", "2xH200", *args), 2)
    assert fragment in line
    if "calibrat" in fragment:
        assert "--allow-uncalibrated" in line and "max(700 MiB, 9%)" in line


def test_allow_uncalibrated_plans_with_a_stated_margin() -> None:
    calibrated = json.loads(deploy("plan", "--gpus", "2xH200", "--json").stdout)
    result = deploy("plan", "--gpus", "2xH200", "--exllamav3", "1.4.2", "--allow-uncalibrated", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    stack = plan["stack"]
    assert (stack["exllamav3"], stack["calibration"], stack["calibrated"]) == ("1.4.2", "1.6.5", False)
    assert (stack["uncalibrated_margin"]["min_mib"], stack["uncalibrated_margin"]["fraction"]) == (700, 0.09)
    margin = math.ceil(143771 * 0.09)  # 9 % of an H200 is more than 700 MiB
    assert plan["headroom_mib"] == calibrated["headroom_mib"] + margin
    for mine, theirs in zip(plan["per_gpu"], calibrated["per_gpu"]):
        assert mine["usable_mib"] == theirs["usable_mib"] - margin
    table = deploy("plan", "--gpus", "2xH200", "--exllamav3", "1.4.2", "--allow-uncalibrated").stdout
    assert "UNCALIBRATED" in table and f"{margin} MiB" in table and "exllamav3 1.6.5" in table


def test_context_max_is_accepted() -> None:
    result = deploy("plan", "--gpus", "8xH200", "--context", "max", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["context"] == 202752


def test_table_lists_every_candidate_and_marks_the_winner() -> None:
    result = deploy("plan", "--gpus", "8x24GiB")
    assert result.returncode == 0, result.stderr
    plan = json.loads(deploy("plan", "--gpus", "8x24GiB", "--json").stdout)
    rows = {line.split()[2]: line for line in result.stdout.splitlines() if line[:1] in (">", "x")}
    assert set(rows) == {plan["quant"]} | {r["quant"] for r in plan["rejected"]}
    assert rows[plan["quant"]].startswith(">") and f"context {plan['context']}" in rows[plan["quant"]]
    for rejection in plan["rejected"]:
        assert rows[rejection["quant"]].startswith("x")
        assert rejection["reason"] in rows[rejection["quant"]]
    assert any("needs" in line and "has" in line for line in rows.values())


def test_nothing_fits_is_exit_3_with_the_closest_option() -> None:
    line = assert_one_line_error(deploy("plan", "--gpus", "4x24GiB", "--context", "max"), 3)
    assert "--context" in line and "fits with up to" in line


def test_nothing_fits_at_all_is_exit_3() -> None:
    line = assert_one_line_error(deploy("plan", "--gpus", "RTX4090", "--json"), 3)
    assert "needs" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--gpus", "8xRTX9999"], "unknown GPU"),
        (["--gpus", "8x24"], "no unit"),
        (["--gpus", "8x24GiB", "--context", "300000"], "maximum of 202752"),
        (["--gpus", "8x24GiB", "--context", "lots"], "not a whole number"),
        (["--gpus", "8x24GiB", "--quant", "9bpw_H9"], "unknown quant"),
        (["--gpus", "8x24GiB", "--cache", "k5v4"], "--cache 5,4"),
        (["--gpus", "8x24GiB", "--split", "pipeline"], "unknown split"),
        (["--gpus", "8x24GiB", "--headroom-mib", "-5"], "negative"),
        (["--gpus", "8x24GiB", "--profile", "glm-9"], "no profile"),
    ],
)
def test_bad_input_is_exit_2_in_one_line(args: list[str], fragment: str) -> None:
    assert fragment in assert_one_line_error(deploy("plan", *args), 2)


@NO_NVML
def test_plan_without_gpus_or_driver_is_exit_4_pointing_to_gpus() -> None:
    assert "--gpus" in assert_one_line_error(deploy("plan"), 4)


@NO_NVML
@pytest.mark.parametrize("args", [[], ["--json"]])
def test_detect_without_driver_is_exit_4_pointing_to_gpus(args: list[str]) -> None:
    line = assert_one_line_error(deploy("detect", *args), 4, command="detect")
    assert "NVIDIA driver" in line and "--gpus" in line


def test_plan_path_imports_no_heavy_module() -> None:
    code = (
        "import sys, io, contextlib\nfrom toolkit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plan', '--gpus', '8x24GiB', '--json']) == 0\n"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_plan_shows_the_decode_bound_as_a_bound_with_its_assumptions() -> None:
    table = deploy("plan", "--gpus", "2xH200")
    assert table.returncode == 0, table.stderr
    assert "decode bound tok/s" in table.stdout and "upper bound on batch-1 decode" in table.stdout
    chosen = next(line for line in table.stdout.splitlines() if line.startswith(">"))
    data = json.loads(deploy("plan", "--gpus", "2xH200", "--json").stdout)
    bound = data["decode_bound"]
    assert "upper bound" in bound["label"] and "datasheet bandwidth" in bound["assumptions"]
    first = bound["candidates"][0]
    assert (first["quant"], first["split"], first["context"]) == (
        data["quant"],
        data["split"],
        data["context"],
    )
    assert f"<= {first['tokens_per_s']:.0f} tp" in chosen
    sizes = json.loads(deploy("plan", "--gpus", "8x24GiB", "--json").stdout)["decode_bound"]["candidates"]
    assert sizes and all(c["tokens_per_s"] is None and c["unknown"] for c in sizes)


def test_plan_says_what_a_smaller_chunk_size_bought_and_costs() -> None:
    table = deploy("plan", "--gpus", "141GB", "--context", "max")
    assert table.returncode == 0, table.stderr
    assert "chunk_size 1024 instead of 2048" in table.stdout and "prefill measured at 1.28x" in table.stdout
    data = json.loads(deploy("plan", "--gpus", "141GB", "--context", "max", "--json").stdout)
    assert data["chunk_size"] == data["chunk_trade"]["chunk_size"] == 1024
    assert data["chunk_trade"]["default_max_context"] < data["context"] <= data["chunk_trade"]["max_context"]

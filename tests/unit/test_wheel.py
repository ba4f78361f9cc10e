"""An installed wheel (not only the editable checkout) can plan and render: its data files ship inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.facts.profiles import load_profile
from toolkit.plan.bandwidth import bounds_dict, candidate_bounds
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import make_plan, plan_with_details
from toolkit.render.bundle import RenderOptions, render_bundle

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the built wheel, a venv with only that wheel installed as glm-deploy; dependencies from the running
    interpreter)."""
    work = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        work / "dist",
        ROOT,
        cwd=work,
    )
    (wheel,) = (work / "dist").glob("glm_deploy-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    without_checkout = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
        cwd=work,
        env=without_checkout,  # the checkout's egg-info on PYTHONPATH would read as "already installed"
    )
    # Then the dependencies, from the interpreter running the tests (itself often a venv, e.g. .venv): its
    # site-packages as plain path entries, so that its .pth hooks (an editable install of a checkout) do not run.
    (site,) = (venv / "lib").glob("python3*/site-packages")
    running = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "test-dependencies.pth").write_text("".join(f"{path}\n" for path in running))
    return wheel, venv


def test_wheel_holds_every_module_and_data_file(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "toolkit", "profiles", "dockerfiles", "compose"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: the list of files to expect is unknown")
    for path in tracked:
        if path.endswith(".md"):
            continue
        inside = path if path.startswith("toolkit/") else f"toolkit/_data/{path}"
        assert inside in names, f"{path} is missing from the wheel (pyproject.toml [tool.setuptools])"


def test_installed_wheel_plans_and_renders_outside_the_checkout(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, venv = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = run(
        venv / "bin" / "python", "-c", "import toolkit; print(toolkit.__file__)", cwd=tmp_path, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), "the venv imported the checkout, not the wheel"

    plan = run(venv / "bin" / "deploy", "plan", "--gpus", "8xRTX4090", "--json", cwd=tmp_path, env=env)
    profile, inventory = load_profile("glm-4.7"), parse_gpu_spec("8xRTX4090")
    expected, details = plan_with_details(profile, inventory, PlanRequest())
    bounds = bounds_dict(
        candidate_bounds(profile, inventory, details.candidates)
    )  # bandwidths from the wheel
    shown = {"mix_proposal": None, **expected.to_dict(), "decode_bound": bounds, "chunk_trade": None}
    assert json.loads(plan.stdout) == json.loads(json.dumps(shown))

    run(venv / "bin" / "deploy", "render", "--gpus", "2xH200", "--out", "tmp", cwd=tmp_path, env=env)
    here = render_bundle(
        make_plan(load_profile("glm-4.7"), parse_gpu_spec("2xH200"), PlanRequest()),
        tmp_path / "here",
        RenderOptions(models_dir=str(tmp_path / "tmp" / "models")),
    )
    for name in ("Dockerfile", "ensure-pr295.sh", "check_stack.py", "config.yml", "compose.yaml"):
        assert (tmp_path / "tmp" / name).read_bytes() == (here.out_dir / name).read_bytes(), name

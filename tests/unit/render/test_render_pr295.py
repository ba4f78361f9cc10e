"""The PR #295 build step (dockerfiles/ensure-pr295.sh, shipped in every bundle) run for real with git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.unit.render.render_plans import SERVING, make_plan
from tests.unit.render.tabby_fixture import TabbyFixture, build_tabby_fixture, clean_git_env, git
from toolkit.render.bundle import RenderOptions, render_bundle


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> TabbyFixture:
    return build_tabby_fixture(tmp_path_factory.mktemp("tabby"))


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    """The script as a rendered bundle ships it (the very file the Dockerfile COPYs)."""
    out = tmp_path_factory.mktemp("bundle") / "out"
    bundle = render_bundle(
        make_plan(1, "single", "h200"), out, RenderOptions(serving=SERVING, run_as=(1000, 1000))
    )
    return bundle.pr295_script


def _checkout(tmp_path: Path, origin: Path, ref: str) -> Path:
    """What the Dockerfile does: clone, then detach at the pinned ref."""
    checkout = tmp_path / "tabbyAPI"
    git(tmp_path, "clone", "-q", str(origin), str(checkout))
    git(checkout, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", ref)
    return checkout


def _run(script: Path, checkout: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(script), *args],
        cwd=checkout,
        env=clean_git_env(checkout.parent),
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_base_without_the_pr_gets_it_merged_conflict_resolved(fixture, script, tmp_path) -> None:
    checkout = _checkout(tmp_path, fixture.origin, fixture.base)
    result = _run(script, checkout, fixture.pr_head)
    assert result.returncode == 0, result.stderr
    assert "merged PR #295" in result.stdout and "reasoning parser present" in result.stdout
    parents = git(checkout, "rev-list", "--parents", "-n", "1", "HEAD").split()[1:]
    assert parents == [fixture.base, fixture.pr_head]
    # The config_sample.yml conflict went to the PR's side (-X theirs) ...
    assert (checkout / "config_sample.yml").read_text() == git(
        checkout, "show", f"{fixture.pr_head}:config_sample.yml"
    ) + "\n"
    # ... and main's own work is kept: a merge, not a checkout of the PR head (which cannot load EXL3).
    assert (checkout / "backends/exllamav3/model.py").is_file()
    assert "reasoning_start_token" in (checkout / "common/config_models.py").read_text()


def test_a_base_that_contains_the_pr_is_left_alone(fixture, script, tmp_path) -> None:
    checkout = _checkout(tmp_path, fixture.origin, fixture.merged)
    result = _run(script, checkout, fixture.pr_head)
    assert result.returncode == 0, result.stderr
    assert "nothing to merge" in result.stdout
    assert git(checkout, "rev-parse", "HEAD") == fixture.merged
    assert git(checkout, "status", "--porcelain") == ""


def test_a_broken_pr_head_fails_the_step_clearly(fixture, script, tmp_path) -> None:
    checkout = _checkout(tmp_path, fixture.broken_origin, fixture.base)
    result = _run(script, checkout, fixture.broken)
    assert result.returncode == 1
    assert "reasoning parser (PR #295) is not in the tree" in result.stderr
    assert "reasoning_start_token" in result.stderr


def test_an_unexpected_pr_head_is_refused(fixture, script, tmp_path) -> None:
    checkout = _checkout(tmp_path, fixture.broken_origin, fixture.base)
    result = _run(script, checkout, fixture.pr_head)
    assert result.returncode == 1
    assert f"is {fixture.broken}, expected {fixture.pr_head}" in result.stderr
    assert git(checkout, "rev-parse", "HEAD") == fixture.base


@pytest.mark.parametrize("argument", ["", "beef2d0", "HEAD", "x" * 40, "; id"])
def test_the_pr_head_argument_must_be_a_full_sha(fixture, script, tmp_path, argument) -> None:
    checkout = _checkout(tmp_path, fixture.origin, fixture.base)
    result = _run(script, checkout, argument)
    assert result.returncode == 2 and "PR_HEAD_SHA" in result.stderr

"""First contact on a stock system: the README's first command, verbatim, in a fresh container of a stock image.

The images are made once by scripts/make-test-base-image.sh with debootstrap (minbase + python3 only: no pip, no
venv module support, no Python packages, no project files), as a fresh Debian 12 (and Debian 13, and Ubuntu 24.04
where the host's apt sources name an Ubuntu mirror) looks. The project's files (what git tracks, plus untracked
files git does not ignore) are copied in; the command is read from README.md, so README and test cannot drift.
The container reaches the package index and apt mirror as the host does (tests/docker/host_pip.py).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from docker.errors import ImageNotFound

from tests.conftest import REQUIRE_DOCKER
from tests.docker.host_pip import for_container, host_pip_settings
from tests.readme import two_commands
from toolkit import __version__

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
STOCK = os.environ.get("GLM_DEPLOY_TEST_STOCK", "glm-deploy-test-stock")
# bookworm is required (the set-up script fails without it); the others exist when the host's mirror had them.
RELEASES = [("bookworm", True), ("trixie", False), ("noble", False)]
STEP_TIMEOUT_S = 900
PLAN_ARGS = ["plan", "--gpus", "8x24GiB", "--json"]


@dataclass(frozen=True)
class Result:
    """One command's outcome in the container."""

    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.stderr.splitlines() if line.strip()]


class Box:
    """A running container of a stock image, commands run in it through `docker exec`."""

    def __init__(self, container: Any) -> None:
        self.container = container

    def run(self, command: str, user: str = "root", workdir: str = "/", login: bool = False) -> Result:
        """bash -c COMMAND (a login shell with login=True) as USER in WORKDIR, bounded by coreutils' `timeout`."""
        shell = ["bash", "-lc" if login else "-c", command]
        code, (out, err) = self.container.exec_run(
            ["timeout", str(STEP_TIMEOUT_S), *shell], user=user, workdir=workdir, demux=True
        )
        return Result(code, (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace"))

    def put_project(self, folder: str, owner: str = "root") -> None:
        """The project's files under FOLDER, owned by OWNER."""
        self.run(f"mkdir -p {folder}")
        assert self.container.put_archive(folder, _project_tar())
        assert self.run(f"chown -R {owner}: {folder}").code == 0


def _project_tar() -> bytes:
    """A tar of the files git tracks plus untracked ones it does not ignore (no .venv, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(set(filter(None, listed.split("\0")))):
            if (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name)
    return buffer.getvalue()


@pytest.fixture(params=RELEASES, ids=[release for release, _ in RELEASES])
def box(request, docker_client) -> Iterator[Box]:
    """A fresh container of one stock image with the host's pip settings; removed afterwards."""
    release, required = request.param
    image = f"{STOCK}:{release}"
    try:
        docker_client.images.get(image)
    except ImageNotFound:
        reason = f"{image} was not built by scripts/make-test-base-image.sh (see its output for why)"
        if required and REQUIRE_DOCKER:
            pytest.fail(f"GLM_DEPLOY_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(reason)
    pip = for_container(host_pip_settings())
    container = docker_client.containers.run(
        image,
        ["sleep", "infinity"],
        name=f"glmdt-install-{release}-{secrets.token_hex(4)}",
        detach=True,
        environment=pip.environment,
        volumes=pip.docker_volumes(),
    )
    try:
        yield Box(container)
    finally:
        container.remove(force=True)


def test_readme_command_installs_and_runs_on_a_stock_system(box: Box) -> None:
    first, _ = two_commands()
    assert box.run("python3 -m pip --version").code != 0, "the stock image must not have pip"
    assert box.run("python3 -c 'import ensurepip'").code != 0, "the stock image must not have python3-venv"

    # A user without root on a system without python3-venv: one line saying what to install, nothing else done.
    assert box.run("useradd --create-home tester").code == 0
    box.put_project("/home/tester/glm-deploy", owner="tester")
    as_user = box.run(first, user="tester", workdir="/home/tester/glm-deploy")
    assert as_user.code == 4, as_user
    missing_venv = "python3 cannot make virtual environments -- run `sudo apt-get install python3-venv`"
    assert as_user.lines() == [f"install.sh: {missing_venv}, then this again"]
    assert box.run("test -e /home/tester/glm-deploy/.venv").code != 0
    # The test set-up, likewise: one line naming what is missing and how to get it, nothing installed.
    setup = box.run("scripts/setup-dev.sh", user="tester", workdir="/home/tester/glm-deploy")
    assert setup.code == 4 and len(setup.lines()) == 1, setup
    assert (
        setup.lines()[0].startswith("setup-dev.sh: missing docker.io debootstrap ")
        and "python3-venv" in setup.stderr
    )

    # root: python3-venv from apt, the project into .venv, deploy onto the PATH; then `deploy auto` finds no GPU.
    box.put_project("/root/glm-deploy")
    installed = box.run(first, workdir="/root/glm-deploy")
    assert installed.code == 4, installed
    assert "Traceback" not in installed.stdout + installed.stderr
    assert installed.lines()[-1].startswith("deploy auto: no NVIDIA driver found"), installed.stderr[-3000:]
    assert "plan for another host" in installed.lines()[-1]
    assert any(line.startswith("install.sh: glm-deploy ") for line in installed.lines())

    version = box.run("deploy --version")
    assert (version.code, version.stdout.strip()) == (0, f"glm-deploy {__version__}")
    assert box.run("readlink /usr/local/bin/deploy").stdout.strip() == "/root/glm-deploy/.venv/bin/deploy"

    plan = box.run("deploy " + " ".join(PLAN_ARGS))
    assert plan.code == 0 and plan.stderr == "", plan
    on_host = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *PLAN_ARGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(plan.stdout) == json.loads(on_host.stdout)  # the same plan as this checkout makes

    detect = box.run("deploy detect")
    assert detect.code == 4 and detect.stdout == ""
    assert len(detect.lines()) == 1 and detect.lines()[0].startswith("deploy detect: ")
    assert "plan for another host" in detect.lines()[0]

    # Idempotent: running the install again keeps the environment and the link.
    install = first.partition(" && ")[0]
    again = box.run(install, workdir="/root/glm-deploy")
    assert again.code == 0 and "creating the virtual environment" not in again.stderr, again

    # The user again, now that python3-venv is there: a .venv of its own, deploy linked into ~/.local/bin with a
    # note that it is not on the PATH yet; a new login puts it there (the stock ~/.profile) and the command works.
    home = "/home/tester/glm-deploy"
    own = box.run(install, user="tester", workdir=home)
    assert own.code == 0 and "install.sh: note: /home/tester/.local/bin is not on your PATH" in own.stderr, (
        own
    )
    assert box.run("readlink ~/.local/bin/deploy", user="tester").stdout.strip() == f"{home}/.venv/bin/deploy"
    relogin = box.run(first, user="tester", workdir=home, login=True)
    assert relogin.code == 4 and relogin.lines()[-1].startswith("deploy auto: no NVIDIA driver found"), (
        relogin
    )

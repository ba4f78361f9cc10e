"""The hostile suite's harness: a sandbox every CLI run lives in, canary secrets, and the invariants every run keeps.

Every run (in-process through toolkit.cli.main, or as a `python3 -m toolkit.cli` process when a broken CLI could
hang or exhaust the test process) happens with HOME, TMPDIR and the working directory inside the sandbox, Docker
pointed at a socket that does not exist, and HF_ENDPOINT at a closed port unless a test gives a hostile hub. The
canaries (an API key, an HF token) are planted where the CLI reads keys; no output or written file may hold them.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hostile.servers import HostileTabby, free_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "canary-api-key-5e2b7c91d04f4a6b"
HF_TOKEN = "hf_canaryToken8d3f1a7c2b9e6d4f"
CANARIES = (API_KEY, HF_TOKEN)
EXIT_CODES = {0, 2, 3, 4, 5}
# The engine the few Docker-marked cases use (every other run sees an unreachable one).
ORIGINAL_DOCKER_HOST = os.environ.get("DOCKER_HOST")


@dataclass(frozen=True)
class Run:
    """What one CLI run did."""

    code: int
    out: str
    err: str
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.out + self.err


def assert_contained(run: Run, secrets: tuple[str, ...] = CANARIES) -> None:
    """The invariants of every run: a documented exit code, no traceback, no secret in any output."""
    assert run.code in EXIT_CODES, f"exit {run.code}: {run.text[-2000:]}"
    assert "Traceback" not in run.text, run.text[-3000:]
    for secret in secrets:
        assert secret not in run.text, f"a secret is in the output: {run.text[-2000:]}"


def assert_one_line(run: Run, code: int) -> str:
    """An expected failure: exactly this exit code and one line on stderr naming the command; returns the line."""
    assert_contained(run)
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert run.code == code, f"exit {run.code}, expected {code}: {run.text[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("deploy"), run.err[-2000:]
    return lines[0]


def files_holding(root: Path, secrets: tuple[str, ...] = CANARIES, skip: tuple[Path, ...] = ()) -> list[str]:
    """Every regular file under root (but `skip`) whose bytes contain a secret."""
    found = []
    for path in root.rglob("*"):
        if path in skip or path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        found += [str(path) for secret in secrets if secret.encode() in data]
    return found


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything under root: compare two to see what a run touched."""
    state = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        state[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return state


@dataclass(frozen=True)
class Sandbox:
    """Folders a run may see: home, tmp, work (the cwd) and files the test prepares."""

    root: Path
    home: Path
    tmp: Path
    work: Path
    env: dict[str, str]
    key_file: Path
    token_file: Path


@pytest.fixture()
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """HOME, TMPDIR and cwd inside tmp_path; Docker and the hub unreachable; canary key and token in files."""
    root = tmp_path / "sandbox"
    home, tmp, work = root / "home", root / "tmp", root / "work"
    for folder in (home, tmp, work):
        folder.mkdir(parents=True)
    key_file = root / "api-key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    token_file = root / "hf-token"
    token_file.write_text(HF_TOKEN + "\n")
    token_file.chmod(0o600)
    env = {
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "DOCKER_HOST": f"unix://{root}/no-docker.sock",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_TOKEN": HF_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "NO_COLOR": "1",
        "TERM": "dumb",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("DEPLOY_API_KEY", "GLM_DEPLOY_NO_GPU", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.chdir(work)
    return Sandbox(root, home, tmp, work, env, key_file, token_file)


@pytest.fixture()
def cli(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]):
    """Run `deploy ARGS` in-process (toolkit.cli.main); returns a Run and checks the universal invariants."""
    from toolkit.cli import main

    def run(*argv: str, check: bool = True) -> Run:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        captured = capsys.readouterr()
        result = Run(int(code or 0), captured.out, captured.err)
        if check:
            assert_contained(result)
        return result

    return run


def _limit_memory(gib: float) -> None:
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.fixture()
def deploy(sandbox: Sandbox):
    """Run `python3 -m toolkit.cli ARGS` as a process in the sandbox, with a wall-clock (and memory) limit.

    For hostile inputs that could hang or exhaust the test process itself (FIFOs, trickling servers, bombs):
    running past `timeout` is a failure, not a hung suite.
    """

    def run(
        *argv: str,
        timeout: float = 60,
        memory_gib: float | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        check: bool = True,
    ) -> Run:
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "LANG": "C.UTF-8",
            **sandbox.env,
            **(env or {}),
        }
        started = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "toolkit.cli", *argv],
                cwd=sandbox.work,
                env=full_env,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                check=False,
                timeout=timeout,
                preexec_fn=(lambda: _limit_memory(memory_gib)) if memory_gib else None,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`deploy {' '.join(argv)[:200]}` ran past {timeout} s")
        result = Run(
            done.returncode,
            done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"),
            time.monotonic() - started,
        )
        if check:
            assert_contained(result)
        return result

    return run


@pytest.fixture(scope="session")
def honest_tabby(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileTabby]:
    """The test server with nothing bent: what references are recorded from."""
    with HostileTabby(tmp_path_factory.mktemp("honest"), API_KEY, model_name="tiny") as server:
        yield server


PROMPTS = {
    "version": 1,
    "prompts": [
        {
            "name": "river",
            "text": "The river had been rising for three days before anyone in the village thought to "
            "move the boats, and by then the water had reached the old stone bridge.",
        },
        {
            "name": "market",
            "text": "On Saturday mornings the square filled with stalls selling bread, cheese, honey "
            "and vegetables, and the smell of coffee drifted over the whole town.",
        },
        {
            "name": "code",
            "text": "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
            "    return total / len(values) if values else 0.0\n",
        },
        {
            "name": "letters",
            "text": "Dear Anna, thank you for the long letter and the photographs of the garden; the "
            "roses look wonderful this year and the apple tree is finally bearing fruit.",
        },
    ],
}


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prompt set (a faster reference than the shipped 40 prompts)."""
    import yaml

    path = tmp_path_factory.mktemp("prompts") / "prompts.yaml"
    path.write_text(yaml.safe_dump(PROMPTS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def reference_file(
    honest_tabby: HostileTabby, prompts_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A deployment reference recorded from the honest server through `deploy reference record`."""
    from toolkit.cli import main

    folder = tmp_path_factory.mktemp("reference")
    key = folder / "key"
    key.write_text(API_KEY + "\n")
    path = folder / "reference.json.gz"
    code = main(
        [
            "reference",
            "record",
            "--url",
            honest_tabby.url,
            "--api-key-file",
            str(key),
            "--out",
            str(path),
            "--prompts",
            str(prompts_file),
        ]
    )
    assert code == 0 and path.is_file()
    return path

"""Local git repositories shaped like TabbyAPI's history around PR #295 (../shared/facts/tabbyapi.md).

    A (2025-03, pre-PR main) --- M (main: exllamav3 backend; touches config_sample.yml) --- MERGED (main + PR)
      \\--- P (pull/295/head: the reasoning parser; touches config_sample.yml at the same place)   /
      \\--- BROKEN (a head that claims to be the PR but carries no parser)

`origin.git` serves main and refs/pull/295/head = P; `broken.git` serves refs/pull/295/head = BROKEN.
Merging P into M conflicts in config_sample.yml only, as the real merge does, and -X theirs settles it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

IDENTITY = {
    "GIT_AUTHOR_NAME": "fixture",
    "GIT_AUTHOR_EMAIL": "fixture@localhost",
    "GIT_COMMITTER_NAME": "fixture",
    "GIT_COMMITTER_EMAIL": "fixture@localhost",
}


def clean_git_env(home: Path) -> dict[str, str]:
    """An environment with no user git config and no identity (like a Docker build step)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "LANG": "C",
    }


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run git, return stdout; raise with stderr on failure."""
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=env or {**clean_git_env(cwd), **IDENTITY},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


@dataclass(frozen=True)
class TabbyFixture:
    """Commit ids and the bare repositories a test clones from."""

    origin: Path
    broken_origin: Path
    base: str  # M: a main without the PR
    pr_head: str  # P
    merged: str  # MERGED: a main that already contains the PR
    broken: str  # BROKEN


def _write(repo: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _commit(repo: Path, message: str, files: dict[str, str]) -> str:
    _write(repo, files)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def build_tabby_fixture(root: Path) -> TabbyFixture:
    """Create the work repository and the two bare repositories under root."""
    work = root / "work"
    work.mkdir(parents=True)
    git(work, "init", "-q", "-b", "main")
    _commit(
        work,
        "TabbyAPI before PR #295",
        {
            "pyproject.toml": '[project]\nname = "tabbyAPI"\nversion = "0.0.1"\n'
            "[tool.setuptools]\npy-modules = []\n",
            "main.py": "print('tabby')\n",
            "common/config_models.py": "class ModelConfig:\n    cache_mode: str = 'FP16'\n",
            "endpoints/OAI/types/chat_completion.py": "class ChatCompletionMessage:\n    content: str = ''\n",
            "config_sample.yml": "model:\n  cache_mode: FP16\n",
        },
    )
    git(work, "branch", "pr-base")
    base = _commit(
        work,
        "Backends: exllamav3",
        {
            "backends/exllamav3/model.py": "class ExllamaV3Container:\n    pass\n",
            "config_sample.yml": "model:\n  cache_mode: FP16\n  backend: exllamav3\n",
        },
    )
    git(work, "checkout", "-q", "-b", "feat_reasoning", "pr-base")
    pr_head = _commit(
        work,
        "reasoning parser support",
        {
            "common/config_models.py": "class ModelConfig:\n    cache_mode: str = 'FP16'\n"
            "    reasoning: bool = False\n"
            "    reasoning_start_token: str = '<think>'\n"
            "    reasoning_end_token: str = '</think>'\n",
            "endpoints/OAI/types/chat_completion.py": "class ChatCompletionMessage:\n    content: str = ''\n"
            "    reasoning_content: str | None = None\n",
            "config_sample.yml": "model:\n  cache_mode: FP16\n  reasoning: false\n"
            '  reasoning_start_token: "<think>"\n',
        },
    )
    git(work, "checkout", "-q", "-b", "broken", "pr-base")
    broken = _commit(
        work,
        "claims to be the PR, has no parser",
        {"config_sample.yml": "model:\n  cache_mode: FP16\n  reasoning: false\n"},
    )
    git(work, "checkout", "-q", "-b", "merged", base)
    git(work, "merge", "-q", "--no-edit", "-X", "theirs", pr_head)
    merged = git(work, "rev-parse", "HEAD")
    git(work, "checkout", "-q", "main")
    repos = []
    for name, pull_head in (("origin.git", pr_head), ("broken.git", broken)):
        bare = root / name
        git(root, "clone", "-q", "--bare", str(work), str(bare))
        git(bare, "update-ref", "refs/pull/295/head", pull_head)
        for branch in ("pr-base", "feat_reasoning", "broken"):  # the PR is reachable only as pull/295/head
            git(bare, "branch", "-q", "-D", branch)
        repos.append(bare)
    return TabbyFixture(
        origin=repos[0], broken_origin=repos[1], base=base, pr_head=pr_head, merged=merged, broken=broken
    )

"""Where the project's data lives: profiles/, dockerfiles/ and compose/ at the top of a source checkout (also an
editable install), or toolkit/_data/ inside an installed wheel (pyproject.toml maps the same folders there)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """A data folder: the wheel's copy when installed, else the checkout's top-level folder."""
    installed = PACKAGE_DIR / "_data" / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


PROFILES_DIR = data_dir("profiles")
DOCKERFILES_DIR = data_dir("dockerfiles")
COMPOSE_DIR = data_dir("compose")

"""Where the project's data lives: profiles, templates (next to the package in a source checkout)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "profiles"
DOCKERFILES_DIR = ROOT / "dockerfiles"
COMPOSE_DIR = ROOT / "compose"

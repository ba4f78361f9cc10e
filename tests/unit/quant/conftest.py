"""Fixtures of the quant tests: small EXL3 quants on disk, and the exllamav3 test double on the entry point's path."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from toolkit.quant import mix

from .exl3_folders import make_quant

DOUBLE_DIR = Path(__file__).resolve().parents[2] / "exllamav3_double"


@pytest.fixture()
def quant(tmp_path) -> Callable[..., Path]:
    """make_quant under tmp_path/models/<name>, the name being the branch (marker written unless marker=None)."""

    def make(name: str, bits: int, **kwargs) -> Path:
        kwargs.setdefault("marker", ("owner/GLM-Tiny-EXL3", name, f"{bits:x}" * 40))
        return make_quant(tmp_path / "models" / name, bits, **kwargs)

    return make


@pytest.fixture()
def double(monkeypatch) -> mix.PythonRunner:
    """This Python running the entry point with the exllamav3 TEST DOUBLE importable (and nothing else changed)."""
    monkeypatch.setenv("PYTHONPATH", str(DOUBLE_DIR))
    return mix.PythonRunner(sys.executable)

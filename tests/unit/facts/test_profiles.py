"""Profiles are validated on load: a malformed one is one clear line naming the file and the field (exit 2)."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolkit.errors import BadInput
from toolkit.facts.paths import PROFILES_DIR
from toolkit.facts.profiles import load_profile, parse_profile
from toolkit.facts.tabby_pin import load_tabby_pin

ROOT = Path(__file__).resolve().parents[3]
SOURCE = PROFILES_DIR / "glm-4.7.yaml"
RAW = yaml.safe_load(SOURCE.read_text())


def test_the_shipped_profile_loads_with_all_ten_quants_and_overhead_terms() -> None:
    profile = load_profile("glm-4.7")
    assert len(profile.quants) == 10
    assert {"2bpw_H6", "8bpw_H8", "3.84bpw-tuned"} <= {q.branch for q in profile.quants}
    terms = profile.memory_overhead
    assert terms.base_mib > 0 and terms.chunk_mib_per_token >= 0


def test_memory_terms_are_keyed_by_the_exllamav3_version_they_were_measured_with() -> None:
    profile = load_profile("glm-4.7")
    pin = load_tabby_pin()
    calibration = profile.calibration_for(pin.exllamav3)
    assert calibration is not None and calibration.tabbyapi == pin.ref  # the shipped stack is calibrated
    assert profile.memory_overhead == calibration.terms and profile.calibration == pin.exllamav3
    assert profile.calibration_for("1.4.2") is None
    with pytest.raises(BadInput, match="no memory calibration for exllamav3 1.4.2"):
        profile.with_calibration("1.4.2")
    data = copy.deepcopy(RAW)
    older = copy.deepcopy(data["memory_overhead"]["1.6.5"])
    older["base_mib"] += 500
    data["memory_overhead"]["1.4.2"] = older
    two = parse_profile(data, SOURCE)
    assert [c.exllamav3 for c in two.calibrations] == ["1.4.2", "1.6.5"]
    assert two.with_calibration("1.4.2").memory_overhead.base_mib == calibration.terms.base_mib + 500
    assert two.memory_overhead == calibration.terms  # as loaded: the newest version's terms


def test_the_uncalibrated_margin_is_the_larger_of_its_two_terms() -> None:
    margin = load_profile("glm-4.7").uncalibrated_margin
    assert (margin.min_mib, margin.fraction) == (700, 0.09)  # ../shared/facts/tabbyapi.md
    assert margin.mib(24564) == 2211 and margin.mib(4096) == 700


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


BROKEN = [
    (_set(("quants", 2, "bpw"), "four"), "quants[2].bpw"),
    (_set(("quants", 0, "size_gib"), 120), "quants[0].size_gib"),
    (_set(("quants", 1, "top_k_agreement"), [1.5]), "quants[1].top_k_agreement"),
    (_set(("architecture", "head_dim"), -128), "architecture.head_dim"),
    (_drop(("architecture", "num_key_value_heads")), "architecture.num_key_value_heads"),
    (_drop(("memory_overhead", "1.6.5", "base_mib")), "memory_overhead.1.6.5.base_mib"),
    (
        _set(("memory_overhead", "1.6.5", "chunk_mib_per_token"), "0.06 MiB"),
        "memory_overhead.1.6.5.chunk_mib_per_token",
    ),
    (_set(("memory_overhead", "1.6.5", "tabbyapi"), "e632af4"), "memory_overhead.1.6.5.tabbyapi"),
    (_drop(("memory_overhead", "1.6.5", "source")), "memory_overhead.1.6.5.source"),
    (_set(("memory_overhead", "latest"), {}), "memory_overhead.latest"),
    (_set(("memory_overhead",), {}), "memory_overhead"),
    (_drop(("memory_overhead",)), "memory_overhead"),
    (_set(("uncalibrated_margin", "fraction"), 2), "uncalibrated_margin.fraction"),
    (_drop(("uncalibrated_margin",)), "uncalibrated_margin"),
    (_set(("serving", "default_min_context"), 0), "serving.default_min_context"),
    (_set(("serving", "cache_floor"), "k5v4"), "serving.cache_floor"),
    (_drop(("serving", "cache_floor")), "serving.cache_floor"),
    (_set(("hf_repo",), "not a repo"), "hf_repo"),
    (_set(("serving", "chunk_fallbacks", 0, "chunk_size"), 4096), "serving.chunk_fallbacks[0].chunk_size"),
    (_set(("serving", "chunk_fallbacks", 1, "chunk_size"), 1024), "serving.chunk_fallbacks[1].chunk_size"),
    (
        _set(("serving", "chunk_fallbacks", 0, "calibrated_splits"), ["pp"]),
        "serving.chunk_fallbacks[0].calibrated_splits",
    ),
    (
        _set(("serving", "chunk_fallbacks", 1, "prefill_vs_default"), [0]),
        "serving.chunk_fallbacks[1].prefill_vs_default",
    ),
]


@pytest.mark.parametrize(("mutate", "field"), BROKEN, ids=[field for _, field in BROKEN])
def test_malformed_profile_names_file_and_field(mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    data = copy.deepcopy(RAW)
    mutate(data)
    with pytest.raises(BadInput) as caught:
        parse_profile(data, Path("/profiles/broken.yaml"))
    line = caught.value.line()
    assert "/profiles/broken.yaml" in line and repr(field) in line and "\n" not in line


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_malformed_profile_on_the_command_line_is_exit_2(tmp_path: Path) -> None:
    data = copy.deepcopy(RAW)
    data["memory_overhead"]["1.6.5"]["base_mib"] = "a lot"
    path = _write(tmp_path, data)
    result = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "plan", "--profile", str(path), "--gpus", "8x24GiB"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "memory_overhead.1.6.5.base_mib" in lines[0]


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("schema: 1\nname: [unclosed\n")
    with pytest.raises(BadInput) as caught:
        load_profile(str(path))
    assert str(path) in caught.value.line() and "line" in caught.value.line()

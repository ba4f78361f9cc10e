"""compose/: the knowledge defaults live in data files and reach the rendered compose and stack files as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.unit.render.render_plans import SERVING, make_plan
from toolkit.errors import BadInput
from toolkit.facts.paths import COMPOSE_DIR
from toolkit.render.bundle import RenderOptions, render_files
from toolkit.render.compose import merge

TOKENS = "api_key: 00000000000000000000000000000000\nadmin_key: 11111111111111111111111111111111\n"


def test_merge_keeps_the_base_order_fills_nulls_and_appends_new_keys() -> None:
    base = {"a": None, "b": 1, "c": {"x": None, "y": "kept"}}
    merged = merge(base, {"d": 4, "c": {"x": 2}, "a": 0})
    assert list(merged) == ["a", "b", "c", "d"] and merged == {
        "a": 0,
        "b": 1,
        "c": {"x": 2, "y": "kept"},
        "d": 4,
    }
    assert list(merged["c"]) == ["x", "y"]


def test_a_null_the_renderer_leaves_open_is_an_error() -> None:
    with pytest.raises(BadInput, match="c.x"):
        merge({"c": {"x": None}}, {})


def test_the_rendered_service_carries_the_base_file_defaults() -> None:
    base = yaml.safe_load((COMPOSE_DIR / "tabbyapi.yaml").read_text())
    files = render_files(
        make_plan(2, "tp", "h200"),
        Path("/srv/out"),
        RenderOptions(serving=SERVING, run_as=(1000, 1000), models_dir="/srv/models"),
        TOKENS,
    )
    service = yaml.safe_load(files["compose.yaml"][0])["services"]["tabbyapi"]
    decided = {key for key, value in base.items() if value is None}
    assert list(service)[: len(base)] == list(base)  # the file's key order
    for key, value in base.items():
        if key == "healthcheck":
            assert {k: v for k, v in service[key].items() if value[k] is not None} == {
                k: v for k, v in value.items() if v is not None
            }
        elif key not in decided:
            assert service[key] == value, key

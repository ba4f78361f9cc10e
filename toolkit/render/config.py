"""TabbyAPI's config.yml from a plan (keys of config_sample.yml at the pin; ../shared/facts/tabbyapi.md)."""

from __future__ import annotations

from typing import Any

import yaml

from .. import validate
from ..errors import BadInput
from ..facts.profiles import Serving, load_profile
from ..facts.runtime import CACHE_PAGE_TOKENS, CONTAINER_CONFIG, CONTAINER_MODELS_DIR, CONTAINER_PORT
from ..plan.plan import Plan


class _Quoted(str):
    """A string that is always written double-quoted (cache_mode "6,5" reads as text to any YAML reader)."""


class _Dumper(yaml.SafeDumper):
    """Safe YAML with double-quoted _Quoted values."""


_Dumper.add_representer(
    _Quoted, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style='"')
)


def model_folder(plan: Plan) -> str:
    """The model's folder under the models directory: the quant branch (toolkit.deploy.hub.model_path's contract).

    It is also TabbyAPI's model_name, hence the API model id.
    """
    return validate.safe_name(plan.quant, "plan quant")


def serving_for(plan: Plan) -> Serving:
    """The serving settings of the plan's profile (reasoning tokens, tool format)."""
    return load_profile(validate.safe_name(plan.profile, "plan profile")).serving


def _split_settings(plan: Plan) -> dict[str, Any]:
    """tensor_parallel / gpu_split_auto / gpu_split as planned (gpu_split: GB per GPU, container order)."""
    if plan.split not in ("single", "tp", "layer"):
        raise BadInput(f"plan split {plan.split!r} is not single, tp or layer", "re-run `deploy plan`")
    settings: dict[str, Any] = {"tensor_parallel": plan.split == "tp"}
    if plan.gpu_split:
        if len(plan.gpu_split) != len(plan.per_gpu):
            raise BadInput(
                f"plan gpu_split has {len(plan.gpu_split)} entries for {len(plan.per_gpu)} GPUs",
                "re-run `deploy plan`",
            )
        settings["gpu_split_auto"] = False
        settings["gpu_split"] = [
            round(validate.finite_number(gb, "gpu_split entry", 0.0, 1e4), 3) for gb in plan.gpu_split
        ]
    else:
        settings["gpu_split_auto"] = True
    return settings


def tabby_config(
    plan: Plan,
    serving: Serving | None = None,
    *,
    model_dir: str = CONTAINER_MODELS_DIR,
    port: int = CONTAINER_PORT,
) -> dict[str, Any]:
    """The TabbyAPI config for a plan as a plain dict (the cluster helper turns it into a Swarm config)."""
    serving = serving or serving_for(plan)
    context = validate.positive_int(plan.context, "plan context")
    cache_size = validate.positive_int(plan.cache_size, "plan cache_size")
    if cache_size % CACHE_PAGE_TOKENS or cache_size < context:
        raise BadInput(
            f"plan cache_size {cache_size} must be a multiple of {CACHE_PAGE_TOKENS} and >= context "
            f"{context}",
            "re-run `deploy plan`",
        )
    if not model_dir.startswith("/") or not validate.HOST_PATH.match(model_dir):
        raise BadInput(
            f"container model_dir {model_dir!r} is not a safe absolute path", f"use {CONTAINER_MODELS_DIR}"
        )
    for token in (serving.reasoning_start_token, serving.reasoning_end_token):
        if not token or any(ord(ch) < 32 or ord(ch) == 127 for ch in token):
            raise BadInput(
                f"profile reasoning token {token!r} is empty or has control characters", "fix the profile"
            )
    return {
        "network": {"host": "0.0.0.0", "port": validate.port(port, "container port"), "disable_auth": False},
        "model": {
            "model_dir": model_dir,
            "model_name": model_folder(plan),
            "max_seq_len": context,
            "cache_size": cache_size,
            "cache_mode": _Quoted(validate.cache_mode(plan.cache_mode)),
            **_split_settings(plan),
            "chunk_size": validate.positive_int(plan.chunk_size, "plan chunk_size", 1 << 20),
            "reasoning": bool(serving.reasoning),
            "reasoning_start_token": serving.reasoning_start_token,
            "reasoning_end_token": serving.reasoning_end_token,
            "tool_format": validate.safe_name(serving.tool_format, "profile tool_format"),
        },
        # Unset: the sample config's safe_defaults would inject temperature 0.8 / top_p 0.9 into requests.
        "sampling": {"override_preset": None},
    }


def config_yaml(config: dict[str, Any], plan_digest: str) -> str:
    """config.yml text: a header naming its origin, then safe YAML in TabbyAPI's key order."""
    header = (
        "# TabbyAPI config.yml rendered by glm-deploy (`deploy render`); do not edit, re-render.\n"
        f"# Plan {plan_digest}. Mounted read-only at {CONTAINER_CONFIG}.\n"
    )
    return header + yaml.dump(
        config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=False
    )

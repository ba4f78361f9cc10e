"""The out-of-memory retry policy of `up --retry-smaller`: half the context, re-planned and re-rendered in place."""

from __future__ import annotations

from ..facts.runtime import CACHE_PAGE_TOKENS
from ..plan.memory import cache_size_tokens
from ..plan.plan import Plan
from .deployment import Deployment, load_deployment


def smaller_context(context: int, minimum: int) -> int | None:
    """Half the context rounded down to whole cache pages, never below the profile minimum (None: no room)."""
    half = (context // 2) // CACHE_PAGE_TOKENS * CACHE_PAGE_TOKENS
    candidate = max(half, minimum)
    return candidate if candidate < context else None


def replan(dep: Deployment, context: int) -> Deployment:
    """Plan again for the same GPUs, quant and cache mode with a smaller required context, and re-render in place."""
    from ..facts.profiles import load_profile
    from ..plan.plan import PlanRequest
    from ..plan.planner import make_plan
    from ..render.bundle import RenderOptions, render_bundle

    plan = dep.plan
    request = PlanRequest(
        context=context,
        quant=plan.mix.spec if plan.mix else plan.quant,  # the same mix: the same folder and weights
        cache=plan.cache_mode,
        split=plan.split if plan.split != "single" else "auto",
        cuda=plan.stack.cuda,
        tabby_ref=plan.stack.tabbyapi,
        exllamav3=plan.stack.exllamav3,
        allow_uncalibrated=not plan.stack.calibrated,
    )
    new_plan = make_plan(load_profile(plan.profile), plan.inventory, request)
    new_plan = _with_context(new_plan, context)
    manifest = dep.manifest
    render_bundle(
        new_plan,
        dep.out_dir,
        RenderOptions(
            bind=str(manifest["bind"]),
            port=int(manifest["port"]),
            models_dir=str(manifest["models_dir"]),
            gpu_reservation=bool(manifest.get("gpu_reservation", True)),
            force=True,
        ),
    )
    return load_deployment(dep.out_dir)


def _with_context(plan: Plan, context: int) -> Plan:
    """The planner maximises context; a retry after an OOM must run at the smaller context it asked for."""
    from dataclasses import replace

    if plan.context <= context:
        return plan
    return replace(plan, context=context, cache_size=cache_size_tokens(context))

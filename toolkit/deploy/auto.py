"""`deploy auto`'s pipeline: check -> detect -> plan (confirmed) -> preflight -> render -> fetch-model -> build ->
reference -> up -> verify (with the KL spot-check against the reference). A plan that deploys a mix fetches both of
its branches (checked before the shards are downloaded), has every check of the assembly made before the build,
and assembles the mix in the built image after it: fetch-model -> build -> mix -> reference -> up -> verify.

Every step is the same function the single-step commands run (steps.py, reference_step.py); re-running converges
(an unchanged deployment reuses its reference). The caller (the CLI) shows the plan and asks for confirmation
through a callback, and reads how far the pipeline got from the outcome dict, which run_auto fills in as it goes
(also when a stage fails).

Nothing is written before the preflight passes, and only into a folder auto may own: a new or empty one, or one
holding an earlier rendering (render.json); every flag is checked before NVML or Docker are asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import validate
from ..detect.inventory import GpuInventory
from ..errors import BadInput, VerificationFailed
from ..facts import layout
from ..facts.profiles import ModelProfile
from ..output import Progress
from ..plan.plan import Plan, PlanRequest
from ..verify.report import report_dict
from .deployment import Deployment, curl_command, ensure_key_header, load_deployment
from .mix_step import mix_step, prepare_mix
from .reference_step import describe, reference_step
from .steps import build_step, fetch_step, publishes, up_step, verify_step

Confirm = Callable[[Plan, ModelProfile, GpuInventory, PlanRequest], bool]


@dataclass(frozen=True)
class AutoRequest:
    """Everything `deploy auto` was asked for."""

    out: Path
    profile: str
    gpus: str | None  # a --gpus spec, or None: this host's GPUs (NVML)
    plan_request: PlanRequest
    bind: str
    port: int
    models_dir: str | None
    hf_token_file: Path | None
    cpu_only: bool
    skip_build: bool
    ready_timeout_s: float | None
    retry_smaller: bool
    no_kl: bool = False  # skip the deployment reference and the KL spot-check


def run_auto(
    request: AutoRequest, progress: Progress, outcome: dict[str, Any], confirm: Confirm
) -> Deployment | None:
    """Run every stage (outcome["stage"] names the current one); None when confirm() declined the plan."""
    from ..detect.inventory import inventory_for
    from ..facts.profiles import load_profile
    from ..plan.planner import check_request, make_plan
    from ..render.bundle import RenderOptions, check_options, render_bundle
    from . import engine, state
    from .hub import read_token_file
    from .preflight import check_gpu_runtime, check_port

    options = check_options(
        RenderOptions(
            bind=request.bind,
            port=request.port,
            models_dir=request.models_dir,
            gpu_reservation=not request.cpu_only,
            force=True,
        )
    )
    profile = load_profile(request.profile)
    check_request(profile, request.plan_request)
    if request.hf_token_file is not None:
        read_token_file(request.hf_token_file)
    out = Path(os.path.abspath(request.out))
    _check_ours(out)
    inventory = inventory_for(request.gpus)
    plan = make_plan(profile, inventory, request.plan_request)
    outcome["plan"] = {
        "quant": plan.quant,
        "context": plan.context,
        "cache_mode": plan.cache_mode,
        "split": plan.split,
        "gpus": [a.index for a in plan.per_gpu],
        "digest": plan.digest(),
        **({"mix": plan.mix.to_dict()} if plan.mix else {}),
    }
    if not confirm(plan, profile, inventory, request.plan_request):
        progress.note("not deployed (answer was not yes)")
        return None

    outcome["stage"] = "preflight"
    client = engine.connect()
    if not request.cpu_only:
        check_gpu_runtime(client)
    ours = engine.find_container(client, state.default_container_name(out))
    bind = validate.bind_address(request.bind)
    if not publishes(ours, request.port):
        check_port(bind, request.port)

    outcome["stage"] = "render"
    bundle = render_bundle(plan, out, options)
    dep = load_deployment(bundle.out_dir)
    outcome.update(out_dir=str(dep.out_dir), url=dep.url, api_key_file=str(dep.api_tokens))
    progress.note(f"rendered {dep.out_dir} ({'changed' if bundle.changed else 'unchanged'})")

    outcome["stage"] = "fetch-model"
    fetched = fetch_step(dep, progress, request.hf_token_file)
    outcome["model"] = fetched.to_dict()
    prepared = None
    if plan.mix is not None:
        outcome["stage"] = "mix"
        prepared = prepare_mix(dep)  # every check of the assembly, before the build

    outcome["stage"] = "build"
    if request.skip_build:
        outcome["image"] = {"tag": dep.manifest["image"], "reused": True}
    else:
        built = build_step(dep, client, progress)
        outcome["image"] = {"tag": built.tag, "id": built.id, "reused": built.reused}

    if plan.mix is not None:
        outcome["stage"] = "mix"
        from .mix_image import ImageRunner

        runner = ImageRunner(client, str(dep.manifest["image"]))
        outcome["mix"] = mix_step(dep, runner, progress, prepared).to_dict()

    reference = None
    if request.no_kl:
        outcome["reference"] = {"skipped": "--no-kl"}
        progress.warn(
            "--no-kl: no deployment reference and no KL spot-check; verify checks liveness, readiness and "
            "function only (`deploy reference deployment` makes the reference later)"
        )
    else:
        outcome["stage"] = "reference"
        made = reference_step(dep, client, progress, gpu=not request.cpu_only)
        (progress.warn if made.test_double else progress.note)(describe(made))
        outcome["reference"] = made.to_dict()
        reference = made.reference

    outcome["stage"] = "up"
    result = up_step(
        dep,
        client,
        progress,
        gpu=not request.cpu_only,
        ready_timeout_s=request.ready_timeout_s,
        retry_smaller=request.retry_smaller,
    )
    dep = load_deployment(dep.out_dir)
    outcome.update(
        container=result.state.container_name,
        action=result.action,
        ready_s=round(result.ready_s, 1),
        retried_context=result.retried_context,
    )

    outcome["stage"] = "verify"
    report = verify_step(dep, reference)
    outcome["verify"] = [
        {"name": c.name, "passed": c.passed, "detail": c.detail, "skipped": c.skipped} for c in report.checks
    ]
    outcome["kl"] = report_dict(report)["kl"]
    if not report.passed:
        failed = next(c for c in report.checks if not c.passed)
        raise VerificationFailed(
            f"verification failed: {failed.name}: {failed.detail}",
            f"see `deploy logs --out {dep.out_dir}` and `deploy verify --out {dep.out_dir}`",
        )
    ensure_key_header(dep)
    outcome.update(ok=True, stage="done", curl=curl_command(dep))
    return dep


def _check_ours(out: Path) -> None:
    """auto renders (with --force) only into a new or empty folder, or one that holds an earlier rendering."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / layout.MANIFEST).is_file():
        raise BadInput(
            f"--out {out} holds files glm-deploy did not render",
            "choose a new or empty --out (auto never replaces files it did not write)",
        )

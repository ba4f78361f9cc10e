"""`deploy auto`: detect -> plan (shown, confirmed) -> render -> preflight -> fetch-model -> build -> up -> verify.

Every step is the same function the single-step commands run (commands/lifecycle.py); re-running converges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import BadInput, ToolkitError, VerificationFailed
from ..output import emit_json
from .lifecycle import (
    NO_GPU_ENV,
    Progress,
    build_step,
    endpoint_summary,
    fetch_step,
    load_deployment,
    no_gpu,
    publishes,
    up_step,
)


def register(subparsers: Any) -> None:
    """Add `deploy auto`."""
    parser = subparsers.add_parser(
        "auto", help="from this host to a verified endpoint in one command",
        description="Detect the GPUs, plan (shown; confirmed unless --yes), render into --out, check the host, "
                    "download the model, build the image, start the container, wait until it serves the plan, and "
                    "verify it. Re-running converges on the same deployment. Exit 2 bad input, 3 nothing fits or "
                    "out of GPU memory, 4 environment missing, 5 verification failed.")
    parser.add_argument("--out", default="deploy-out", type=Path, help="deployment folder (default ./deploy-out)")
    parser.add_argument("--profile", default="glm-4.7", help="model profile name or YAML path (default glm-4.7)")
    parser.add_argument("--gpus", metavar="SPEC", help="plan for these GPUs instead of NVML's (e.g. 2xH200)")
    parser.add_argument("--context", metavar="N|max", help="required context in tokens (default: profile minimum)")
    parser.add_argument("--cache", default="auto", metavar="auto|FP16|K,V", help="KV-cache mode (default auto)")
    parser.add_argument("--quant", metavar="BRANCH", help="fix the quant (a branch of the model repo)")
    parser.add_argument("--split", default="auto", metavar="auto|tp|layer", help="multi-GPU split (default auto)")
    parser.add_argument("--headroom-mib", metavar="N", help="safety margin per GPU in MiB")
    parser.add_argument("--bind", default="127.0.0.1", help="host address to publish the API on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="host port (default 5000)")
    parser.add_argument("--models-dir", help="where models are downloaded (default <out>/models)")
    parser.add_argument("--cuda", default="auto", help="image CUDA: auto, 13 or 12")
    parser.add_argument("--hf-token-file", type=Path, help="file holding a Hugging Face token (never printed)")
    parser.add_argument("--no-gpu", action="store_true",
                        help=f"CPU-only test engine: no GPU requests or reservation, no NVIDIA runtime check "
                             f"(also {NO_GPU_ENV}=1)")
    parser.add_argument("--skip-build", action="store_true",
                        help="use an image already tagged as the rendered one (e.g. a test image) instead of building")
    parser.add_argument("--ready-timeout", type=float, metavar="S", help="seconds to wait for the model to load")
    parser.add_argument("--retry-smaller", action="store_true",
                        help="after an out-of-memory load, re-plan with half the context and retry once")
    parser.add_argument("--yes", "-y", action="store_true", help="deploy the plan without asking")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the outcome")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline; with --json, the outcome (or the failing stage and error) is one object on stdout."""
    outcome: dict[str, Any] = {"ok": False, "stage": "plan"}
    try:
        code = _pipeline(args, outcome)
    except ToolkitError as error:
        if args.json:
            emit_json({**outcome, "error": error.line(), "exit_code": error.exit_code})
        raise
    if args.json:
        emit_json(outcome)
    return code


def _pipeline(args: argparse.Namespace, outcome: dict[str, Any]) -> int:
    from .. import engine
    from ..gpu_spec import parse_gpu_spec
    from ..inventory import detect_nvml
    from ..planner import make_plan
    from ..profiles import load_profile
    from ..render import RenderOptions, render_bundle
    from .plan import print_plan, request_from_args

    progress = Progress(quiet=args.json)
    cpu_only = no_gpu(args)
    profile = load_profile(args.profile)
    request = request_from_args(args)
    inventory = parse_gpu_spec(args.gpus) if args.gpus is not None else detect_nvml()
    plan = make_plan(profile, inventory, request)
    outcome["plan"] = {"quant": plan.quant, "context": plan.context, "cache_mode": plan.cache_mode,
                       "split": plan.split, "gpus": [a.index for a in plan.per_gpu], "digest": plan.digest()}
    if not args.json:
        print_plan(plan, profile, inventory, request)
    if not args.yes:
        if args.json or not sys.stdin.isatty():
            raise BadInput("the plan needs confirmation but there is no terminal to ask on",
                           "review the plan (`deploy plan`) and pass --yes")
        answer = input(f"Deploy {plan.quant} with context {plan.context} into {args.out}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            progress.note("not deployed (answer was not yes)")
            return 1

    outcome["stage"] = "render"
    bundle = render_bundle(plan, args.out, RenderOptions(
        cuda=args.cuda, bind=args.bind, port=args.port, models_dir=args.models_dir,
        gpu_reservation=not cpu_only, force=True))
    dep = load_deployment(bundle.out_dir)
    outcome.update(out_dir=str(dep.out_dir), url=dep.url, api_key_file=str(dep.api_tokens))
    progress.note(f"rendered {dep.out_dir} ({'changed' if bundle.changed else 'unchanged'})")

    outcome["stage"] = "preflight"
    client = engine.connect()
    from .. import state
    from ..preflight import check_gpu_runtime, check_port

    if not cpu_only:
        check_gpu_runtime(client)
    ours = engine.find_container(client, state.default_container_name(dep.out_dir))
    if not publishes(ours, int(dep.manifest["port"])):
        check_port(str(dep.manifest["bind"]), int(dep.manifest["port"]))

    outcome["stage"] = "fetch-model"
    fetched = fetch_step(dep, progress, args.hf_token_file)
    outcome["model"] = fetched.to_dict()

    outcome["stage"] = "build"
    if args.skip_build:
        outcome["image"] = {"tag": dep.manifest["image"], "reused": True}
    else:
        built = build_step(dep, client, progress)
        outcome["image"] = {"tag": built.tag, "id": built.id, "reused": built.reused}

    outcome["stage"] = "up"
    result = up_step(dep, client, progress, gpu=not cpu_only, ready_timeout_s=args.ready_timeout,
                     retry_smaller=args.retry_smaller)
    dep = load_deployment(dep.out_dir)
    outcome.update(container=result.state.container_name, action=result.action, ready_s=round(result.ready_s, 1),
                   retried_context=result.retried_context)

    outcome["stage"] = "verify"
    outcome["verify"] = _verify(dep)
    outcome.update(ok=True, stage="done", curl=endpoint_summary(dep).splitlines()[-1].removeprefix("try: "))
    if not args.json:
        print(endpoint_summary(dep))
    return 0


def _verify(dep: Any) -> list[dict[str, Any]]:
    """Liveness, readiness and function checks of the verify helper against the planned model."""
    from ..verify.checks import Expectations, VerifyRequest, run_verify
    from ..verify.client import read_api_key

    expect = Expectations(model_id=dep.model_folder, cache_mode=dep.plan.cache_mode, context=dep.plan.context,
                          quant=dep.plan.quant)
    report = run_verify(VerifyRequest(url=dep.url, api_key=read_api_key(str(dep.api_tokens)), expect=expect,
                                      profile=dep.plan.profile))
    checks = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in report.checks]
    if not report.passed:
        failed = next(c for c in report.checks if not c.passed)
        raise VerificationFailed(f"verification failed: {failed.name}: {failed.detail}",
                                 f"see `deploy logs --out {dep.out_dir}` and `deploy verify`")
    return checks

"""`deploy auto`: from this host to a verified endpoint in one command (the pipeline is toolkit.deploy.auto)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..detect.inventory import GpuInventory
from ..errors import BadInput, ToolkitError
from ..facts.profiles import ModelProfile
from ..inputs import output_folder
from ..output import Progress, emit_json
from ..plan.plan import Plan, PlanRequest
from .options import (
    NO_GPU_ENV,
    add_plan_options,
    add_port_option,
    no_gpu,
    port_number,
    request_from_args,
    seconds,
)
from .views import print_checks, print_plan


def register(subparsers: Any) -> None:
    """Add `deploy auto`."""
    parser = subparsers.add_parser(
        "auto",
        help="from this host to a verified endpoint in one command",
        description="Detect the GPUs, plan (shown; confirmed unless --yes), render into --out, check the host, "
        "download the model (a mix, --mix or --quant mix:LOWER+UPPER@GIB: both branches, checked before the "
        "shards are downloaded), build the image (a mix is then assembled in it, on the CPU), compute the "
        "deployment reference in it on the planned GPUs "
        "(exllamav3 in-process on the downloaded weights), start the container, wait until it serves the "
        "plan, and verify it, ending with the KL spot-check against that reference. Re-running converges on "
        "the same deployment (and reuses the reference). Exit 2 bad input, 3 nothing fits or out of GPU "
        "memory, 4 environment missing, 5 verification failed.",
    )
    parser.add_argument("--out", default="deploy-out", help="deployment folder (default ./deploy-out)")
    add_plan_options(parser)
    parser.add_argument(
        "--bind", default="127.0.0.1", help="host address to publish the API on (default 127.0.0.1)"
    )
    add_port_option(parser)
    parser.add_argument("--models-dir", help="where models are downloaded (default <out>/models)")
    parser.add_argument(
        "--hf-token-file", type=Path, help="file holding a Hugging Face token (never printed)"
    )
    parser.add_argument(
        "--no-gpu",
        action="store_true",
        help=f"CPU-only test engine: no GPU requests or reservation, no NVIDIA runtime check "
        f"(also {NO_GPU_ENV}=1)",
    )
    parser.add_argument(
        "--skip-build",
        action="store_true",
        help="use an image already tagged as the rendered one (e.g. a test image) instead of building",
    )
    parser.add_argument(
        "--ready-timeout", type=float, metavar="S", help="seconds to wait for the model to load"
    )
    parser.add_argument(
        "--retry-smaller",
        action="store_true",
        help="after an out-of-memory load, re-plan with half the context and retry once",
    )
    parser.add_argument(
        "--no-kl",
        action="store_true",
        help="skip the deployment reference and the KL spot-check (verify then checks liveness, "
        "readiness and function only)",
    )
    parser.add_argument("--yes", "-y", action="store_true", help="deploy the plan without asking")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the outcome")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline; with --json, the outcome (or the failing stage and error) is one object on stdout."""
    from ..deploy.auto import AutoRequest, run_auto
    from ..deploy.deployment import endpoint_summary

    outcome: dict[str, Any] = {"ok": False, "stage": "plan"}
    try:
        seconds(args.ready_timeout, "--ready-timeout")
        request = AutoRequest(
            out=output_folder(args.out),
            profile=args.profile,
            gpus=args.gpus,
            plan_request=request_from_args(args),
            bind=args.bind,
            port=port_number(args.port),
            models_dir=args.models_dir,
            hf_token_file=args.hf_token_file,
            cpu_only=no_gpu(args),
            skip_build=args.skip_build,
            ready_timeout_s=args.ready_timeout,
            retry_smaller=args.retry_smaller,
            no_kl=args.no_kl,
        )
        dep = run_auto(request, Progress(quiet=args.json), outcome, lambda *shown: _confirm(args, *shown))
    except ToolkitError as error:
        if args.json:
            emit_json({**outcome, "error": error.line(), "exit_code": error.exit_code})
        elif outcome.get("verify"):
            print_checks(outcome["verify"], passed=False)
        raise
    if args.json:
        emit_json(outcome)
    elif dep is not None:
        print_checks(outcome["verify"], passed=True)
        print(endpoint_summary(dep))
    return 0 if dep is not None else 1


def _confirm(
    args: argparse.Namespace, plan: Plan, profile: ModelProfile, inventory: GpuInventory, request: PlanRequest
) -> bool:
    """Show the plan (not with --json) and ask, unless --yes; no terminal to ask on is bad input."""
    if not args.json:
        print_plan(plan, profile, inventory, request)
    if args.yes:
        return True
    if args.json or not sys.stdin.isatty():
        raise BadInput(
            "the plan needs confirmation but there is no terminal to ask on",
            "review the plan (`deploy plan`) and pass --yes",
        )
    answer = input(f"Deploy {plan.quant} with context {plan.context} into {args.out}? [y/N] ").strip().lower()
    return answer in ("y", "yes")

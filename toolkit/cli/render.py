"""`deploy render`: turn a plan (a file, or plan options) into the deployment's files."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import BadInput
from .options import (
    add_plan_options,
    add_port_option,
    checked_request,
    given_plan_options,
    inventory_from_args,
    port_number,
)


def register(subparsers: Any) -> None:
    """Add `deploy render` and its options (plan options spelled as in `deploy plan`)."""
    parser = subparsers.add_parser(
        "render",
        help="write the Dockerfile, TabbyAPI config, API keys, compose.yaml and .env for a plan",
        description="Render a plan into DIR: Dockerfile (the plan's stack: TabbyAPI at a pinned commit with PR "
        "#295, exactly the pinned exllamav3 and torch), config.yml, "
        "api_tokens.yml (0600, kept across re-renders), compose.yaml, .env and render.json. "
        "Exit 0 ok, 2 bad input, 3 nothing fits, 4 driver too old for any TabbyAPI image.",
    )
    source = parser.add_argument_group("plan (a file, or the options of `deploy plan`)")
    source.add_argument(
        "--plan", metavar="PLAN.json", help="a `deploy plan --json` output file ('-' = stdin)"
    )
    add_plan_options(source)
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to render into (created atomically)"
    )
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="host address to publish the API on (default 127.0.0.1: this machine only)",
    )
    add_port_option(parser)
    parser.add_argument(
        "--models-dir",
        metavar="PATH",
        help="absolute host folder holding the model folder (default: DIR/models)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the rendered files of an --out that holds a different rendering",
    )
    parser.add_argument(
        "--no-gpu-reservation",
        action="store_true",
        help="omit the compose GPU reservation (only for CPU-only test engines)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def _read_plan(source: str) -> Any:
    """A Plan from a `deploy plan --json` file or stdin, checked for shape and meaning (else exit 2)."""
    from .. import inputs
    from ..plan.check import plan_from_data

    hint = "give a `deploy plan --json` file"
    text = inputs.read_stdin("--plan") if source == "-" else inputs.read_text(source, "--plan", hint=hint)
    return plan_from_data(inputs.parse_json(text, "--plan", source, hint), source)


def run(args: argparse.Namespace) -> int:
    """Render and say where things are (never what the key is)."""
    from ..inputs import output_folder
    from ..plan.planner import make_plan
    from ..render.bundle import RenderOptions, check_options, render_bundle

    out = output_folder(args.out)
    options = RenderOptions(
        bind=args.bind,
        port=port_number(args.port),
        models_dir=args.models_dir,
        force=args.force,
        gpu_reservation=not args.no_gpu_reservation,
    )
    check_options(options)  # every flag before NVML is asked
    if args.plan is not None:
        given = given_plan_options(args)
        if given:
            raise BadInput(
                f"--plan cannot be combined with {', '.join(given)}", "give a plan file or plan options"
            )
        plan = _read_plan(args.plan)
    else:
        profile, request = checked_request(args)
        plan = make_plan(profile, inventory_from_args(args), request)
    bundle = render_bundle(plan, out, options)
    if args.json:
        from ..output import emit_json

        emit_json(
            {
                "out_dir": str(bundle.out_dir),
                "changed": bundle.changed,
                "image": bundle.image,
                "files": {
                    "dockerfile": str(bundle.dockerfile),
                    "config": str(bundle.config),
                    "compose": str(bundle.compose),
                    "env": str(bundle.env),
                    "api_tokens": str(bundle.api_tokens),
                    "manifest": str(bundle.manifest),
                    "plan": str(bundle.plan),
                },
                "manifest": bundle.manifest_data,
            }
        )
        return 0
    from ..deploy.deployment import curl_command, load_deployment
    from ..output import console

    out = console()
    verb = "rendered" if bundle.changed else "unchanged"
    out.print(
        f"{verb}: {bundle.out_dir} (plan {bundle.manifest_data['plan_digest'][:12]}, TabbyAPI "
        f"{bundle.tabby_ref[:12]}, exllamav3 {plan.stack.exllamav3}, torch {plan.stack.torch}, CUDA {bundle.cuda}, "
        f"image {bundle.image})"
    )
    out.print(f"  API key file: {bundle.api_tokens} (mode 0600, mounted read-only; send it as X-API-Key)")
    out.print(f"  model folder expected at: {bundle.models_dir}/{bundle.model_folder}")
    if plan.mix is not None:
        out.print(
            f"  the mix is assembled there from {plan.mix.lower} and {plan.mix.upper}: `deploy fetch-model`, "
            f"`deploy build`, `deploy mix-model` (each --out {bundle.out_dir}), or `deploy auto`"
        )
    out.print(
        f"  next: docker compose -f {bundle.compose} up -d --build   (or `deploy up --out {bundle.out_dir}`)"
    )
    out.print(f"  then: {curl_command(load_deployment(bundle.out_dir))}")
    return 0

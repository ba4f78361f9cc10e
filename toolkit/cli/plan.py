"""`deploy plan`: choose quant, context, KV-cache mode and split for these GPUs, and show every candidate.

Imports stay light (pyyaml, rich only when printing a table) so the command starts fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..facts.profiles import load_profile
from ..plan.planner import make_plan
from .options import add_plan_options, inventory_from_args, request_from_args
from .views import print_plan


def register(subparsers: Any) -> None:
    """Add `deploy plan` and its options."""
    parser = subparsers.add_parser(
        "plan",
        help="choose quant, context, cache mode and split for the GPUs",
        description="Pick the lowest-KL quant that fits with at least the required context, then the largest "
        "context; print every candidate and why it lost. Exit 0 plan found, 2 bad input, "
        "3 nothing fits, 4 no GPUs detected (give --gpus).",
    )
    add_plan_options(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (the hand-off contract)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Plan and print; ToolkitError carries exit codes 2, 3 and 4 to the CLI."""
    profile = load_profile(args.profile)
    request = request_from_args(args)
    inventory = inventory_from_args(args)
    plan = make_plan(profile, inventory, request)
    if args.json:
        from ..output import emit_json

        emit_json(plan.to_dict())
    else:
        print_plan(plan, profile, inventory, request)
    return 0

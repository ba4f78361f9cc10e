"""`deploy plan`: choose quant, context, KV-cache mode and split for these GPUs, and show every candidate.

Imports stay light (pyyaml, rich only when printing a table) so the command starts fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..plan.bandwidth import bounds_dict, candidate_bounds
from ..plan.planner import plan_with_details
from .options import add_plan_options, checked_request, inventory_from_args
from .views import print_plan


def register(subparsers: Any) -> None:
    """Add `deploy plan` and its options."""
    parser = subparsers.add_parser(
        "plan",
        help="choose quant, context, cache mode and split for the GPUs",
        description="Pick the lowest-KL quant that fits with at least the required context, then the largest "
        "context; print every candidate and why it lost, and an upper bound on its batch-1 decode speed "
        "(memory bandwidth / bytes read per token). Exit 0 plan found, 2 bad input, "
        "3 nothing fits, 4 no GPUs detected (give --gpus).",
    )
    add_plan_options(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the plan as JSON (the hand-off contract, plus decode_bound and chunk_trade, which render "
        "ignores; mix_proposal is null unless the chosen quant leaves a gap a mix would fill)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Plan and print; ToolkitError carries exit codes 2, 3 and 4 to the CLI."""
    profile, request = checked_request(args)
    inventory = inventory_from_args(args)
    plan, details = plan_with_details(profile, inventory, request)
    bounds = candidate_bounds(profile, inventory, details.candidates)
    if args.json:
        from ..output import emit_json

        chunk_trade = details.chunk_trade.to_dict() if details.chunk_trade else None
        data = {"mix_proposal": None, **plan.to_dict()}  # null when the plan proposes no mix
        emit_json({**data, "decode_bound": bounds_dict(bounds), "chunk_trade": chunk_trade})
    else:
        print_plan(plan, profile, inventory, request, bounds, details.chunk_trade)
    return 0

"""`deploy plan`: choose quant, context, KV-cache mode and split for these GPUs, and show every candidate.

Imports stay light (pyyaml, rich only when printing a table) so the command starts fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import BadInput
from ..gpu_spec import parse_gpu_spec
from ..inventory import GpuInventory, detect_nvml
from ..plan import Plan, PlanRequest
from ..planner import make_plan
from ..profiles import ModelProfile, load_profile


def register(subparsers: Any) -> None:
    """Add `deploy plan` and its options."""
    parser = subparsers.add_parser(
        "plan", help="choose quant, context, cache mode and split for the GPUs",
        description="Pick the lowest-KL quant that fits with at least the required context, then the largest "
                    "context; print every candidate and why it lost. Exit 0 plan found, 2 bad input, "
                    "3 nothing fits, 4 no GPUs detected (give --gpus).")
    parser.add_argument("--profile", default="glm-4.7", help="model profile name or YAML path (default glm-4.7)")
    parser.add_argument("--gpus", metavar="SPEC",
                        help="plan for these GPUs instead of the detected ones: 8x24GiB, 4xRTX5090, 2xH200, "
                             "24GiB,24GiB,48GiB, 97887MiB (GiB/MiB binary, GB/MB decimal)")
    parser.add_argument("--context", metavar="N|max",
                        help="required context in tokens (default: the profile's minimum, 32768 for GLM-4.7); "
                             "max = the model's maximum")
    parser.add_argument("--cache", default="auto", metavar="auto|FP16|K,V",
                        help="KV-cache mode: auto (default), FP16, Q4/Q6/Q8, or K,V bits such as 6,5")
    parser.add_argument("--quant", metavar="BRANCH", help="fix the quant (a branch of the model repo)")
    parser.add_argument("--split", default="auto", metavar="auto|tp|layer",
                        help="multi-GPU split: auto (default), tp (tensor parallel) or layer")
    parser.add_argument("--headroom-mib", metavar="N",
                        help="safety margin per GPU in MiB (default: 256 MiB or 1%% of the GPU, the larger)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (the hand-off contract)")
    parser.set_defaults(run=run)


def _int_option(value: str, option: str) -> int:
    """Integers with a one-line error instead of argparse's usage dump."""
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise BadInput(f"{option} {value!r} is not a whole number", f"e.g. {option} 32768") from None


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """Translate the command line into a PlanRequest (validation of ranges is the planner's)."""
    context_max = (args.context or "").strip().lower() == "max"
    context = None if args.context is None or context_max else _int_option(args.context, "--context")
    headroom = None if args.headroom_mib is None else _int_option(args.headroom_mib, "--headroom-mib")
    return PlanRequest(context=context, context_max=context_max, cache=args.cache, quant=args.quant,
                       split=args.split.strip().lower(), headroom_mib=headroom)


def run(args: argparse.Namespace) -> int:
    """Plan and print; ToolkitError carries exit codes 2, 3 and 4 to the CLI."""
    profile = load_profile(args.profile)
    request = request_from_args(args)
    inventory = parse_gpu_spec(args.gpus) if args.gpus is not None else detect_nvml()
    plan = make_plan(profile, inventory, request)
    if args.json:
        from ..output import emit_json

        emit_json(plan.to_dict())
    else:
        print_plan(plan, profile, inventory, request)
    return 0


def _describe_gpus(inventory: GpuInventory) -> str:
    """'8 x RTX 4090 (24.0 GiB)' or a list when they differ."""
    groups: dict[tuple[str, int], int] = {}
    for gpu in inventory.gpus:
        groups[(gpu.name, gpu.total_mib)] = groups.get((gpu.name, gpu.total_mib), 0) + 1
    parts = [f"{count} x {name} ({total / 1024:.1f} GiB)" if name[:1].isalpha() else f"{count} x {total / 1024:.1f} GiB"
             for (name, total), count in groups.items()]
    source = "from --gpus, assumed empty" if inventory.source == "spec" else "detected, planned on free memory"
    return f"{', '.join(parts)} ({source})"


def print_plan(plan: Plan, profile: ModelProfile, inventory: GpuInventory, request: PlanRequest) -> None:
    """The candidate table (winner marked, each loser with its deciding number) and the winner's GPUs."""
    from rich.table import Table

    from ..output import console

    out = console()
    if not out.is_terminal:
        out.width = 200  # pipes and logs get one line per candidate
    required = ("max" if request.context_max else request.context) or profile.serving.default_min_context
    out.print(f"{profile.display_name} on {_describe_gpus(inventory)}", markup=False)
    out.print(f"required context {required} tokens, cache {request.cache}, split {request.split}; "
              f"objective: lowest KL(FP16||quant), then longest context")
    quants = {q.branch: q for q in profile.quants}
    reasons = {r.quant: r.reason for r in plan.rejected}
    table = Table(show_edge=False, pad_edge=False)
    for header, justify in (("", "left"), ("quant", "left"), ("weights GiB", "right"), ("KL", "right"),
                            ("top-1", "right"), ("result", "left")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    from ..memory import weights_bytes

    for quant in sorted(profile.quants, key=lambda q: q.kl_ref_quant):
        chosen = quant.branch == plan.quant
        result = (f"chosen: {plan.split}, cache {plan.cache_mode}, context {plan.context} "
                  f"(max {plan.max_context})" if chosen else reasons.get(quant.branch, ""))
        table.add_row("[bold green]>[/]" if chosen else "x", f"[bold]{quant.branch}[/]" if chosen else quant.branch,
                      f"{weights_bytes(profile.architecture, quants[quant.branch]) / 2**30:.1f}",
                      f"{quant.kl_ref_quant:.4f}", f"{quant.top1:.3f}", result)
    out.print(table)
    gpus = Table(title="per GPU (MiB)", show_edge=False, pad_edge=False)
    for header in ("GPU", "total", "usable", "weights", "cache", "overhead", "free after"):
        gpus.add_column(header, justify="right")
    for a in plan.per_gpu:
        gpus.add_row(str(a.index), str(a.total_mib), str(a.usable_mib), str(a.weights_mib), str(a.cache_mib),
                     str(a.overhead_mib), str(a.free_after_mib))
    out.print(gpus)
    split = "tensor_parallel: true" if plan.split == "tp" else (
        f"gpu_split: {plan.gpu_split}" if plan.gpu_split else "one GPU")
    out.print(f"TabbyAPI: max_seq_len {plan.context}, cache_size {plan.cache_size}, cache_mode {plan.cache_mode}, "
              f"chunk_size {plan.chunk_size}, {split}; headroom {plan.headroom_mib} MiB per GPU")
    if not profile.memory_overhead.calibrated:
        out.print("note: per-GPU overhead terms are not calibrated yet (profile memory_overhead.calibrated: false)")

"""Tables for people, shared by several commands (the JSON form of the same data is emit_json's)."""

from __future__ import annotations

from ..detect.inventory import GpuInventory
from ..facts.profiles import ModelProfile
from ..plan.plan import Plan, PlanRequest


def _describe_gpus(inventory: GpuInventory) -> str:
    """'8 x RTX 4090 (24.0 GiB)' or a list when they differ."""
    groups: dict[tuple[str, int], int] = {}
    for gpu in inventory.gpus:
        groups[(gpu.name, gpu.total_mib)] = groups.get((gpu.name, gpu.total_mib), 0) + 1
    parts = [
        f"{count} x {name} ({total / 1024:.1f} GiB)"
        if name[:1].isalpha()
        else f"{count} x {total / 1024:.1f} GiB"
        for (name, total), count in groups.items()
    ]
    source = (
        "from --gpus, assumed empty" if inventory.source == "spec" else "detected, planned on free memory"
    )
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
    out.print(
        f"required context {required} tokens, cache {request.cache}, split {request.split}; "
        f"objective: lowest KL(FP16||quant), then longest context"
    )
    quants = {q.branch: q for q in profile.quants}
    reasons = {r.quant: r.reason for r in plan.rejected}
    table = Table(show_edge=False, pad_edge=False)
    for header, justify in (
        ("", "left"),
        ("quant", "left"),
        ("weights GiB", "right"),
        ("KL", "right"),
        ("top-1", "right"),
        ("result", "left"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    from ..plan.memory import weights_bytes

    for quant in sorted(profile.quants, key=lambda q: q.kl_ref_quant):
        chosen = quant.branch == plan.quant
        result = (
            f"chosen: {plan.split}, cache {plan.cache_mode}, context {plan.context} (max {plan.max_context})"
            if chosen
            else reasons.get(quant.branch, "")
        )
        table.add_row(
            "[bold green]>[/]" if chosen else "x",
            f"[bold]{quant.branch}[/]" if chosen else quant.branch,
            f"{weights_bytes(profile.architecture, quants[quant.branch]) / 2**30:.1f}",
            f"{quant.kl_ref_quant:.4f}",
            f"{quant.top1:.3f}",
            result,
        )
    out.print(table)
    gpus = Table(title="per GPU (MiB)", show_edge=False, pad_edge=False)
    for header in ("GPU", "total", "usable", "weights", "cache", "overhead", "free after"):
        gpus.add_column(header, justify="right")
    for a in plan.per_gpu:
        gpus.add_row(
            str(a.index),
            str(a.total_mib),
            str(a.usable_mib),
            str(a.weights_mib),
            str(a.cache_mib),
            str(a.overhead_mib),
            str(a.free_after_mib),
        )
    out.print(gpus)
    split = (
        "tensor_parallel: true"
        if plan.split == "tp"
        else (f"gpu_split: {plan.gpu_split}" if plan.gpu_split else "one GPU")
    )
    out.print(
        f"TabbyAPI: max_seq_len {plan.context}, cache_size {plan.cache_size}, cache_mode {plan.cache_mode}, "
        f"chunk_size {plan.chunk_size}, {split}; headroom {plan.headroom_mib} MiB per GPU"
    )
    if not profile.memory_overhead.calibrated:
        out.print(
            "note: per-GPU overhead terms are not calibrated yet (profile memory_overhead.calibrated: false)"
        )

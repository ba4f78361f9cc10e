"""Tables for people, shared by several commands (the JSON form of the same data is emit_json's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..detect.inventory import GpuInventory
from ..facts.profiles import ModelProfile
from ..plan.plan import ChunkTrade, MixProposal, Plan, PlannedMix, PlanRequest
from ..redact import printable

if TYPE_CHECKING:
    from ..plan.bandwidth import DecodeBound


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


def describe_chunk_trade(trade: ChunkTrade, plan: Plan) -> str:
    """What the smaller chunk_size bought and what it costs in prefill, in one line."""
    reach = (
        f"{trade.default_chunk_size} reaches {trade.default_max_context} tokens"
        if trade.default_max_context
        else f"{trade.default_chunk_size} does not fit"
    )
    ratios = trade.prefill_vs_default
    if not ratios:
        cost = "prefill cost not measured"
    else:
        measured = "-".join(f"{r:.2f}" for r in sorted({min(ratios), max(ratios)}))
        runs = f"{len(ratios)} run{'s' if len(ratios) > 1 else ''}"
        cost = (
            f"prefill measured at {measured}x chunk {trade.default_chunk_size}'s speed ({runs}, one H200; "
            "differences under ~30 % unresolved: benchmarks/serving_speed)"
        )
    return (
        f"chunk_size {trade.chunk_size} instead of {trade.default_chunk_size}: with {plan.quant} at cache "
        f"{plan.cache_mode}, {reach}, short of the required {trade.required_context}; {trade.chunk_size} reaches "
        f"{trade.max_context} (+{trade.max_context - trade.default_max_context} tokens); {cost}"
    )


def print_plan(
    plan: Plan,
    profile: ModelProfile,
    inventory: GpuInventory,
    request: PlanRequest,
    bounds: tuple[DecodeBound, ...] = (),
    chunk_trade: ChunkTrade | None = None,
) -> None:
    """The candidate table (winner marked, each loser with its deciding number, and the decode bound of those that
    fit when given) and the winner's GPUs."""
    from rich.table import Table
    from rich.text import Text

    from ..output import console

    out = console()
    if not out.is_terminal:
        out.width = 200  # pipes and logs get one line per candidate
    required = ("max" if request.context_max else request.context) or profile.serving.default_min_context
    out.print(f"{printable(profile.display_name)} on {_describe_gpus(inventory)}")
    out.print(
        f"required context {required} tokens, cache {request.cache}, split {request.split}; "
        f"objective: lowest KL(FP16||quant), then longest context"
    )
    reasons = {r.quant: r.reason for r in plan.rejected}
    table = Table(show_edge=False, pad_edge=False)
    for header, justify in (
        ("", "left"),
        ("quant", "left"),
        ("weights GiB", "right"),
        ("KL", "right"),
        ("top-1", "right"),
        *((("decode bound tok/s", "right"),) if bounds else ()),
        ("result", "left"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    bound_of = {bound.quant: bound for bound in bounds}
    from ..plan.memory import weights_bytes

    rows = [
        (q.kl_ref_quant, q.branch, weights_bytes(profile.architecture, q), q.top1, "") for q in profile.quants
    ]
    if plan.mix is not None:  # estimates, marked "~" (the mix line says how they were made)
        rows.append((plan.expected.kl, plan.quant, int(plan.weights_gib * 2**30), plan.expected.top1, "~"))
    for kl, name, weights, top1, estimate in sorted(rows):
        chosen = name == plan.quant
        result = (
            f"chosen: {plan.split}, cache {plan.cache_mode}, context {plan.context} (max {plan.max_context})"
            if chosen
            else reasons.get(name, "")
        )
        table.add_row(
            Text(">", style="bold green") if chosen else "x",
            Text(name, style="bold") if chosen else name,
            f"{weights / 2**30:.1f}",
            f"{estimate}{kl:.4f}",
            f"{estimate}{top1:.3f}",
            *((_bound_cell(bound_of.get(name)),) if bounds else ()),
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
    if chunk_trade is not None:
        out.print(describe_chunk_trade(chunk_trade, plan), markup=False)
    elif plan.chunk_size != profile.serving.chunk_size:
        out.print(
            f"chunk_size {plan.chunk_size}: the required context does not fit at {profile.serving.chunk_size}"
        )
    if bounds:
        out.print(_bound_note(bounds, plan), markup=False)
    if plan.mix_proposal is not None:
        out.print(gap_line(plan.mix_proposal, plan, required), markup=False)
    if plan.mix is not None:
        out.print(mix_line(plan.mix), markup=False)
    out.print(stack_line(plan), markup=False)


def gap_line(proposal: MixProposal, plan: Plan, required: int | str) -> str:
    """The unused memory and the mix that would fill it, in one line (the KL said to be an estimate)."""
    sizes = " + ".join(f"{d.gb:g} GB ({d.branch})" for d in proposal.downloads)
    return (
        f"gap: {proposal.free_gib_before:.1f} GiB of weights unused at {required} tokens (cache {plan.cache_mode}, "
        f"{plan.split}) -> mix {proposal.lower} + {proposal.upper} at {proposal.target_gib:g} GiB, KL "
        f"~{proposal.expected_kl:.2f} (estimate, interpolated between the card's points; {proposal.lower} alone "
        f"{plan.expected.kl:.2f}) -- add --mix to plan or deploy it (`deploy auto --mix`; downloads {sizes})"
    )


def mix_line(mix: PlannedMix) -> str:
    """What the planned mix is made of, how its KL was estimated and what fetching it downloads, in one line."""
    sizes = " + ".join(f"{d.gb:g} GB ({d.branch})" for d in mix.downloads)
    return (
        f"mix: {mix.name} = {mix.lower} + {mix.upper} by recipe {mix.recipe} ({mix.recipe_sha256[:12]}), at most "
        f"{mix.target_gib:g} GiB of weights; KL ~{mix.expected_kl:.4f} ({mix.kl_basis}); fetch-model downloads "
        f"{sizes}, mix-model assembles it (the same mix: --quant {mix.spec})"
    )


def _bound_cell(bound: DecodeBound | None) -> str:
    if bound is None:
        return "-"
    return (
        f"<= {bound.tokens_per_s:.0f} {bound.split}" if bound.tokens_per_s is not None else f"? {bound.split}"
    )


def _bound_note(bounds: tuple[DecodeBound, ...], plan: Plan) -> str:
    """What the decode column is, where each number was taken, and why a cell is empty."""
    from ..plan.bandwidth import ASSUMPTIONS

    unknown = next((b.unknown for b in bounds if b.unknown), None)
    others = (
        f", the others at cache {bounds[1].cache_mode} and {bounds[1].context} tokens"
        if len(bounds) > 1
        else ""
    )
    missing = f"; ? = {unknown}" if unknown else ""
    return (
        f"decode bound: {ASSUMPTIONS}.\n"
        f"  the plan at its {plan.context} tokens{others}; - = does not fit{missing}"
    )


def print_checks(checks: list[dict[str, Any]], passed: bool) -> None:
    """The verify report as people read it: PASS/FAIL/SKIP per check, then the verdict (stdout). Server text is
    shown as inert text: no markup, and control characters escaped (a newline cannot forge a PASS line)."""
    from ..output import console, mark

    out = console()
    for check in checks:
        word = "PASS" if check["passed"] else ("SKIP" if check.get("skipped") else "FAIL")
        out.print(mark(word, f"{printable(check['name'], 40):<10} {printable(check['detail'], 4000)}"))
    out.print("all checks passed" if passed else "verification FAILED")


def stack_line(plan: Plan) -> str:
    """The serving stack and the memory calibration the plan was sized with (and the margin when uncalibrated)."""
    stack = plan.stack
    line = (
        f"stack: TabbyAPI {stack.tabbyapi[:12]}, exllamav3 {stack.exllamav3}, torch {stack.torch} "
        f"(CUDA {stack.cuda}), Python {stack.python}; "
    )
    margin = stack.uncalibrated_margin
    if stack.calibrated or margin is None:
        return line + f"memory calibrated with exllamav3 {stack.calibration}"
    totals = {gpu.index: gpu.total_mib for gpu in plan.inventory.gpus}
    kept = sorted({margin.mib(totals[a.index]) for a in plan.per_gpu})
    return line + (
        f"UNCALIBRATED (--allow-uncalibrated): memory terms of exllamav3 {stack.calibration} plus "
        f"max({margin.min_mib} MiB, {margin.fraction:.0%}) kept free per GPU "
        f"({' / '.join(str(m) for m in kept)} MiB, in the headroom): {margin.source}"
    )

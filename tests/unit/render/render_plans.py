"""Plans and hosts for the render tests: plans built directly (numbers in the shape `deploy plan --json` gives) and
NVML-like hosts to plan for."""

from __future__ import annotations

from toolkit.detect.inventory import Gpu, GpuInventory
from toolkit.facts.profiles import Serving
from toolkit.facts.tabby_pin import load_tabby_pin
from toolkit.plan.plan import Expected, GpuAllocation, Plan, Rejection, Stack

SERVING = Serving(
    chunk_size=2048,
    reasoning=True,
    reasoning_start_token="<think>",
    reasoning_end_token="</think>",
    tool_format="glm4_7",
    default_min_context=32768,
    cache_floor="5,4",
)

CARDS = {
    # name, total MiB, compute capability
    "rtx4090": ("NVIDIA GeForce RTX 4090", 24564, "8.9"),
    "h200": ("NVIDIA H200", 143771, "9.0"),
    "a100": ("NVIDIA A100-SXM4-80GB", 81920, "8.0"),
}


def host(
    gpus: int,
    card: str = "rtx4090",
    *,
    driver_cuda: str | None = "12.8",
    with_uuids: bool = True,
    with_cc: bool = True,
) -> GpuInventory:
    """`gpus` identical cards as NVML reports them (UUIDs, compute capability, 512 MiB in use), or as a spec."""
    name, total_mib, cc = CARDS[card]
    return GpuInventory(
        gpus=tuple(
            Gpu(
                index=i,
                name=name,
                total_mib=total_mib,
                free_mib=total_mib - 512,
                used_mib=512,
                uuid=f"GPU-{i:08x}-5e1f-4c2a-9b7d-{i:012x}" if with_uuids else None,
                compute_capability=cc if with_cc else None,
                pci_bus_id=f"00000000:{i + 1:02X}:00.0",
            )
            for i in range(gpus)
        ),
        source="nvml" if with_uuids else "spec",
        driver_version="570.124.06" if driver_cuda else None,
        cuda_driver_version=driver_cuda,
    )


def pinned_stack(driver_cuda: str | None) -> Stack:
    """The pinned stack (profiles/tabbyapi.yaml) in the variant `deploy plan` picks for that driver (CUDA 12
    when the driver is unknown or too old: rendering then refuses a driver below 12.8), calibrated."""
    pin = load_tabby_pin()
    newest = driver_cuda is not None and tuple(int(x) for x in driver_cuda.split(".")) >= (13, 2)
    variant = pin.variant("13" if newest else "12")
    return Stack(pin.ref, pin.exllamav3, variant.torch, variant.name, pin.python, pin.exllamav3, True, None)


def make_plan(
    gpus: int,
    split: str,
    card: str = "rtx4090",
    *,
    quant: str = "3.84bpw-tuned",
    weights_gib: float = 158.0,
    context: int = 65536,
    cache_mode: str = "6,5",
    driver_cuda: str | None = "12.8",
    with_uuids: bool = True,
    with_cc: bool = True,
) -> Plan:
    """A plan for `gpus` identical cards; layer split spreads weights evenly and carries gpu_split in GB."""
    inventory = host(gpus, card, driver_cuda=driver_cuda, with_uuids=with_uuids, with_cc=with_cc)
    total_mib = CARDS[card][1]
    weights_mib = int(weights_gib * 1024 / gpus)
    cache_mib = 4096
    per_gpu = tuple(
        GpuAllocation(
            index=i,
            total_mib=total_mib,
            usable_mib=total_mib - 768,
            weights_mib=weights_mib,
            cache_mib=cache_mib,
            overhead_mib=900,
            free_after_mib=total_mib - 768 - weights_mib - cache_mib - 900,
        )
        for i in range(gpus)
    )
    gpu_split = [round((weights_mib + cache_mib) / 1000, 2)] * gpus if split == "layer" else None
    return Plan(
        profile="glm-4.7",
        hf_repo="mratsim/GLM-4.7-EXL3",
        quant=quant,
        bpw=3.84,
        weights_gib=weights_gib,
        context=context,
        max_context=context + 8192,
        cache_size=-(-context // 256) * 256,
        cache_mode=cache_mode,
        split=split,
        gpu_split=gpu_split,
        chunk_size=2048,
        headroom_mib=768,
        per_gpu=per_gpu,
        expected=Expected(kl=0.15401253, top1=0.8854, ppl=6.41935951),
        rejected=(Rejection(quant="5bpw_H8", reason="needs 210.3 GiB, has 184.0", short_by_mib=26931),),
        inventory=inventory,
        stack=pinned_stack(driver_cuda),
    )


def planned(spec: str, driver_cuda: str | None = None) -> Plan:
    """A plan the planner really makes for a --gpus spec (what a plan.json file holds), on a driver of that CUDA
    version when given: a plan file is checked for meaning, so file-based tests need one that could exist."""
    from dataclasses import replace

    from toolkit.detect.gpu_spec import parse_gpu_spec
    from toolkit.facts.profiles import load_profile
    from toolkit.plan.plan import PlanRequest
    from toolkit.plan.planner import make_plan as plan_for

    plan = plan_for(load_profile("glm-4.7"), parse_gpu_spec(spec), PlanRequest())
    return replace(plan, inventory=replace(plan.inventory, cuda_driver_version=driver_cuda))

"""Which serving stack a plan is for, and which measured memory terms size it (or why none may).

The stack is the pinned one of profiles/tabbyapi.yaml (TabbyAPI commit, exllamav3, torch per CUDA variant) unless
--tabby-ref / --exllamav3 / --cuda say otherwise. The memory terms are the profile's calibration for the stack's
exllamav3 version, measured through the pinned TabbyAPI commit. A stack without one (another exllamav3 version,
another TabbyAPI commit) is refused, because a memory model measured on one version does not carry over to another
(exllamav3 1.4.2 holds ~700 MiB more than 1.6.5 after a quantized 256k-token generation: facts/tabbyapi.md) --
unless --allow-uncalibrated, which plans with the pinned version's terms plus the profile's uncalibrated margin on
every GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import validate
from ..detect.inventory import GpuInventory
from ..errors import BadInput
from ..facts.profiles import ModelProfile
from ..facts.tabby_pin import TabbyPin, choose_cuda
from .plan import PlanRequest, Stack


@dataclass(frozen=True)
class StackChoice:
    """The plan's stack, the profile carrying the memory terms to apply, and the extra headroom per GPU."""

    stack: Stack
    profile: ModelProfile
    margin_mib: tuple[int, ...]  # per GPU of the inventory; zeros when calibrated


def _tabbyapi(requested: str | None, pin: TabbyPin) -> str:
    """The TabbyAPI ref of the stack: the pinned full SHA for the pin or any hex prefix of it, else as given."""
    if requested is None:
        return pin.ref
    ref = validate.git_ref(requested)
    return pin.ref if validate.HEX_REF.match(ref) and pin.ref.startswith(ref) else ref


def _uncalibrated_reason(profile: ModelProfile, tabbyapi: str, exllamav3: str) -> str | None:
    """Why the profile has no memory terms for this stack, or None when it has."""
    calibration = profile.calibration_for(exllamav3)
    known = ", ".join(
        f"exllamav3 {c.exllamav3} through TabbyAPI {c.tabbyapi[:7]}" for c in profile.calibrations
    )
    if calibration is None:
        return f"{profile.name} has no memory calibration for exllamav3 {exllamav3} (calibrated: {known})"
    if calibration.tabbyapi != tabbyapi:
        return (
            f"TabbyAPI {tabbyapi} is not the stack {profile.name}'s memory was calibrated on "
            f"(exllamav3 {exllamav3} through TabbyAPI {calibration.tabbyapi[:7]})"
        )
    return None


def choose_stack(
    profile: ModelProfile, pin: TabbyPin, inventory: GpuInventory, request: PlanRequest
) -> StackChoice:
    """The stack for this request and the memory terms to plan it with (BadInput when uncalibrated, not allowed)."""
    variant = choose_cuda(pin, inventory.cuda_driver_version, request.cuda)
    tabbyapi = _tabbyapi(request.tabby_ref, pin)
    exllamav3 = (
        pin.exllamav3
        if request.exllamav3 is None
        else validate.package_version(request.exllamav3, "--exllamav3")
    )
    reason = _uncalibrated_reason(profile, tabbyapi, exllamav3)
    if reason is None:
        stack = Stack(tabbyapi, exllamav3, variant.torch, variant.name, pin.python, exllamav3, True, None)
        return StackChoice(stack, profile.with_calibration(exllamav3), (0,) * len(inventory.gpus))
    margin = profile.uncalibrated_margin
    if not request.allow_uncalibrated:
        raise BadInput(
            reason,
            f"plan for the pinned stack (TabbyAPI {pin.ref[:7]}, exllamav3 {pin.exllamav3}), or pass "
            f"--allow-uncalibrated to keep max({margin.min_mib} MiB, {margin.fraction:.0%}) more free per GPU",
        )
    # The nearest measurement there is: the pinned exllamav3's terms (else the newest), plus the margin.
    base = profile.calibration_for(pin.exllamav3) or profile.calibrations[-1]
    stack = Stack(
        tabbyapi,
        exllamav3,
        variant.torch,
        variant.name,
        pin.python,
        base.exllamav3,
        False,
        margin,
    )
    margins = tuple(margin.mib(gpu.total_mib) for gpu in inventory.gpus)
    return StackChoice(stack, profile.with_calibration(base.exllamav3), margins)

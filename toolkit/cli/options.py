"""Options several commands share, declared once: the plan flags, "GPUs from --gpus or NVML", numbers and ports.

Numbers are parsed here rather than by argparse `type=` so that a bad value is one line and exit 2, not a usage
dump.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any

from .. import validate
from ..detect.inventory import GpuInventory
from ..errors import BadInput
from ..facts.runtime import DEFAULT_HOST_PORT
from ..plan.plan import PlanRequest

# Default None; cache, split and cuda default to "auto", mix and allow_uncalibrated to False.
PLAN_OPTIONS = ("gpus", "context", "quant", "headroom_mib", "tabby_ref", "exllamav3")
NO_GPU_ENV = "GLM_DEPLOY_NO_GPU"
DEFAULT_PORT = str(DEFAULT_HOST_PORT)  # argparse default: parsed like a given value
MAX_SECONDS = 7 * 24 * 3600  # a week: longer waits are typos (and inf/nan are not waits)
WHOLE_NUMBER = re.compile(r"-?[0-9][0-9_]{0,17}")
GROUP_SUBCOMMANDS = "glm_deploy_subcommands"  # where a command group's parser keeps its subcommand registry


def add_plan_options(parser: Any) -> None:
    """--profile, --gpus, --context, --cache, --quant, --mix, --split, --headroom-mib and the stack: --cuda,
    --tabby-ref, --exllamav3, --allow-uncalibrated (a parser or an argument group)."""
    parser.add_argument(
        "--profile", default="glm-4.7", help="model profile name or YAML path (default glm-4.7)"
    )
    parser.add_argument(
        "--gpus",
        metavar="SPEC",
        help="plan for these GPUs instead of the detected ones: 8x24GiB, 4xRTX5090, 2xH200, "
        "24GiB,24GiB,48GiB, 97887MiB (GiB/MiB binary, GB/MB decimal)",
    )
    parser.add_argument(
        "--context",
        metavar="N|max",
        help="required context in tokens (default: the profile's minimum, 32768 for GLM-4.7); "
        "max = the model's maximum",
    )
    parser.add_argument(
        "--cache",
        default="auto",
        metavar="auto|FP16|K,V",
        help="KV-cache mode: auto (default), FP16, Q4/Q6/Q8, or K,V bits such as 6,5",
    )
    parser.add_argument(
        "--quant",
        metavar="BRANCH|mix:LOWER+UPPER@GIB",
        help="fix the quant: a branch of the model repo, or a mix of two branches assembled at fetch time with "
        "GIB GiB of weights (e.g. mix:2.57bpw-tuned+3.15bpw-tuned@110)",
    )
    parser.add_argument(
        "--mix",
        action="store_true",
        help="deploy the mix the planner proposes when the best branch leaves memory unused (see `deploy plan`)",
    )
    parser.add_argument(
        "--split",
        default="auto",
        metavar="auto|tp|layer",
        help="multi-GPU split: auto (default), tp (tensor parallel) or layer",
    )
    parser.add_argument(
        "--headroom-mib",
        metavar="N",
        help="safety margin per GPU in MiB (default: 256 MiB or 1%% of the GPU, the larger)",
    )
    parser.add_argument(
        "--cuda",
        default="auto",
        metavar="auto|13|12",
        help="CUDA variant of the image and its torch (default: the newest the host driver runs)",
    )
    parser.add_argument(
        "--tabby-ref",
        metavar="COMMIT",
        help="TabbyAPI commit (7-40 hex) or tag instead of the pinned one (an uncalibrated stack)",
    )
    parser.add_argument(
        "--exllamav3",
        metavar="VERSION",
        help="plan for this exllamav3 version instead of the pinned one (memory terms are per version; the "
        "image installs only the pinned one)",
    )
    parser.add_argument(
        "--allow-uncalibrated",
        action="store_true",
        help="plan a stack that has no memory calibration of its own, keeping a stated margin more free per GPU",
    )


def command_group(subparsers: Any, name: str, help_text: str = "", description: str = "") -> Any:
    """The subcommand registry of the group `deploy NAME`, created by the first module that asks (with its help):
    modules adding subcommands to one group (`deploy quant sizes`, `deploy quant mix`) each ask for it from their
    register(), and never import each other."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help_text, description=description)
        commands = parser.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)
        setattr(parser, GROUP_SUBCOMMANDS, commands)
    return getattr(parser, GROUP_SUBCOMMANDS)


def add_port_option(parser: Any) -> None:
    """--port: the host port, parsed by port_number() (the same check in every command)."""
    parser.add_argument(
        "--port", default=DEFAULT_PORT, metavar="PORT", help=f"host port (default {DEFAULT_HOST_PORT})"
    )


def add_timeout_option(parser: Any, default_s: float, what: str) -> None:
    """--timeout: an overall deadline in seconds for a command's network work."""
    parser.add_argument(
        "--timeout",
        type=float,
        default=default_s,
        metavar="SECONDS",
        help=f"overall deadline for {what}, in seconds (default {default_s:g}); a server that stalls or "
        "trickles its answers fails at this deadline",
    )


def seconds(value: float | None, option: str, allow_zero: bool = False) -> float | None:
    """A finite, non-negative (or positive) number of seconds, else one line and exit 2."""
    if value is None:
        return None
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= MAX_SECONDS):
        bound = "0" if allow_zero else "more than 0"
        raise BadInput(
            f"{option} must be {bound} and at most {MAX_SECONDS} seconds, got {value}", f"e.g. {option} 60"
        )
    return value


def given_plan_options(args: argparse.Namespace) -> list[str]:
    """The plan flags set on this command line (as the user spelled them)."""
    given = [f"--{name.replace('_', '-')}" for name in PLAN_OPTIONS if getattr(args, name) is not None]
    given += [f"--{name}" for name in ("cache", "split", "cuda") if getattr(args, name) != "auto"]
    given += ["--mix"] if args.mix else []
    return given + (["--allow-uncalibrated"] if args.allow_uncalibrated else [])


def whole_number(value: str, option: str) -> int:
    """Integers with a one-line error instead of argparse's usage dump ("32_768" is fine; 18 digits at most)."""
    if not WHOLE_NUMBER.fullmatch(value):
        raise BadInput(f"{option} {value[:40]!r} is not a whole number", f"e.g. {option} 32768")
    return int(value.replace("_", ""))


def port_number(value: str, option: str = "--port") -> int:
    """The one checked type of --port: a whole number 1-65535, else one line and exit 2."""
    if not re.fullmatch(r"-?[0-9]{1,6}", value):
        raise BadInput(f"{option} {value[:40]!r} is not a TCP port", "use 1-65535")
    return validate.port(int(value), option)


def line_count(text: str, option: str) -> int:
    """A non-negative count of lines (e.g. --tail)."""
    if not WHOLE_NUMBER.fullmatch(text):
        raise BadInput(f"{option} {text[:40]!r} is not a number", f"e.g. {option} 100 or {option} all")
    value = int(text.replace("_", ""))
    if value < 0:
        raise BadInput(f"{option} must not be negative", f"e.g. {option} 100")
    return value


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """Translate the plan flags into a PlanRequest (validation of ranges is the planner's)."""
    context_max = (args.context or "").strip().lower() == "max"
    context = None if args.context is None or context_max else whole_number(args.context, "--context")
    headroom = None if args.headroom_mib is None else whole_number(args.headroom_mib, "--headroom-mib")
    return PlanRequest(
        context=context,
        context_max=context_max,
        cache=args.cache,
        quant=args.quant,
        mix=args.mix,
        split=args.split.strip().lower(),
        headroom_mib=headroom,
        cuda=args.cuda.strip().lower(),
        tabby_ref=args.tabby_ref,
        exllamav3=args.exllamav3,
        allow_uncalibrated=args.allow_uncalibrated,
    )


def checked_request(args: argparse.Namespace) -> tuple[Any, PlanRequest]:
    """The profile and the plan request, every plan flag checked against the profile (exit 2) before any GPU is
    detected: a bad --quant is named as such on a machine without NVML too."""
    from ..facts.profiles import load_profile
    from ..plan.planner import check_request

    profile = load_profile(args.profile)
    request = request_from_args(args)
    check_request(profile, request)
    return profile, request


def inventory_from_args(args: argparse.Namespace) -> GpuInventory:
    """The GPUs to plan for: --gpus when given, else this host's (NVML; exit 4 without a driver)."""
    from ..detect.inventory import inventory_for

    return inventory_for(args.gpus)


def no_gpu(args: argparse.Namespace) -> bool:
    """The explicit CPU-only switch (--no-gpu or GLM_DEPLOY_NO_GPU=1): no GPU requests, no NVIDIA runtime check."""
    return bool(getattr(args, "no_gpu", False)) or os.environ.get(NO_GPU_ENV) == "1"

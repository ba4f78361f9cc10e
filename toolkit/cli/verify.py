"""`deploy verify`: prove a live endpoint serves the expected model and the distributions its quant should give."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..errors import EXIT_OK, EXIT_VERIFY_FAILED, BadInput
from ..verify.limits import VERIFY_TIMEOUT_S
from .options import add_timeout_option, seconds
from .views import print_checks


def register(subparsers: Any) -> None:
    """Add the verify parser."""
    parser = subparsers.add_parser(
        "verify",
        help="check a live TabbyAPI endpoint: health, readiness, chat, KL spot-check",
        description="Liveness (/health), readiness (/v1/model: model id, cache mode, context), function (a chat "
        "completion; reasoning arrives as reasoning_content), and with --reference a KL spot-check of "
        "teacher-forced next-token distributions. With --out DIR (a deployment folder) the URL, key, "
        "expectations and the deployment reference come from that folder. Exit 0 when all pass, 5 when any "
        "fails.",
    )
    parser.add_argument(
        "--url", help="the endpoint, e.g. http://127.0.0.1:5000 (default with --out: the deployment's)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="a deployment folder (`deploy auto`/`render`): its URL, API key, plan and stored reference",
    )
    parser.add_argument(
        "--api-key-file", help="a file with the key, or TabbyAPI's api_tokens.yml (default: $DEPLOY_API_KEY)"
    )
    parser.add_argument(
        "--reference", type=Path, help="a reference file from `deploy reference record|compute`"
    )
    parser.add_argument("--max-kl", type=float, help="fail when the mean KL exceeds this (nats)")
    parser.add_argument("--expect-model", help="the model id /v1/model must report")
    parser.add_argument(
        "--expect-cache-mode", help='the cache mode /v1/model must report, e.g. "5,4" or FP16'
    )
    parser.add_argument("--expect-context", type=int, help="the max_seq_len /v1/model must report")
    parser.add_argument(
        "--expect-quant",
        help="the profile's quant branch being served (sets the KL threshold "
        "against a full-precision reference)",
    )
    parser.add_argument(
        "--profile", default="glm-4.7", help="model profile for measured KL (default glm-4.7)"
    )
    parser.add_argument("--prompts", type=int, help="use only the reference's first N prompts")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the server to come up (its port is closed while "
        "the model loads); a server that does not answer at all by then fails liveness",
    )
    add_timeout_option(parser, VERIFY_TIMEOUT_S, "every check together (after --wait)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--junit", help="also write a JUnit XML report here")
    parser.set_defaults(run=run, split=None, expected_kl=None)


def _from_deployment(args: argparse.Namespace) -> Any:
    """Fill what the deployment folder knows into args (flags given win); the stored reference, if any."""
    from ..deploy.deployment import load_deployment
    from ..deploy.reference_step import reference_path
    from ..deploy.steps import expected_kl
    from ..verify.reference import load_reference

    dep = load_deployment(args.out)
    args.url = args.url or dep.url
    args.api_key_file = args.api_key_file or str(dep.api_tokens)
    args.expect_model = args.expect_model or dep.model_folder
    args.expect_cache_mode = args.expect_cache_mode or dep.plan.cache_mode
    args.expect_context = args.expect_context or dep.plan.context
    args.expect_quant = args.expect_quant or (None if dep.plan.mix else dep.plan.quant)
    args.expected_kl = None if args.expect_quant else expected_kl(dep.plan)  # a mix's estimate
    args.profile = dep.plan.profile
    args.split = dep.plan.split
    path = reference_path(dep)
    return load_reference(path) if path.is_file() else None


def _validate(args: argparse.Namespace) -> None:
    from ..inputs import output_file
    from ..plan.memory import parse_cache_mode
    from ..verify.client import check_url

    if args.url is None:
        raise BadInput("verify needs --url or --out", "e.g. --url http://127.0.0.1:5000, or --out deploy-out")
    check_url(args.url)
    if args.max_kl is not None and not (math.isfinite(args.max_kl) and args.max_kl >= 0):
        raise BadInput(f"--max-kl must be a non-negative number, got {args.max_kl}")
    if args.prompts is not None and args.prompts < 1:
        raise BadInput(f"--prompts must be at least 1, got {args.prompts}")
    if args.expect_context is not None and args.expect_context < 1:
        raise BadInput(f"--expect-context must be positive, got {args.expect_context}")
    if args.expect_cache_mode is not None:
        parse_cache_mode(args.expect_cache_mode)
    seconds(args.wait, "--wait", allow_zero=True)
    seconds(args.timeout, "--timeout")
    if args.junit is not None:
        output_file(args.junit, "--junit")


def run(args: argparse.Namespace) -> int:
    """Validate everything local first (exit 2), then run the checks (exit 5 on any failure)."""
    from ..output import emit_json, status_console
    from ..verify.checks import VerifyRequest, run_verify
    from ..verify.client import read_api_key
    from ..verify.readiness import Expectations
    from ..verify.reference import load_reference
    from ..verify.report import report_dict, write_junit

    stored = _from_deployment(args) if args.out is not None else None
    _validate(args)
    api_key = read_api_key(args.api_key_file)
    reference = load_reference(args.reference) if args.reference else stored
    if reference is None and args.out is not None:
        status_console().print(
            f"note: {args.out} holds no deployment reference: no KL spot-check "
            f"(`deploy reference deployment --out {args.out}` makes one)",
            markup=False,
        )
    if args.expect_quant or (
        reference is not None and reference.kind == "full_precision" and args.max_kl is None
    ):
        from ..facts.profiles import load_profile

        profile = load_profile(
            args.profile
        )  # a bad profile or unknown branch is bad input, before any request
        if args.expect_quant:
            profile.quant(args.expect_quant)
    if not args.json:
        status_console().print(f"verifying {args.url} (at most {args.wait + args.timeout:g} s) ...")
    request = VerifyRequest(
        url=args.url,
        api_key=api_key,
        reference=reference,
        max_kl=args.max_kl,
        prompts=args.prompts,
        profile=args.profile,
        wait_s=args.wait,
        deadline_s=args.timeout,
        split=args.split,
        expected_kl=args.expected_kl,
        expect=Expectations(
            model_id=args.expect_model,
            cache_mode=args.expect_cache_mode,
            context=args.expect_context,
            quant=args.expect_quant,
        ),
    )
    report = run_verify(request)
    if args.junit:
        write_junit(report, Path(args.junit))
    data = report_dict(report)
    if args.json:
        emit_json(data)
    else:
        print_checks(data["checks"], report.passed)
    return EXIT_OK if report.passed else EXIT_VERIFY_FAILED

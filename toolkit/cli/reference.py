"""`deploy reference record|compute|deployment`: make the reference distributions `deploy verify` compares to."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import EXIT_OK, BadInput
from ..redact import printable
from ..verify.limits import RECORD_TIMEOUT_S
from .options import NO_GPU_ENV, add_timeout_option, no_gpu, seconds


def register(subparsers: Any) -> None:
    """Add `reference` with its three subcommands."""
    parser = subparsers.add_parser("reference", help="record or compute reference next-token distributions")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    record = actions.add_parser(
        "record",
        help="record a reference from a live deployment (for regression checks)",
        description="Teacher-forced top-K distributions at the prompt set's prefixes, read from a live TabbyAPI.",
    )
    record.add_argument("--url", required=True, help="the endpoint, e.g. http://127.0.0.1:5000")
    record.add_argument(
        "--api-key-file", help="a file with the key, or api_tokens.yml (default: $DEPLOY_API_KEY)"
    )
    record.add_argument("--out", required=True, help="reference file to write (.json or .json.gz)")
    record.add_argument("--prompts", type=Path, help="prompt set YAML/JSON (default: the shipped set)")
    record.add_argument("--top-k", type=int, default=None, help="entries per position (default 100)")
    add_timeout_option(record, RECORD_TIMEOUT_S, "the whole recording")
    record.set_defaults(run=run_record)
    compute = actions.add_parser(
        "compute",
        help="compute a full-precision reference from a local model dir (needs extra `gpu`)",
        description="Exact next-token distributions from the BF16 original (or any model exllamav3 loads).",
    )
    compute.add_argument(
        "--model-dir", type=Path, required=True, help="the model folder (config.json, weights)"
    )
    compute.add_argument("--out", required=True, help="reference file to write (.json or .json.gz)")
    compute.add_argument("--prompts", type=Path, help="prompt set YAML/JSON (default: the shipped set)")
    compute.add_argument("--top-k", type=int, default=None, help="entries per position (default 200)")
    compute.add_argument(
        "--device", default="auto", help="auto (one GPU, else split over every visible GPU) or cuda:N"
    )
    compute.set_defaults(run=run_compute)
    deployment = actions.add_parser(
        "deployment",
        help="compute a deployment's reference inside its image, before serving (what `deploy auto` does)",
        description="Run the reference computation (exllamav3 in-process, FP16 cache) in the deployment's "
        "built image on its planned GPUs, with the model folder and this package mounted read-only, and "
        "store it in the deployment folder; reused while the model commit, image, prompts and code are "
        "unchanged. The GPUs must be free: a running server of this deployment is stopped first. Exit 3 "
        "out of GPU memory, 4 environment missing (model not fetched, image not built, no engine).",
    )
    deployment.add_argument(
        "--out", default="deploy-out", type=Path, help="the deployment folder (default ./deploy-out)"
    )
    deployment.add_argument(
        "--force", action="store_true", help="compute again even when the stored reference is current"
    )
    deployment.add_argument(
        "--no-gpu",
        action="store_true",
        help=f"CPU-only test engine: no GPU device request (also {NO_GPU_ENV}=1)",
    )
    deployment.add_argument("--json", action="store_true", help="print the result as JSON")
    deployment.set_defaults(run=run_deployment)


def _check_out(out: str, top_k: int | None) -> Path:
    from ..inputs import output_file
    from ..verify.reference import MAX_TOP_K

    if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
        raise BadInput(f"--top-k must be between 1 and {MAX_TOP_K}, got {top_k}")
    path = output_file(out, "--out")
    if not path.name.endswith((".json", ".json.gz")):
        raise BadInput(f"--out {out} must end in .json or .json.gz", "e.g. --out reference.json.gz")
    return path


def run_record(args: argparse.Namespace) -> int:
    """Record from a live server; server problems are verification failures (exit 5)."""
    from ..errors import VerificationFailed
    from ..output import status_console
    from ..verify.client import ServerError, TabbyClient, check_url, read_api_key
    from ..verify.reference import RECORD_TOP_K, load_prompts, record_reference, save_reference

    out = _check_out(args.out, args.top_k)
    check_url(args.url)
    seconds(args.timeout, "--timeout")
    prompts = load_prompts(args.prompts)
    api_key = read_api_key(args.api_key_file)
    client = TabbyClient(args.url, api_key, deadline=time.monotonic() + args.timeout)
    try:
        reference = record_reference(client, prompts, args.top_k or RECORD_TOP_K)
    except ServerError as error:
        raise VerificationFailed(f"recording failed: {error}") from None
    finally:
        client.close()
    save_reference(reference, out)
    status_console().print(
        f"wrote {out}: {reference.positions} positions from {len(reference.prompts)} "
        f"prompts of {printable(repr(reference.model_id), 200)} ({reference.kind})"
    )
    return EXIT_OK


def run_compute(args: argparse.Namespace) -> int:
    """Compute with exllamav3 on a GPU (the reference entry point's computation; extra `gpu`)."""
    from ..output import status_console
    from ..verify.reference import COMPUTE_TOP_K, load_prompts, save_reference
    from ..verify.reference_entry import compute

    out = _check_out(args.out, args.top_k)
    prompts = load_prompts(args.prompts)
    status = status_console()
    reference = compute(
        args.model_dir,
        prompts,
        top_k=args.top_k or COMPUTE_TOP_K,
        device=args.device,
        log=lambda line: status.print(line, markup=False),
    )
    save_reference(reference, out)
    status.print(
        f"wrote {out}: {reference.positions} positions from {len(reference.prompts)} prompts of "
        f"{reference.model_id!r} ({reference.kind})"
    )
    return EXIT_OK


def run_deployment(args: argparse.Namespace) -> int:
    """The deployment reference step on its own: reused or computed in the image."""
    from ..deploy import engine
    from ..deploy.deployment import load_deployment
    from ..deploy.reference_step import describe, reference_step
    from ..output import Progress, emit_json

    dep = load_deployment(args.out)
    outcome = reference_step(
        dep, engine.connect(), Progress(quiet=args.json), gpu=not no_gpu(args), force=args.force
    )
    if args.json:
        emit_json(outcome.to_dict())
    else:
        print(describe(outcome))
    return EXIT_OK

"""`deploy reference record|compute`: make the reference distributions `deploy verify --reference` compares to."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import EXIT_OK, BadInput


def register(subparsers: Any) -> None:
    """Add `reference` with its two subcommands."""
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
    record.add_argument("--out", type=Path, required=True, help="reference file to write (.json or .json.gz)")
    record.add_argument("--prompts", type=Path, help="prompt set YAML/JSON (default: the shipped set)")
    record.add_argument("--top-k", type=int, default=None, help="entries per position (default 100)")
    record.set_defaults(run=run_record)
    compute = actions.add_parser(
        "compute",
        help="compute a full-precision reference from a local model dir (needs extra `gpu`)",
        description="Exact next-token distributions from the BF16 original (or any model exllamav3 loads).",
    )
    compute.add_argument(
        "--model-dir", type=Path, required=True, help="the model folder (config.json, weights)"
    )
    compute.add_argument(
        "--out", type=Path, required=True, help="reference file to write (.json or .json.gz)"
    )
    compute.add_argument("--prompts", type=Path, help="prompt set YAML/JSON (default: the shipped set)")
    compute.add_argument("--top-k", type=int, default=None, help="entries per position (default 200)")
    compute.add_argument("--device", default="cuda:0", help="torch device (default cuda:0)")
    compute.set_defaults(run=run_compute)


def _check_out(out: Path, top_k: int | None) -> None:
    if top_k is not None and not 1 <= top_k <= 100_000:
        raise BadInput(f"--top-k must be between 1 and 100000, got {top_k}")
    if out.exists() and out.is_dir():
        raise BadInput(f"--out {out} is a folder", "pass a file name, e.g. reference.json.gz")
    if not out.name.endswith((".json", ".json.gz")):
        raise BadInput(f"--out {out} must end in .json or .json.gz")


def run_record(args: argparse.Namespace) -> int:
    """Record from a live server; server problems are verification failures (exit 5)."""
    from ..errors import VerificationFailed
    from ..output import status_console
    from ..verify.client import ServerError, TabbyClient, check_url, read_api_key
    from ..verify.reference import RECORD_TOP_K, load_prompts, record_reference, save_reference

    _check_out(args.out, args.top_k)
    check_url(args.url)
    prompts = load_prompts(args.prompts)
    api_key = read_api_key(args.api_key_file)
    client = TabbyClient(args.url, api_key)
    try:
        reference = record_reference(client, prompts, args.top_k or RECORD_TOP_K)
    except ServerError as error:
        raise VerificationFailed(f"recording failed: {error}") from None
    finally:
        client.close()
    save_reference(reference, args.out)
    status_console().print(
        f"wrote {args.out}: {reference.positions} positions from {len(reference.prompts)} "
        f"prompts of {reference.model_id!r} ({reference.kind})"
    )
    return EXIT_OK


def run_compute(args: argparse.Namespace) -> int:
    """Compute with exllamav3 on a GPU (imported lazily: extra `gpu`)."""
    from ..output import status_console
    from ..verify.exl3_backend import Exl3Backend
    from ..verify.reference import COMPUTE_TOP_K, compute_reference, load_prompts, save_reference

    _check_out(args.out, args.top_k)
    prompts = load_prompts(args.prompts)
    status = status_console()
    backend = Exl3Backend(args.model_dir, args.device)
    try:
        reference = compute_reference(backend, prompts, args.top_k or COMPUTE_TOP_K)
    finally:
        backend.close()
    save_reference(reference, args.out)
    status.print(
        f"wrote {args.out}: {reference.positions} positions from {len(reference.prompts)} prompts of "
        f"{reference.model_id!r} ({reference.kind})"
    )
    return EXIT_OK

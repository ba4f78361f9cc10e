"""`deploy quant`: EXL3 quants measured from their files. `sizes` here; other modules add subcommands to the group
through options.command_group (cli modules never import each other).

`deploy quant sizes` reads a quant's quantization_config.json -- in a local quant folder, or only that file of a
branch of the profile's repository, pinned to the branch's commit -- and prints the exact VRAM weights per tensor
group and per run of like layers, with the card's size beside the exact figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..facts.layout import MODELS
from .options import command_group

GROUP_HELP = "EXL3 quants from their files: exact sizes, mixes of published branches"
GROUP_DESCRIPTION = (
    "Read EXL3 quants' quantization_config.json (exllamav3's map of every stored tensor) for exact sizes. "
    "Exit 0 ok, 2 bad input or a malformed file, 4 hub or disk unavailable."
)
DEFAULT_MODELS_DIR = f"deploy-out/{MODELS}"


def register(subparsers: Any) -> None:
    """Add the `deploy quant` group and its `sizes` subcommand."""
    commands = command_group(subparsers, "quant", GROUP_HELP, GROUP_DESCRIPTION)
    sizes = commands.add_parser(
        "sizes",
        help="exact VRAM weights of a quant per tensor group and layer, beside the card's size",
        description="Sum the bytes exllamav3 stores for every tensor (quantization_config.json) per tensor group "
        "(attention, shared experts, routed experts' gate/up and down, dense MLP, router, norms, head; the "
        "embedding stays in system RAM) and per layer, and compare the total with the model card's size for the "
        "branch (rounded to whole GiB on the card: a larger difference is flagged). --quant downloads only that "
        "file of the branch, pinned to the branch's commit, into <models-dir>/<branch>/ where fetch-model "
        "keeps it; a local folder is compared with the card when its name is a branch of it. Exit 0 ok, 2 bad "
        "input or a malformed file, 4 hub or disk unavailable.",
    )
    source = sizes.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", metavar="DIR", help="a local EXL3 quant folder")
    source.add_argument(
        "--quant",
        metavar="BRANCH",
        help="a branch of the profile's repository (only its size map is fetched)",
    )
    sizes.add_argument(
        "--profile", default="glm-4.7", help="model profile name or YAML path (default glm-4.7)"
    )
    sizes.add_argument(
        "--models-dir",
        default=DEFAULT_MODELS_DIR,
        metavar="DIR",
        help=f"where --quant's file is kept: DIR/<branch>/ (default {DEFAULT_MODELS_DIR}, fetch-model's folder)",
    )
    sizes.add_argument("--hf-token-file", type=Path, help="file holding a Hugging Face token (never printed)")
    sizes.add_argument("--json", action="store_true", help="print the sizes as JSON")
    sizes.set_defaults(run=run_sizes)


def run_sizes(args: argparse.Namespace) -> int:
    """Read the storage map (local or the branch's), report it; BadInput/EnvironmentMissing carry exit 2/4."""
    from ..facts.profiles import BRANCH_PATTERN, load_profile
    from ..output import emit_json
    from ..quant.sizes import card_check, sizes_report
    from ..quant.storage import read_storage

    profile = load_profile(args.profile)
    if args.model_dir is not None:
        folder = Path(args.model_dir)
        if not folder.is_dir():
            raise BadInput(
                f"--model-dir {args.model_dir} is not a folder",
                "give the quant's folder (quantization_config.json)",
            )
        storage = read_storage(folder)
        name = folder.resolve().name
        branch = name if any(q.branch == name for q in profile.quants) else None
        source: dict[str, Any] = {"kind": "folder", "path": str(folder), "branch": branch}
    else:
        if not BRANCH_PATTERN.fullmatch(args.quant):
            raise BadInput(f"--quant {args.quant!r} is not a branch name", "e.g. --quant 3bpw_H6")
        fetched = _fetch_storage(args, profile.hf_repo)
        storage = read_storage(Path(fetched.path).parent)
        branch = args.quant
        source = {"kind": "hub", **fetched.to_dict()}
    report = sizes_report(storage, source, card_check(storage, profile, branch))
    if args.json:
        emit_json(report)
    else:
        _print_sizes(report, profile.display_name)
    return 0


def _fetch_storage(args: argparse.Namespace, repo: str) -> Any:
    """The branch's quantization_config.json through the hub adapter (a bad token file is exit 2 first)."""
    from ..deploy import hub
    from ..quant.storage import QUANT_CONFIG, QUANT_CONFIG_BYTES

    if args.hf_token_file is not None:
        hub.read_token_file(args.hf_token_file)
    return hub.fetch_file(
        repo,
        args.quant,
        Path(args.models_dir),
        hub.resolve_token(args.hf_token_file),
        filename=QUANT_CONFIG,
        limit=QUANT_CONFIG_BYTES,
        progress=not args.json,
    )


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_sizes(report: dict[str, Any], display_name: str) -> None:
    """The group table, the layer runs and the card line."""
    from rich.table import Table

    from ..output import console
    from ..quant.sizes import LAYER_COLUMNS
    from ..redact import printable

    out = console()
    if not out.is_terminal:
        out.width = 200
    source, quant = report["source"], report["quant"]
    where = (
        f"{source['repo']}@{source['revision']} (commit {source['commit'][:12]}), {Path(source['path']).name} only"
        if source["kind"] == "hub"
        else source["path"]
    )
    out.print(f"{printable(display_name)} quant: {printable(where)}")
    out.print(
        f"exllamav3 {quant['version']}, bits {quant['bits']:g}, head {quant['head_bits']:g} bits, codebook "
        f"{quant['codebook']}, {quant['modules']} modules"
    )
    unit, scale = (
        ("GiB", 2**30) if report["vram_bytes"] >= 2**30 else ("MiB", 2**20)
    )  # a tiny test model: MiB
    groups = Table(show_edge=False, pad_edge=False)
    for header, justify in (("group", "left"), (unit, "right"), ("share", "right"), ("bits", "right")):
        groups.add_column(header, justify=justify)  # type: ignore[arg-type]
    for row in report["groups"]:
        ram = row["memory"] == "ram"
        groups.add_row(
            f"{row['group']} (system RAM)" if ram else row["group"],
            f"{row['bytes'] / scale:.2f}",
            "-" if row["share"] is None else f"{100 * row['share']:.1f} %",
            _bits(row["bits"]),
        )
    groups.add_row("VRAM weights", f"{report['vram_bytes'] / scale:.2f}", "100.0 %", "", style="bold")
    out.print(groups)
    layers = Table(title="per layer (bits per group)", show_edge=False, pad_edge=False)
    for header in ("layers", "count", f"{unit} each", *LAYER_COLUMNS):
        layers.add_column(header, justify="right")
    for run in report["layers"]:
        span = str(run["first"]) if run["count"] == 1 else f"{run['first']}-{run['last']}"
        layers.add_row(
            span,
            str(run["count"]),
            f"{run['bytes_each'] / scale:.3f}",
            *(_bits(run["bits"].get(group)) for group in LAYER_COLUMNS),
        )
    out.print(layers)
    out.print(_card_line(report["card"], report["vram_gib"]), markup=False)


def _card_line(card: dict[str, Any] | None, exact_gib: float) -> str:
    """The card's size beside the exact one, flagged when they differ by more than the card's rounding."""
    if card is None:
        return f"exact VRAM weights {exact_gib:.2f} GiB; not a branch on the card, nothing to compare"
    verdict = (
        "agrees (the card rounds to whole GiB)"
        if card["agrees"]
        else f"DISAGREES by {card['difference_gib']:+.2f} GiB, more than the card's rounding "
        f"(+-{card['tolerance_gib']} GiB)"
    )
    return f"card: {card['branch']} {card['card_gib']:g} GiB; exact {card['exact_gib']:.2f} GiB: {verdict}"

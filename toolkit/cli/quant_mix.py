"""`deploy quant mix`: a mixed-precision quant between two (or more) downloaded branches, sized exactly."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EXIT_OK, BadInput
from .options import command_group


def register(subparsers: Any) -> None:
    """`mix` in the `quant` group (cli/quant.py makes the group; main lists this module after it)."""
    register_mix(command_group(subparsers, "quant"))


def register_mix(quant_subparsers: Any) -> None:
    """Add `mix` to the `quant` group."""
    parser = quant_subparsers.add_parser(
        "mix",
        help="assemble a mixed-precision quant from two or more local EXL3 quants of one model",
        description="Take every tensor of the mix from one of the sources (same model, same codebook; never "
        "re-quantizing) so that its VRAM weights come as close to the target as the recipe allows without "
        "exceeding it, through exllamav3's own assembly. A recipe (profiles/quant_mix.yaml: the GLM-4.7 card's "
        "heuristics) decides the order, or exllamav3's optimizer from a measurement of these very sources. The "
        "assembly runs in the deployment's built image (--image) or a local Python with exllamav3 (--python); "
        "the folder is written beside --out and renamed into place once every module checks out, with mix.json "
        "saying where each came from. Exit 2 bad input (sources, target, --out), 4 environment (disk, engine, "
        "image, exllamav3), 5 the result differs from the plan (nothing kept).",
    )
    parser.add_argument("--lower", required=True, metavar="DIR", help="the smallest quant (the mix's base)")
    parser.add_argument("--upper", required=True, metavar="DIR", help="the largest quant")
    parser.add_argument(
        "--source", action="append", default=[], metavar="DIR", help="a quant between them (repeatable)"
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-gib", metavar="GIB", help="VRAM weights of the mix in GiB (2^30 bytes)")
    size.add_argument(
        "--target-bpw", metavar="BPW", help="bits per weight of the layers, as exllamav3 reports it"
    )
    method = parser.add_mutually_exclusive_group()
    method.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help="a recipe of profiles/quant_mix.yaml or a YAML file (default card)",
    )
    method.add_argument(
        "--measurement",
        metavar="FILE",
        help="exllamav3's measurement of these sources: its optimizer decides",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="the model folder to write (a new folder)"
    )
    runner = parser.add_mutually_exclusive_group(required=True)
    runner.add_argument(
        "--image", metavar="IMAGE", help="run the assembly in this built image (docker), e.g. a deployment's"
    )
    runner.add_argument("--python", metavar="PATH", help="run it with this Python, which imports exllamav3")
    parser.add_argument("--force", action="store_true", help="assemble again even when --out holds this mix")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_mix)


def _number(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise BadInput(f"{option} {value[:40]!r} is not a number", f"e.g. {option} 120") from None


def run_mix(args: argparse.Namespace) -> int:
    """Check everything, then assemble (or reuse) the mix and say what it is."""
    from .. import validate
    from ..output import Progress, emit_json
    from ..quant import mix
    from ..quant.recipe import gib

    request = mix.MixRequest(
        lower=args.lower,
        upper=args.upper,
        others=tuple(args.source),
        target_gib=_number(args.target_gib, "--target-gib"),
        target_bpw=_number(args.target_bpw, "--target-bpw"),
        recipe=args.recipe,
        measurement=args.measurement,
        out=args.out,
        force=args.force,
    )
    if args.image is not None and not validate.IMAGE_REF.match(args.image):
        raise BadInput(
            f"--image {args.image[:80]!r} is not a Docker image reference",
            "pass the deployment's built image, e.g. glm-deploy/tabbyapi:<tag> (the image of its render.json)",
        )
    python = mix.PythonRunner(args.python) if args.python is not None else None
    prepared = mix.prepare(request)
    if python is not None:
        runner: mix.Runner = python
    else:
        from ..deploy import engine
        from ..deploy.mix_image import ImageRunner

        runner = ImageRunner(engine.connect(), args.image)
    outcome = mix.build(prepared, runner, Progress(quiet=args.json))
    if args.json:
        emit_json(outcome.to_dict())
        return EXIT_OK
    manifest = outcome.manifest
    how = manifest["recipe"]["name"] if manifest["recipe"] else "the measurement"
    counts = ", ".join(f"{n} from {sid}" for sid, n in manifest["modules_from"].items())
    print(
        f"{'reused' if outcome.reused else 'wrote'} {outcome.path}: {gib(manifest['actual_bytes'])} GiB of VRAM "
        f"weights ({manifest['actual_bytes']} bytes, target {manifest['target_bytes']}; {manifest['bits']} bpw, "
        f"head {manifest['head_bits']} "
        f"bits) by {how}; modules: {counts}; manifest {outcome.path / mix.MIX_MANIFEST}"
    )
    note = shortfall_note(manifest)
    if note:
        print(f"note: {note}")
    return EXIT_OK


# A mix this far below its target left memory unused that the user sized it for: say so, and why.
SHORTFALL_SHARE = 0.02


def shortfall_note(manifest: dict[str, Any]) -> str | None:
    """Why the mix came out well below its target, when it did (the optimizer's stall is the known case)."""
    from ..quant.recipe import gib

    short = manifest["target_bytes"] - manifest["actual_bytes"]
    if short <= SHORTFALL_SHARE * manifest["target_bytes"]:
        return None
    text = f"the mix is {gib(short)} GiB below the target"
    measured = manifest.get("measurement")
    if measured and measured.get("modules_without_measured_gain"):
        return (
            f"{text}: exllamav3's optimizer only spends bits where its measurement shows a KL gain, and "
            f"{measured['modules_without_measured_gain']} modules measured none (benchmarks/quant_mix: routed "
            "experts) -- use --recipe card to fill the target"
        )
    return f"{text}: no further step of the recipe fits -- a source closer in size fills it more finely"

"""`deploy fetch-model | build | mix-model | up | status | logs | down`: one rendered out dir, driven step by step.

Each command parses, calls its step in toolkit.deploy.steps and prints the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..deploy.deployment import endpoint_summary, load_deployment
from ..deploy.steps import build_step, container_name, down_step, fetch_step, status_data, up_step
from ..errors import EnvironmentMissing
from ..output import Progress, emit_json
from ..redact import printable
from .options import NO_GPU_ENV, line_count, no_gpu, seconds


def register(subparsers: Any) -> None:
    """Add fetch-model, build, up, status, logs and down."""

    def common(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=description)
        parser.add_argument(
            "--out",
            default="deploy-out",
            help="the rendered deployment folder (default ./deploy-out)",
        )
        return parser

    fetch = common(
        "fetch-model",
        "download the planned quant (resumable, verified)",
        "Download repo@branch of the plan into the models folder with huggingface_hub: progress on "
        "stderr, resume, sizes and sha256 checked; a complete download is reused. A plan deploying a mix "
        "downloads both of its branches, after checking from their config.json and quantization_config.json "
        "that they mix (same model, same codebook, the target within reach: exit 2 otherwise). HF_TOKEN is read "
        "from the environment, --hf-token-file or huggingface_hub's saved token. Exit 4 on disk/network.",
    )
    fetch.add_argument("--hf-token-file", type=Path, help="file holding a Hugging Face token (never printed)")
    fetch.add_argument("--json", action="store_true", help="print the result as JSON")
    fetch.set_defaults(run=run_fetch)

    build = common(
        "build",
        "build the rendered image (reused when unchanged)",
        "Build the rendered Dockerfile with the Docker engine, streaming progress; an image labelled with "
        "the same Dockerfile hash is reused. Exit 4 when the engine is unreachable or the build fails.",
    )
    build.add_argument("--force", action="store_true", help="build even when a matching image exists")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(run=run_build)

    mix = common(
        "mix-model",
        "assemble the plan's mix from its two downloaded branches (reused when unchanged)",
        "For a plan deploying a mix (--mix or --quant mix:LOWER+UPPER@GIB): check both downloaded branches "
        "as `deploy quant mix` does, then run exllamav3's assembly in the deployment's built image (no GPU, no "
        "network) into the models folder under the mix's name, with mix.json saying where each tensor came "
        "from; a mix already there with the same sources, recipe and target is reused. Exit 2 bad input (not a "
        "mix, unmixable branches), 4 environment (branches not fetched, image not built, disk), 5 the result "
        "differs from the plan.",
    )
    mix.add_argument(
        "--python", metavar="PATH", help="run the assembly with this Python (which imports exllamav3) instead"
    )
    mix.add_argument("--force", action="store_true", help="assemble again even when the mix is in place")
    mix.add_argument("--json", action="store_true", help="print the result as JSON")
    mix.set_defaults(run=run_mix_model)

    up = common(
        "up",
        "start (or converge) the container and wait until it serves the model",
        "Preflight (engine, NVIDIA runtime, driver vs image CUDA, disk, port), then start the container or "
        "keep/replace the existing one, and wait until /v1/model reports the planned model, cache mode and "
        "context. Exit 3 on out-of-memory, 4 environment, 5 not ready.",
    )
    _up_options(up)
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.set_defaults(run=run_up)

    status = common(
        "status",
        "container state, health, served model, stack versions, GPU memory vs plan",
        "Show the deployment's container, /health, /v1/model, the TabbyAPI/exllamav3/torch versions inside the "
        "running container against the plan's stack, per-GPU memory from NVML against the plan's prediction, and "
        "the stored deployment reference (current or stale); --kl also runs the KL spot-check against it (drift "
        "after restarts or upgrades; `deploy verify --out` exits 5 on it).",
    )
    status.add_argument(
        "--kl", action="store_true", help="run the KL spot-check against the stored deployment reference"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(run=run_status)

    logs = common("logs", "print the container's log", "Print the server's log (stdout and stderr).")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", default="200", help="lines from the end (a number or 'all', default 200)")
    logs.set_defaults(run=run_logs)

    down = common(
        "down",
        "stop and remove the container (models and keys kept)",
        "Remove the deployment's container. The model folder and api_tokens.yml stay unless --purge.",
    )
    down.add_argument(
        "--purge", action="store_true", help="also delete the model folder and the API key file"
    )
    down.add_argument("--json", action="store_true", help="print the result as JSON")
    down.set_defaults(run=run_down)


def _up_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-gpu",
        action="store_true",
        help=f"CPU-only engine (tests): no GPU device requests, no NVIDIA runtime check "
        f"(also {NO_GPU_ENV}=1)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        metavar="S",
        help="seconds to wait for the model to load (default: 300 + 4 per GiB on disk)",
    )
    parser.add_argument(
        "--retry-smaller",
        action="store_true",
        help="after an out-of-memory load, re-plan with half the context (>= the profile minimum) "
        "and retry once",
    )


def run_fetch(args: argparse.Namespace) -> int:
    from ..deploy.hub import read_token_file

    dep = load_deployment(args.out)
    if args.hf_token_file is not None:
        read_token_file(args.hf_token_file)  # a bad token file is exit 2 before the hub is asked
    result = fetch_step(dep, Progress(quiet=args.json), args.hf_token_file)
    if args.json:
        emit_json(result.to_dict())
    elif dep.plan.mix is not None:
        print("\n".join(result.lines()))
    else:
        print(
            f"model ready at {result.path} ({result.repo}@{result.revision}, commit {result.commit[:12]}, "
            f"{result.total_bytes / 2**30:.1f} GiB{', reused' if result.reused else ''})"
        )
    return 0


def run_mix_model(args: argparse.Namespace) -> int:
    from ..deploy import mix_step
    from ..quant.mix import PythonRunner

    dep = load_deployment(args.out)
    mix_step.planned_mix(dep)
    python = PythonRunner(args.python) if args.python is not None else None
    prepared = mix_step.prepare_mix(dep, args.force)  # bad input before the engine is asked
    if python is not None:
        runner: Any = python
    else:
        from ..deploy import engine
        from ..deploy.mix_image import ImageRunner

        runner = ImageRunner(engine.connect(), str(dep.manifest["image"]))
    outcome = mix_step.mix_step(dep, runner, Progress(quiet=args.json), prepared, args.force)
    if args.json:
        emit_json(outcome.to_dict())
    else:
        print(mix_step.describe(outcome))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from ..deploy import engine

    dep = load_deployment(args.out)
    built = build_step(dep, engine.connect(), Progress(quiet=args.json), force=args.force)
    if args.json:
        emit_json({"image": built.tag, "id": built.id, "reused": built.reused})
    else:
        print(f"image {built.tag} ({built.id[:19]}){' reused' if built.reused else ''}")
    return 0


def run_up(args: argparse.Namespace) -> int:
    from ..deploy import engine

    dep = load_deployment(args.out)
    seconds(args.ready_timeout, "--ready-timeout")
    client = engine.connect()
    result = up_step(
        dep,
        client,
        Progress(quiet=args.json),
        gpu=not no_gpu(args),
        ready_timeout_s=args.ready_timeout,
        retry_smaller=args.retry_smaller,
    )
    dep = load_deployment(args.out)
    if args.json:
        emit_json(
            {
                "ok": True,
                "url": dep.url,
                "container": result.state.container_name,
                "action": result.action,
                "ready_s": round(result.ready_s, 1),
                "model": result.model,
                "api_key_file": str(dep.api_tokens),
                "retried_context": result.retried_context,
            }
        )
    else:
        print(endpoint_summary(dep))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from ..deploy import engine

    dep = load_deployment(args.out)
    data = status_data(dep, engine.connect(), kl=args.kl)
    if args.json:
        emit_json(data)
        return 0
    container = data["container"]
    print(
        f"deployment {dep.out_dir}: {data['state']}"
        + (
            f" (container {container['name']}, restarts {container['restart_count']}, health "
            f"{container['health'] or '-'})"
            if container
            else ""
        )
    )
    if data.get("diagnosis"):
        print(
            printable(
                f"  problem: {data['diagnosis']['message']} (log: {data['diagnosis']['evidence']}) -- "
                f"{data['diagnosis']['hint']}",
                2000,
            )
        )
    if data["health"] is not None:
        print(f"  {dep.url}/health: {data['health']}")
    if data["model"]:
        print(f"  model: {json.dumps(data['model'])}")
    if data["stack"]:
        print(f"  {_stack_line(data['stack'])}")
    if data["gpus"] is None:
        print(f"  GPU memory: NVML {data['nvml']}")
    else:
        for row in data["gpus"]:
            print(
                f"  GPU {row['index']} {row['name'] or '?'}: {row['used_mib']} MiB used now, "
                f"{row['planned_mib']} MiB planned"
            )
    reference = data["reference"]
    if reference is None:
        print(f"  reference: none (`deploy reference deployment --out {dep.out_dir}` makes one)")
    else:
        current = {True: "current", False: "STALE (model, image or code changed)", None: "currency unknown"}
        print(
            f"  reference: {reference['path']} ({reference['positions']} positions, {reference['created']}, "
            f"{current[reference['current']]})"
        )
    if data["kl"] is not None:
        print(f"  kl: {'PASS' if data['kl']['passed'] else 'FAIL'} {data['kl']['detail']}")
    elif args.kl:
        print("  kl: not run (needs a running server and a stored reference)")
    return 0


def _stack_line(stack: dict[str, Any]) -> str:
    """'stack: TabbyAPI ..., exllamav3 ..., torch ...: as planned' or what differs and what to do."""
    if stack.get("error"):
        return f"stack: unknown ({stack['error']})"
    running = stack["running"]
    shown = (
        f"TabbyAPI {str(running['tabbyapi'] or '?')[:12]}, exllamav3 {running['exllamav3'] or '?'}, "
        f"torch {running['torch'] or '?'}"
    )
    if not stack["differs"]:
        return f"stack: {shown} (as planned)"
    return (
        f"stack DIFFERS from the plan: {'; '.join(stack['differs'])} -- the image is not the rendered one: "
        "`deploy build --force` then `deploy up`"
    )


def run_logs(args: argparse.Namespace) -> int:
    from ..deploy import engine

    dep = load_deployment(args.out)
    tail: int | str = "all" if args.tail == "all" else line_count(args.tail, "--tail")
    container = engine.find_container(engine.connect(), container_name(dep))
    if container is None:
        raise EnvironmentMissing(f"no container for {dep.out_dir}", "run `deploy up` first")
    for chunk in engine.stream_logs(container, tail=tail, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def run_down(args: argparse.Namespace) -> int:
    from ..deploy import engine
    from ..deploy.steps import check_purgeable, model_folders

    dep = load_deployment(args.out)
    for folder in model_folders(dep) if args.purge else []:
        if os.path.lexists(folder):
            check_purgeable(folder)  # a refused purge is exit 2 before the engine is asked
    result = down_step(dep, engine.connect(), args.purge, Progress(quiet=args.json))
    if args.json:
        emit_json(result)
    return 0

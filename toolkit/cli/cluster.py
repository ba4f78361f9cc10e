"""`deploy cluster plan|render|verify`: a fleet of GPU nodes behind one endpoint on Docker Swarm.

Mixed quants (node classes that would serve different quants behind one endpoint) exit 2 (bad input: the fleet
as described cannot serve one model) unless --allow-mixed; the plan is still printed first.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import EXIT_OK, EXIT_VERIFY_FAILED, BadInput
from ..verify.limits import VERIFY_TIMEOUT_S
from .options import add_timeout_option, seconds


def register(subparsers: Any) -> None:
    """Add `deploy cluster` and its subcommands."""
    parser = subparsers.add_parser(
        "cluster",
        help="plan, render and verify a fleet behind one endpoint on Docker Swarm",
        description="fleet.yaml lists the nodes and their GPUs; nodes with identical GPUs share a plan. "
        "Exit 2 bad input (including mixed quants without --allow-mixed), 3 a class fits nothing, "
        "4 no engine/NVML, 5 verification failed.",
    )
    commands = parser.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    plan = commands.add_parser("plan", help="show every node's quant, context and expected KL")
    render = commands.add_parser(
        "render", help="write the Swarm stack, gateway, image contexts and per-host compose files"
    )
    verify = commands.add_parser(
        "verify",
        help="verify every replica and the shared endpoint; replicas of a class must agree with each other",
    )
    for sub in (plan, render, verify):
        sub.add_argument("--inventory", required=True, type=Path, metavar="FLEET_YAML", help="the fleet file")
    for sub in (plan, render):
        sub.add_argument(
            "--allow-mixed",
            action="store_true",
            help="allow classes to serve different quants behind one endpoint",
        )
    plan.add_argument("--json", action="store_true", help="print the fleet plan as JSON")
    plan.set_defaults(run=run_plan)
    render.add_argument("--out", required=True, help="output folder (created, or updated if ours)")
    render.add_argument("--force", action="store_true", help="write into a non-empty folder that is not ours")
    render.set_defaults(run=run_render)
    verify.add_argument(
        "--url",
        help="the shared endpoint (default http://127.0.0.1:<endpoint.port>: the gateway "
        "answers on every node)",
    )
    verify.add_argument("--no-endpoint", action="store_true", help="verify only the replicas")
    verify.add_argument(
        "--no-consistency",
        action="store_true",
        help="skip comparing the replicas of each class with each other (one KL spot-check per replica)",
    )
    verify.add_argument(
        "--api-key-file",
        help="api_tokens.yml of the rendered folder, or a key file (default: $DEPLOY_API_KEY)",
    )
    verify.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for each server to come up",
    )
    add_timeout_option(verify, VERIFY_TIMEOUT_S, "every replica's and the endpoint's checks together")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.add_argument("--junit", help="also write a JUnit XML report here (its folder must exist)")
    verify.set_defaults(run=run_verify)
    parser.set_defaults(run=_no_subcommand)


def _no_subcommand(args: argparse.Namespace) -> int:
    raise BadInput("cluster needs a subcommand: plan, render or verify", "see `deploy cluster --help`")


def _fleet_plan(args: argparse.Namespace) -> Any:
    """Load fleet.yaml and plan every class."""
    from ..cluster.fleet import load_fleet
    from ..cluster.fleet_plan import plan_fleet
    from ..facts.profiles import load_profile

    fleet = load_fleet(args.inventory)
    return plan_fleet(fleet, load_profile(fleet.profile))


def _print_plan(fleet_plan: Any) -> None:
    """One row per node, then the warnings."""
    from rich.table import Table

    from ..output import console, status_console

    out = console()
    if not out.is_terminal:
        out.width = 200  # pipes and logs get whole columns
    table = Table(
        show_edge=False,
        pad_edge=False,
        title=f"fleet {fleet_plan.fleet.name}: {len(fleet_plan.classes)} node class(es)",
    )
    for header in (
        "node",
        "class",
        "GPUs/replica",
        "replicas",
        "quant",
        "context",
        "cache",
        "split",
        "exp. KL",
    ):
        table.add_column(header)
    for node_class in fleet_plan.classes:
        plan = node_class.plan
        for node in node_class.nodes:
            table.add_row(
                node.name,
                node_class.name,
                str(len(plan.per_gpu)),
                str(node.replicas),
                plan.quant,
                str(plan.context),
                plan.cache_mode,
                plan.split,
                f"{plan.expected.kl:.4f}",
            )
    out.print(table)
    for warning in fleet_plan.warnings:
        status_console().print(f"warning: {warning}", markup=False)


def run_plan(args: argparse.Namespace) -> int:
    """Print the fleet plan; mixed quants exit 2 unless --allow-mixed."""
    from ..cluster.fleet_plan import require_uniform
    from ..output import emit_json

    fleet_plan = _fleet_plan(args)
    if args.json:
        emit_json(fleet_plan.to_dict())
    else:
        _print_plan(fleet_plan)
    require_uniform(fleet_plan, args.allow_mixed)
    return EXIT_OK


def run_render(args: argparse.Namespace) -> int:
    """Write the bundle and print the steps that follow (never the key)."""
    from ..cluster.fleet_plan import require_uniform
    from ..cluster.stack import StackOptions, write_stack
    from ..inputs import output_folder
    from ..output import console, status_console

    out = output_folder(args.out)
    fleet_plan = _fleet_plan(args)
    for warning in fleet_plan.warnings:
        status_console().print(f"warning: {warning}", markup=False)
    require_uniform(fleet_plan, args.allow_mixed)
    manifest = write_stack(fleet_plan, out, StackOptions(force=args.force))
    out = console()
    out.print(
        f"rendered {args.out}/stack.yml (stack {manifest['stack']}, endpoint port "
        f"{manifest['endpoint']['port']}, {manifest['endpoint']['mode']} mode); API key in "
        f"{args.out}/api_tokens.yml (0600)",
        markup=False,
    )
    out.print(
        "1. on each node: deploy node-config (daemon.json, runtime, label); on a manager:", markup=False
    )
    for command in manifest["label_commands"]:
        out.print(f"   {command}", markup=False)
    out.print(
        "2. on each node, from a copy of this folder: its class's image (no registry: every node builds) "
        f"and the model into {fleet_plan.fleet.models_dir}/<quant>:",
        markup=False,
    )
    for entry in manifest["classes"]:
        for node in entry["nodes"]:
            build = (
                f"docker build -t {entry['image']} classes/{entry['class']}"
                if entry["built_here"]
                else f"docker pull {entry['image']}"
            )
            out.print(f"   {node}: {build} && deploy fetch-model --out hosts/{node}", markup=False)
    out.print(f"3. from {args.out}: docker stack deploy -c stack.yml {manifest['stack']}", markup=False)
    out.print(
        f"4. deploy cluster verify --inventory {args.inventory} --api-key-file {args.out}/api_tokens.yml",
        markup=False,
    )
    out.print(
        "without Swarm: hosts/<node>/ holds a compose bundle per host (docker compose up -d there)",
        markup=False,
    )
    status_console().print(
        "note: updates start a new replica before stopping an old one (the last healthy replica "
        "never goes down), so each class needs one replica's GPUs free during an update; until "
        "they are, the new task waits as pending and the old one keeps serving",
        markup=False,
    )
    return EXIT_OK


def _engine_or_none() -> Any:
    """A Swarm manager's engine, or None when no engine (or no manager) is reachable: use inventory urls."""
    try:
        from ..deploy.engine import connect

        client = connect()
    except Exception:  # noqa: BLE001 - absent engine is a normal case here (inventory urls)
        return None
    swarm = client.info().get("Swarm") or {}
    return client if swarm.get("ControlAvailable") else None


def run_verify(args: argparse.Namespace) -> int:
    """Every replica and the endpoint: exit 0 all pass, 5 any fails."""
    from ..cluster.verify import report_dict, verify_cluster, write_junit
    from ..inputs import output_file
    from ..output import console, emit_json, mark, status_console
    from ..redact import printable
    from ..verify.client import check_url, read_api_key

    if args.url is not None:
        check_url(args.url, "http://10.0.0.5:5000")
    seconds(args.wait, "--wait", allow_zero=True)
    seconds(args.timeout, "--timeout")
    junit = output_file(args.junit, "--junit") if args.junit is not None else None
    fleet_plan = _fleet_plan(args)
    api_key = read_api_key(args.api_key_file)
    if api_key is None:
        raise BadInput(
            "no API key", "pass --api-key-file <rendered folder>/api_tokens.yml or set DEPLOY_API_KEY"
        )
    url = None if args.no_endpoint else (args.url or f"http://127.0.0.1:{fleet_plan.fleet.port}")
    if not args.json:
        status_console().print(
            f"verifying fleet {fleet_plan.fleet.name} via "
            f"{os.environ.get('DOCKER_HOST') or 'the local engine'} ...",
            markup=False,
        )
    report = verify_cluster(
        fleet_plan,
        url,
        api_key,
        client=_engine_or_none(),
        wait_s=args.wait,
        deadline_s=args.timeout,
        consistency=not args.no_consistency,
    )
    if junit is not None:
        write_junit(report, junit)
    if args.json:
        emit_json(report_dict(report))
    else:
        out = console()
        for problem in report.problems:
            out.print(mark("FAIL", printable(problem, 4000)))
        for target, single in report.targets:
            failed = [f"{c.name}: {c.detail}" for c in single.checks if not c.passed]
            detail = f" -- {'; '.join(failed)}" if failed else ""
            text = printable(f"{target.kind} {target.name} {target.url}{detail}", 4000)
            out.print(mark("PASS" if single.passed else "FAIL", text))
        for result in report.consistency:
            worst = max((p.mean for p in result.pairs), default=0.0)
            summary = (
                f"consistency class {result.class_name}: {len(result.replicas)} replicas, largest pairwise KL "
                f"{worst:.4g}, bound {result.bound:.4g}"
            )
            out.print(mark("PASS" if result.passed else "FAIL", printable(summary, 4000)))
            for name, reason in {**result.named, **result.skipped}.items():
                out.print(f"  {printable(f'{name}: {reason}', 4000)}")
        out.print("all replicas and the endpoint passed" if report.passed else "cluster verification FAILED")
    return EXIT_OK if report.passed else EXIT_VERIFY_FAILED

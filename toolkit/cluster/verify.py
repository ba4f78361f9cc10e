"""`cluster verify`: the single-server verification against every replica and against the shared endpoint, and
the replicas of each class against each other (consistency.py: no reference needed).

Replicas are found through a Swarm manager's engine: each running task of a class's service, at its node's
address and the port Swarm published for it in host mode. Without a manager (or for nodes the engine does not
know), a node's `url` from fleet.yaml is used. A class with fewer running replicas than planned fails, and so does
a replica whose distributions disagree with its class's.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import EnvironmentMissing
from ..facts.runtime import CONTAINER_PORT
from ..render.config import model_folder
from ..verify.limits import VERIFY_TIMEOUT_S
from .consistency import ClassConsistency
from .fleet_plan import FleetPlan, NodeClass
from .stack import GATEWAY_SERVICE


@dataclass(frozen=True)
class Target:
    """One URL to verify and what must be served there."""

    kind: str  # "endpoint" | "replica"
    name: str  # task name (service.slot) or node name, or "endpoint"
    url: str
    class_name: str | None
    node: str | None = None


@dataclass
class ClusterReport:
    """Per-target verify reports plus the problems found before any request (missing replicas)."""

    targets: list[tuple[Target, Any]] = field(default_factory=list)  # (target, VerifyReport)
    problems: list[str] = field(default_factory=list)
    consistency: list[ClassConsistency] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every target passed, nothing was missing, every class's replicas agree."""
        return (
            not self.problems
            and bool(self.targets)
            and all(r.passed for _, r in self.targets)
            and all(c.passed for c in self.consistency)
        )


def _node_address(client: Any, node_id: str, cache: dict[str, str]) -> str:
    """The address other machines reach a node at (its advertise address)."""
    if node_id not in cache:
        node = client.api.inspect_node(node_id)
        address = (node.get("Status") or {}).get("Addr") or ""
        if address in ("", "0.0.0.0"):  # managers may report 0.0.0.0; their manager address is exact
            address = ((node.get("ManagerStatus") or {}).get("Addr") or "").rsplit(":", 1)[0]
        cache[node_id] = address or (node.get("Description") or {}).get("Hostname", "")
    return cache[node_id]


def discover_replicas(client: Any, fleet_plan: FleetPlan) -> tuple[list[Target], list[str]]:
    """Running tasks of each class's service as URLs, and a problem line per class short of replicas."""
    import docker

    stack = fleet_plan.fleet.name
    targets: list[Target] = []
    problems: list[str] = []
    nodes: dict[str, str] = {}
    for node_class in fleet_plan.classes:
        service_name = f"{stack}_{node_class.service}"
        try:
            service = client.api.inspect_service(service_name)
        except docker.errors.NotFound:
            problems.append(
                f"service {service_name} is not deployed (docker stack deploy -c stack.yml {stack})"
            )
            continue
        tasks = client.api.tasks(filters={"service": service["ID"], "desired-state": "running"})
        running = [t for t in tasks if (t.get("Status") or {}).get("State") == "running"]
        if len(running) < node_class.replicas:
            states = sorted(
                f"{(t.get('Status') or {}).get('State')}: {(t.get('Status') or {}).get('Err') or ''}".rstrip(
                    ": "
                )
                for t in tasks
                if t not in running
            )
            problems.append(
                f"{service_name}: {len(running)}/{node_class.replicas} replicas running"
                + (f" ({'; '.join(states)})" if states else "")
            )
        for task in sorted(running, key=lambda t: t.get("Slot") or 0):
            ports = ((task.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []
            port = next(
                (
                    p.get("PublishedPort")
                    for p in ports
                    if p.get("TargetPort") == CONTAINER_PORT and p.get("PublishMode") == "host"
                ),
                None,
            )
            name = f"{service_name}.{task.get('Slot')}"
            if not port:
                problems.append(
                    f"{name}: no host-mode port published for {CONTAINER_PORT} (re-render the stack)"
                )
                continue
            address = _node_address(client, task["NodeID"], nodes)
            host = f"[{address}]" if ":" in address else address
            targets.append(Target("replica", name, f"http://{host}:{port}", node_class.name, node=address))
    return targets, problems


def inventory_replicas(fleet_plan: FleetPlan) -> tuple[list[Target], list[str]]:
    """Replicas from fleet.yaml's per-node urls (no engine access)."""
    targets, problems = [], []
    for node_class in fleet_plan.classes:
        for node in node_class.nodes:
            if node.url:
                targets.append(Target("replica", node.name, node.url, node_class.name, node=node.name))
            else:
                problems.append(
                    f"node {node.name} has no url in the inventory and no Swarm manager was reached"
                )
    return targets, problems


def expectations_for(fleet_plan: FleetPlan, node_class: NodeClass | None) -> Any:
    """What a target must serve: its class's model, cache mode and context; the endpoint: what all share."""
    from ..verify.readiness import Expectations

    if node_class is None:
        plans = [c.plan for c in fleet_plan.classes]
        same = len({(model_folder(p), p.cache_mode) for p in plans}) == 1
        first = plans[0]
        return Expectations(
            model_id=model_folder(first) if same else None,
            cache_mode=first.cache_mode if same else None,
            context=first.context if len({p.context for p in plans}) == 1 else None,
        )
    plan = node_class.plan
    return Expectations(model_id=model_folder(plan), cache_mode=plan.cache_mode, context=plan.context)


def verify_cluster(
    fleet_plan: FleetPlan,
    endpoint_url: str | None,
    api_key: str | None,
    *,
    client: Any = None,
    wait_s: float = 0.0,
    timeout_s: float = 60.0,
    consistency: bool = True,
    deadline_s: float = VERIFY_TIMEOUT_S,
) -> ClusterReport:
    """Discover replicas (engine, else inventory urls), then run the single-server checks on each and on the
    endpoint, then compare the replicas of each class with each other (unless consistency is False); all of it
    ends by one overall deadline (deadline_s after the start, plus each wait)."""
    from ..verify.checks import VerifyRequest, run_verify

    deadline = time.monotonic() + deadline_s
    report = ClusterReport()
    if client is not None:
        targets, problems = discover_replicas(client, fleet_plan)
    else:
        targets, problems = inventory_replicas(fleet_plan)
        if not targets:
            raise EnvironmentMissing(
                "no Swarm manager reachable and no node has a url in the inventory",
                "run on a manager (or set DOCKER_HOST), or add url: to each node",
            )
    report.problems.extend(problems)
    if endpoint_url:
        targets.append(Target("endpoint", GATEWAY_SERVICE, endpoint_url, None))
    by_name = {c.name: c for c in fleet_plan.classes}
    for target in targets:
        node_class = by_name.get(target.class_name) if target.class_name else None
        request = VerifyRequest(
            url=target.url,
            api_key=api_key,
            expect=expectations_for(fleet_plan, node_class),
            profile=fleet_plan.fleet.profile,
            wait_s=wait_s,
            timeout_s=timeout_s,
            deadline_s=max(0.0, deadline - time.monotonic()),
        )
        report.targets.append((target, run_verify(request)))
        deadline += wait_s
    if consistency:
        for node_class in fleet_plan.classes:
            replicas = [
                t for t, _ in report.targets if t.kind == "replica" and t.class_name == node_class.name
            ]
            if len(replicas) >= 2:
                report.consistency.append(
                    class_consistency(node_class, replicas, api_key, timeout_s, deadline)
                )
    return report


def class_consistency(
    node_class: NodeClass,
    replicas: list[Target],
    api_key: str | None,
    timeout_s: float,
    deadline: float | None = None,
) -> ClassConsistency:
    """Sample every replica of the class at the shipped prompts' positions and compare them pairwise."""
    from ..verify.checks import serving_path_threshold
    from ..verify.reference import load_prompts
    from .consistency import compare, sample_replicas

    bound, source = serving_path_threshold(node_class.plan.cache_mode, node_class.plan.split)
    samples = sample_replicas(
        [(t.name, t.url) for t in replicas], api_key, load_prompts(), timeout_s=timeout_s, deadline=deadline
    )
    return compare(node_class.name, samples, bound, source)


def report_dict(report: ClusterReport) -> dict[str, Any]:
    """The --json object: passed, problems, and each target's single-server report."""
    from ..verify.report import report_dict as single

    return {
        "passed": report.passed,
        "problems": report.problems,
        "consistency": [c.as_dict() for c in report.consistency],
        "targets": [
            {
                "kind": t.kind,
                "name": t.name,
                "url": t.url,
                "class": t.class_name,
                "node": t.node,
                "report": single(r),
            }
            for t, r in report.targets
        ],
    }


def write_junit(report: ClusterReport, path: Path) -> None:
    """One JUnit document: a testsuite per target (the single-server report's), plus one for missing replicas."""
    from ..verify.report import junit_document, junit_suite

    root = ET.Element("testsuites", name="deploy cluster verify")
    for target, single in report.targets:
        root.append(junit_suite(single, f"deploy cluster verify {target.kind} {target.name}"))
    for result in report.consistency:
        root.append(_consistency_suite(result))
    suite = ET.SubElement(
        root,
        "testsuite",
        name="deploy cluster verify replicas",
        tests="1",
        failures=str(int(bool(report.problems))),
        errors="0",
        skipped="0",
    )
    case = ET.SubElement(suite, "testcase", classname="deploy.cluster", name="replicas")
    if report.problems:
        ET.SubElement(
            case, "failure", message="; ".join(report.problems), type="VerificationFailed"
        ).text = "\n".join(report.problems)
    write_text(path, junit_document(root))


def _consistency_suite(result: ClassConsistency) -> ET.Element:
    """A testsuite per class: a testcase per replica, failed with the reason when it is named."""
    suite = ET.Element(
        "testsuite",
        name=f"deploy cluster verify consistency {result.class_name}",
        tests=str(len(result.replicas)),
        failures=str(len(result.named)),
        errors="0",
        skipped=str(len(result.skipped)),
    )
    for name in result.replicas:
        case = ET.SubElement(suite, "testcase", classname="deploy.cluster.consistency", name=name)
        if name in result.named:
            ET.SubElement(
                case, "failure", message=result.named[name], type="VerificationFailed"
            ).text = result.named[name]
        elif name in result.skipped:
            ET.SubElement(case, "skipped", message=result.skipped[name])
    return suite

"""Fleet plan: nodes with identical GPUs form a class, each class gets one plan, and one endpoint stays uniform.

Rules (pure; no I/O):
- A node class is the ordered list of (GPU name, total MiB) of a node. Its name (a Swarm label value and part of
  the service name) is derived from that list, e.g. `8x24gib` or `2xnvidia-h200`, so `deploy node-config` on the
  node itself computes the same label from NVML.
- A class is planned on its GPUs with, per GPU position, the least free memory any of its nodes reported: the plan
  fits every node of the class.
- One endpoint serves every replica, so every replica must accept the same requests: when classes reach different
  maximum contexts (no context was required), each class is re-planned with its quant and cache mode kept and the
  context set to the smallest one.
- Different quants behind one endpoint give users different answers to the same request: that is an error (exit 2,
  bad input: the fleet as described cannot serve one model) unless --allow-mixed. The error suggests the
  lowest-KL quant that fits every class (set it as requirements.quant).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Any

from ..detect.inventory import Gpu, GpuInventory
from ..errors import BadInput, NoFit
from ..facts.profiles import ModelProfile
from ..plan.plan import Plan, PlanRequest
from ..plan.planner import make_plan
from .fleet import Fleet, FleetNode

CLASS_LABEL = "glm-deploy.class"
MAX_CLASS_NAME = 40


@dataclass(frozen=True)
class NodeClass:
    """Nodes with identical GPUs, the inventory they are planned on, and their plan."""

    name: str
    nodes: tuple[FleetNode, ...]
    inventory: GpuInventory
    plan: Plan

    @property
    def replicas(self) -> int:
        """Replicas of the class's service: the sum over its nodes."""
        return sum(node.replicas for node in self.nodes)

    @property
    def service(self) -> str:
        """The Swarm service name inside the stack (the stack prefixes it with `<stack>_`)."""
        return f"tabby-{self.name}"


@dataclass(frozen=True)
class FleetPlan:
    """Every class's plan, and what the fleet would look like behind its one endpoint."""

    fleet: Fleet
    classes: tuple[NodeClass, ...]
    warnings: tuple[str, ...]
    suggested_quant: str | None

    @property
    def mixed(self) -> bool:
        """True when classes would serve different quants."""
        return len({c.plan.quant for c in self.classes}) > 1

    def class_of(self, node_name: str) -> NodeClass:
        """The class a node belongs to."""
        return next(c for c in self.classes if any(n.name == node_name for n in c.nodes))

    def to_dict(self) -> dict[str, Any]:
        """The `deploy cluster plan --json` object."""
        return {
            "stack": self.fleet.name,
            "profile": self.fleet.profile,
            "mixed": self.mixed,
            "warnings": list(self.warnings),
            "suggested_quant": self.suggested_quant,
            "endpoint": {"port": self.fleet.port, "bind": self.fleet.bind},
            "nodes": [
                {
                    "name": node.name,
                    "class": c.name,
                    "quant": c.plan.quant,
                    "context": c.plan.context,
                    "cache_mode": c.plan.cache_mode,
                    "split": c.plan.split,
                    "gpus": len(c.plan.per_gpu),
                    "expected_kl": c.plan.expected.kl,
                    "replicas": node.replicas,
                }
                for c in self.classes
                for node in c.nodes
            ],
            "classes": [
                {
                    "class": c.name,
                    "service": c.service,
                    "nodes": [n.name for n in c.nodes],
                    "replicas": c.replicas,
                    "gpus_per_replica": len(c.plan.per_gpu),
                    "plan": c.plan.to_dict(),
                }
                for c in self.classes
            ],
        }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def class_key(inventory: GpuInventory) -> tuple[tuple[str, int], ...]:
    """What makes two nodes the same class: each GPU's (normalized name, total MiB), in index order."""
    return tuple((_slug(g.name), g.total_mib) for g in sorted(inventory.gpus, key=lambda g: g.index))


def class_name(inventory: GpuInventory) -> str:
    """A label-safe name for the class: runs of identical GPUs as `<count>x<name>`, joined by '-'."""
    runs: list[list[Any]] = []
    for name, total in class_key(inventory):
        if runs and runs[-1][1:] == [name, total]:
            runs[-1][0] += 1
        else:
            runs.append([1, name, total])
    names = {name for _, name, _ in runs}
    # The same name with two sizes (e.g. two "24gib"-named specs cannot differ, but NVML names can): add MiB.
    ambiguous = len(names) < len(runs)
    text = "-".join(f"{count}x{name}" + (f"-{total}mib" if ambiguous else "") for count, name, total in runs)
    if len(text) > MAX_CLASS_NAME:
        digest = hashlib.sha256(repr(class_key(inventory)).encode()).hexdigest()[:8]
        text = f"{text[: MAX_CLASS_NAME - 9].rstrip('-')}-{digest}"
    return text


def _version(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(p) for p in text.split("."))


def class_inventory(nodes: tuple[FleetNode, ...]) -> GpuInventory:
    """The GPUs a class is planned on: per position the least free memory of any node; the oldest driver."""
    first = sorted(nodes[0].inventory.gpus, key=lambda g: g.index)
    gpus = []
    for position, gpu in enumerate(first):
        peers = [sorted(n.inventory.gpus, key=lambda g: g.index)[position] for n in nodes]
        capabilities = {p.compute_capability for p in peers}
        gpus.append(
            Gpu(
                index=position,
                name=gpu.name,
                total_mib=gpu.total_mib,
                free_mib=min(p.free_mib for p in peers),
                used_mib=max(p.used_mib for p in peers),
                compute_capability=capabilities.pop() if len(capabilities) == 1 else None,
            )
        )
    cudas = [n.inventory.cuda_driver_version for n in nodes]
    cuda = None if None in cudas else min(cudas, key=_version)  # type: ignore[arg-type]
    drivers = [n.inventory.driver_version for n in nodes]
    driver = None if None in drivers else min(drivers, key=_version)  # type: ignore[arg-type]
    return GpuInventory(
        gpus=tuple(gpus),
        source="fleet",
        driver_version=driver,
        cuda_driver_version=cuda,
        extra={"nodes": [n.name for n in nodes]},
    )


def group_nodes(fleet: Fleet) -> list[tuple[str, tuple[FleetNode, ...]]]:
    """Nodes grouped by class, in the order classes first appear in fleet.yaml."""
    groups: dict[tuple[tuple[str, int], ...], list[FleetNode]] = {}
    for node in fleet.nodes:
        groups.setdefault(class_key(node.inventory), []).append(node)
    named = [(class_name(nodes[0].inventory), tuple(nodes)) for nodes in groups.values()]
    if len({name for name, _ in named}) < len(named):  # hashed long names collide only by accident
        named = [(f"{name[: MAX_CLASS_NAME - 3]}-c{i}", nodes) for i, (name, nodes) in enumerate(named)]
    return named


def _plan_class(
    profile: ModelProfile,
    name: str,
    nodes: tuple[FleetNode, ...],
    inventory: GpuInventory,
    request: PlanRequest,
) -> Plan:
    """make_plan for one class; errors name the class and its nodes."""
    try:
        return make_plan(profile, inventory, request)
    except (NoFit, BadInput) as exc:
        who = ", ".join(n.name for n in nodes)
        raise type(exc)(f"node class {name} ({who}): {exc.message}", exc.hint) from None


def plan_fleet(fleet: Fleet, profile: ModelProfile) -> FleetPlan:
    """Plan every class, align contexts, and note (not refuse) mixed quants and cache modes."""
    classes = []
    for name, nodes in group_nodes(fleet):
        inventory = class_inventory(nodes)
        classes.append(
            NodeClass(name, nodes, inventory, _plan_class(profile, name, nodes, inventory, fleet.request))
        )
    contexts = {c.plan.context for c in classes}
    warnings: list[str] = []
    if len(contexts) > 1:
        context = min(contexts)
        warnings.append(
            f"classes reach different contexts ({', '.join(f'{c.name} {c.plan.context}' for c in classes)}"
            f"); every replica is configured for {context} so that one endpoint accepts the same "
            "requests everywhere (require more with requirements.context)"
        )
        classes = [
            replace(
                c,
                plan=_plan_class(
                    profile,
                    c.name,
                    c.nodes,
                    c.inventory,
                    PlanRequest(
                        context=context,
                        cache=c.plan.cache_mode,
                        quant=c.plan.quant,
                        split=c.plan.split,
                        headroom_mib=fleet.request.headroom_mib,
                    ),
                ),
            )
            for c in classes
        ]
    modes = {c.plan.cache_mode for c in classes}
    if len(modes) > 1:
        warnings.append(
            "classes use different KV-cache modes ("
            + ", ".join(f"{c.name} {c.plan.cache_mode}" for c in classes)
            + "): answers can differ slightly between replicas (fix requirements.cache to align them)"
        )
    suggestion = None
    quants = {c.plan.quant for c in classes}
    if len(quants) > 1:
        suggestion = common_quant(fleet, profile, classes)
        warnings.append(
            "classes would serve different quants behind one endpoint ("
            + ", ".join(f"{c.name} {c.plan.quant} KL {c.plan.expected.kl:.3f}" for c in classes)
            + "): the same request gets different answers depending on the replica"
        )
    return FleetPlan(
        fleet=fleet, classes=tuple(classes), warnings=tuple(warnings), suggested_quant=suggestion
    )


def common_quant(fleet: Fleet, profile: ModelProfile, classes: list[NodeClass]) -> str | None:
    """The lowest-KL quant that fits every class at the required context, if any."""
    for quant in sorted(profile.quants, key=lambda q: q.kl_ref_quant):
        request = replace(fleet.request, quant=quant.branch)
        try:
            for c in classes:
                make_plan(profile, c.inventory, request)
        except (NoFit, BadInput):
            continue
        return quant.branch
    return None


def require_uniform(fleet_plan: FleetPlan, allow_mixed: bool) -> None:
    """Refuse (exit 2) a fleet whose replicas would serve different quants, unless the user allowed it."""
    if fleet_plan.mixed and not allow_mixed:
        quants = ", ".join(f"{c.name}: {c.plan.quant}" for c in fleet_plan.classes)
        hint = (
            f"set requirements.quant: {fleet_plan.suggested_quant} (the lowest-KL quant every class fits)"
            if fleet_plan.suggested_quant
            else "group nodes with similar GPUs into separate fleets"
        )
        raise BadInput(
            f"node classes would serve different quants behind one endpoint ({quants})",
            hint + ", or pass --allow-mixed",
        )

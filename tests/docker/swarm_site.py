"""The Swarm fleet scenario shared by tests/docker/test_swarm.py and benchmarks/swarm_rollout: a namespaced
two-node Swarm (tests/docker/swarm_engine.py) running a rendered stack of the TabbyAPI test server, and the
rolling update of a plan change measured with a client polling the one endpoint throughout.

The fleet has two node classes that serve the same quant behind the one endpoint:
- the manager, "1x400GiB" per replica, 2 replicas, advertising 3 GPUs (one stays free: start-first updates fit,
  and a claim of 2 more is refused while a claim of 1 is placed);
- the worker, "2x200GiB" per replica, 1 replica, advertising 4 GPUs (room for its start-first update).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import yaml

from tests.docker.swarm_engine import SwarmCluster, build_gateway_image, prerequisites_problem
from tests.tabby_test_server.image import build_test_server_image
from toolkit.cluster.fleet import load_fleet
from toolkit.cluster.fleet_plan import FleetPlan, plan_fleet
from toolkit.cluster.stack import StackOptions, label_commands, write_stack
from toolkit.facts.profiles import load_profile

STACK = "glmdt"
PORT = 5000
MANAGER_GPUS = ["GPU-fake-uuid-0", "GPU-fake-uuid-1", "GPU-fake-uuid-2"]
WORKER_GPUS = ["GPU-fake-w-0", "GPU-fake-w-1", "GPU-fake-w-2", "GPU-fake-w-3"]
# Test cadence (production defaults are 15 s checks and a 60 s monitor); the engines here may not raise
# RLIMIT_MEMLOCK/NOFILE (no CAP_SYS_RESOURCE), so the stack's ulimits are left out.
HEALTH_INTERVAL_S = 2
MONITOR_S = 5
FULL_CONTEXT = 202752
ROLLED_CONTEXT = 65536


class SwarmUnavailable(Exception):
    """This machine cannot run the namespaced Swarm (not root, a tool missing, the engines did not form one)."""


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, diagnose: Callable[[], str] = lambda: ""
):
    """Poll predicate until truthy and return its value; TimeoutError with a diagnosis when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(1)


class Site:
    """The namespaced Swarm, the images loaded into it, and the rendered fleet folder."""

    def __init__(self, cluster: SwarmCluster, root: Path, images: dict[str, str]) -> None:
        self.cluster = cluster
        self.manager = cluster.manager
        self.root = root
        self.images = images
        self.client = self.manager.client()
        self.models = root / "models"
        self.fleet_path = root / "fleet.yaml"
        self.out = root / "out"
        self.endpoint = f"http://{self.manager.address}:{PORT}"

    def write_fleet(self, context: int | None = None) -> None:
        requirements = f"requirements: {{context: {context}}}\n" if context else ""
        manager, worker = self.cluster.nodes
        self.fleet_path.write_text(
            f"name: {STACK}\nmodels_dir: {self.models}\nendpoint: {{port: {PORT}}}\nnodes:\n"
            f"  - {{name: {manager.name}, gpus: 1x400GiB, replicas: 2}}\n"
            f"  - {{name: {worker.name}, gpus: 2x200GiB}}\n{requirements}",
            encoding="utf-8",
        )

    def fleet_plan(self) -> FleetPlan:
        return plan_fleet(load_fleet(self.fleet_path), load_profile("glm-4.7"))

    def render_and_deploy(self) -> None:
        """The user's path: plan, render, label the nodes with the printed commands, docker stack deploy."""
        fleet_plan = self.fleet_plan()
        write_stack(
            fleet_plan,
            self.out,
            StackOptions(
                image=self.images["tabby"],
                gateway_image=self.images["gateway"],
                health_interval_s=HEALTH_INTERVAL_S,
                monitor_s=MONITOR_S,
                ulimits=False,
            ),
        )
        for quant in {c.plan.quant for c in fleet_plan.classes}:
            (self.models / quant).mkdir(parents=True, exist_ok=True)
        for command in label_commands(fleet_plan):
            self.manager.cli(*command.split()[1:])
        self.manager.cli(
            "stack", "deploy", "--resolve-image", "never", "-c", str(self.out / "stack.yml"), STACK
        )

    @property
    def api_key(self) -> str:
        return yaml.safe_load((self.out / "api_tokens.yml").read_text())["api_key"]

    def services(self) -> dict[str, int]:
        """{swarm service name: planned replicas} of the TabbyAPI classes."""
        return {f"{STACK}_{c.service}": c.replicas for c in self.fleet_plan().classes}

    def running_tasks(self, service: str) -> list[dict]:
        return [
            t
            for t in self.client.api.tasks(filters={"service": service, "desired-state": "running"})
            if t["Status"]["State"] == "running"
        ]

    def node_name(self, node_id: str) -> str:
        return self.client.api.inspect_node(node_id)["Description"]["Hostname"]

    def container(self, task: dict):
        """A task's container, through the engine of the node it runs on."""
        engine = next(n for n in self.cluster.nodes if n.name == self.node_name(task["NodeID"]))
        return engine.client().containers.get(task["Status"]["ContainerStatus"]["ContainerID"])

    def diagnose(self) -> str:
        ps = self.manager.cli(
            "service",
            "ps",
            "--no-trunc",
            "--format",
            "{{.Name}} {{.Node}} {{.CurrentState}} {{.Error}}",
            *self.services(),
            f"{STACK}_gateway",
            check=False,
        )
        return (
            f"service ps:\n{ps.stdout}{ps.stderr}\nmanager dockerd log tail:\n{self.manager.log_tail(2000)}"
        )

    def model(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.endpoint}/v1/model", headers={"X-API-Key": self.api_key}, timeout=5)
        except httpx.HTTPError:
            return None

    def converged(self, context: int) -> bool:
        """Every class at its replica count with no update in flight, and the endpoint serving the context."""
        for service, replicas in self.services().items():
            if len(self.running_tasks(service)) != replicas:
                return False
            if (self.client.api.inspect_service(service).get("UpdateStatus") or {}).get("State") not in (
                None,
                "completed",
            ):
                return False
        response = self.model()
        return (
            response is not None
            and response.status_code == 200
            and response.json()["parameters"]["max_seq_len"] == context
        )


@contextlib.contextmanager
def swarm_site(client: Any, base_image: str, tools_image: str, root: Path) -> Iterator[Site]:
    """Images built on the shared engine (uniquely named), copied into a fresh namespaced Swarm, the fleet rendered
    and deployed and converged at the full context; everything is removed afterwards."""
    problem = prerequisites_problem()
    if problem:
        raise SwarmUnavailable(problem)
    token = secrets.token_hex(4)
    images = {"tabby": f"glmdt-swarm-tabby:{token}", "gateway": f"glmdt-swarm-gateway:{token}"}
    cluster = SwarmCluster([MANAGER_GPUS, WORKER_GPUS])
    try:
        (root / "tabby-image").mkdir(parents=True, exist_ok=True)
        build_test_server_image(client, images["tabby"], base_image, root / "tabby-image")
        build_gateway_image(client, images["gateway"], tools_image)
        try:
            cluster.start()
        except Exception as error:  # any failure: no Swarm here
            raise SwarmUnavailable(f"the namespaced test dockerds could not form a Swarm: {error}") from error
        for image in images.values():
            cluster.load_image(image)
        site = Site(cluster, root, images)
        site.write_fleet()
        site.render_and_deploy()
        wait_for(lambda: site.converged(FULL_CONTEXT), 180, "every replica and the endpoint", site.diagnose)
        yield site
    finally:
        cluster.stop()
        for image in images.values():
            with contextlib.suppress(docker.errors.ImageNotFound):  # the build may have failed before tagging
                client.images.remove(image, force=True)


@dataclass
class Rollout:
    """What a client polling the endpoint saw during one rolling update."""

    replicas: int  # replicas replaced
    ok: int = 0  # probe + one-token completion pairs that succeeded
    failed: list[str] = field(default_factory=list)
    contexts: set[int] = field(default_factory=set)  # max_seq_len values the endpoint reported
    converged_s: float = 0.0  # from `docker stack deploy` of the new plan to every class converged on it
    window_s: float = 0.0  # the whole polling window (20 requests before the deploy, 20 after convergence)
    replaced_all: bool = False


def roll_out(site: Site, context: int, timeout_s: float = 240) -> Rollout:
    """Re-plan the fleet for `context`, deploy it and poll the endpoint until every replica serves it."""
    key = site.api_key
    old_tasks = {t["ID"] for service in site.services() for t in site.running_tasks(service)}
    result = Rollout(replicas=len(old_tasks))
    stop = threading.Event()

    def poll() -> None:
        """Alternate the readiness probe and a real (one-token) completion, as clients would."""
        with httpx.Client(timeout=10, headers={"X-API-Key": key}) as client:
            while not stop.is_set():
                try:
                    response = client.get(f"{site.endpoint}/v1/model")
                    if response.status_code == 200:
                        result.contexts.add(response.json()["parameters"]["max_seq_len"])
                        response = client.post(
                            f"{site.endpoint}/v1/completions",
                            json={"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0},
                        )
                    if response.status_code == 200:
                        result.ok += 1
                    else:
                        result.failed.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as error:
                    result.failed.append(f"{type(error).__name__}: {error}")
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.monotonic()
    try:
        wait_for(lambda: result.ok >= 20, 60, "the client to get going", site.diagnose)
        site.write_fleet(context=context)
        deployed = time.monotonic()
        site.render_and_deploy()
        wait_for(lambda: site.converged(context), timeout_s, "the rolling update to complete", site.diagnose)
        result.converged_s = time.monotonic() - deployed
        served = result.ok
        wait_for(lambda: result.ok >= served + 20, 60, "requests after the update", site.diagnose)
    finally:
        stop.set()
        poller.join(timeout=30)
        result.window_s = time.monotonic() - started
    new_tasks = {t["ID"] for service in site.services() for t in site.running_tasks(service)}
    result.replaced_all = not old_tasks & new_tasks
    return result

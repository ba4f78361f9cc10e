"""Fleets on a real Swarm: a rendered stack of the TabbyAPI test server, deployed with `docker stack deploy`.

The Swarm is two throw-away dockerds, each in its own network namespace (tests/docker/swarm_engine.py), that
advertise fake GPUs as generic resources; the shared engine is never made a Swarm. The fleet has two node classes
that serve the same quant behind the one endpoint:
- the manager, "1x400GiB" per replica, 2 replicas, advertising 3 GPUs (one stays free: start-first updates fit,
  and a claim of 2 more is refused while a claim of 1 is placed);
- the worker, "2x200GiB" per replica, 1 replica, advertising 4 GPUs (room for its start-first update).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from pathlib import Path

import docker
import httpx
import pytest
import yaml

from tests.conftest import REQUIRE_DOCKER
from tests.docker.swarm_engine import SwarmCluster, build_gateway_image, prerequisites_problem
from tests.tabby_test_server.image import build_test_server_image
from toolkit.cli import main
from toolkit.cluster.fleet import load_fleet
from toolkit.cluster.fleet_plan import FleetPlan, plan_fleet
from toolkit.cluster.stack import StackOptions, label_commands, write_stack
from toolkit.facts.profiles import load_profile

pytestmark = pytest.mark.docker

STACK = "glmdt"
PORT = 5000
MANAGER_GPUS = ["GPU-fake-uuid-0", "GPU-fake-uuid-1", "GPU-fake-uuid-2"]
WORKER_GPUS = ["GPU-fake-w-0", "GPU-fake-w-1", "GPU-fake-w-2", "GPU-fake-w-3"]
# Test cadence (production defaults are 15 s checks and a 60 s monitor); the engines here may not raise
# RLIMIT_MEMLOCK/NOFILE (no CAP_SYS_RESOURCE), so the stack's ulimits are left out.
HEALTH_INTERVAL_S = 2
MONITOR_S = 5
FULL_CONTEXT = 202752


def _unavailable(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"GLM_DEPLOY_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def _wait(predicate, timeout_s: float, what: str, diagnose=lambda: ""):
    """Poll predicate until truthy; fail with a diagnosis when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{diagnose()}")
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

    def cluster_verify(self, monkeypatch, capsys) -> dict:
        """`deploy cluster verify --json` through the CLI, with DOCKER_HOST at the Swarm manager."""
        monkeypatch.setenv("DOCKER_HOST", self.manager.docker_host)
        code = main(
            [
                "cluster",
                "verify",
                "--inventory",
                str(self.fleet_path),
                "--url",
                self.endpoint,
                "--api-key-file",
                str(self.out / "api_tokens.yml"),
                "--json",
                "--wait",
                "30",
            ]
        )
        data = json.loads(capsys.readouterr().out)
        assert code == (0 if data["passed"] else 5)
        return data


@pytest.fixture(scope="module")
def site(docker_client, test_base_image, tmp_path_factory):
    """Images built on the shared engine, copied into the namespaced Swarm, the fleet rendered and deployed."""
    problem = prerequisites_problem()
    if problem:
        _unavailable(problem)
    token = secrets.token_hex(4)
    images = {"tabby": f"glmdt-swarm-tabby:{token}", "gateway": f"glmdt-swarm-gateway:{token}"}
    cluster = SwarmCluster([MANAGER_GPUS, WORKER_GPUS])
    try:
        build_test_server_image(docker_client, images["tabby"], test_base_image)
        try:
            build_gateway_image(docker_client, images["gateway"], test_base_image)
        except docker.errors.BuildError as error:
            _unavailable(f"the HAProxy gateway image needs Debian's haproxy package: {error}")
        try:
            cluster.start()
        except (RuntimeError, OSError, Exception) as error:  # noqa: BLE001 - any failure: no Swarm here
            _unavailable(f"the namespaced test dockerds could not form a Swarm: {error}")
        for image in images.values():
            cluster.load_image(image)
        site = Site(cluster, tmp_path_factory.mktemp("swarm"), images)
        site.write_fleet()
        site.render_and_deploy()
        _wait(lambda: site.converged(FULL_CONTEXT), 180, "every replica and the endpoint", site.diagnose)
        yield site
    finally:
        cluster.stop()
        for image in images.values():
            with contextlib.suppress(docker.errors.ImageNotFound):  # the build may have failed before tagging
                docker_client.images.remove(image, force=True)


def _gpu_claims(task: dict) -> list[str]:
    return [
        r["NamedResourceSpec"]["Value"]
        for r in task.get("GenericResources") or []
        if r["NamedResourceSpec"]["Kind"] == "NVIDIA-GPU"
    ]


def test_classes_land_on_their_nodes_with_their_gpus_and_cluster_verify_passes(site, monkeypatch, capsys):
    fleet_plan = site.fleet_plan()
    for node_class in fleet_plan.classes:
        (node,) = node_class.nodes
        advertised = MANAGER_GPUS if node.name == site.manager.name else WORKER_GPUS
        claimed: list[str] = []
        for task in site.running_tasks(f"{STACK}_{node_class.service}"):
            assert site.node_name(task["NodeID"]) == node.name  # placement by the class label
            gpus = _gpu_claims(task)
            assert len(gpus) == len(node_class.plan.per_gpu) and set(gpus) <= set(advertised)
            claimed += gpus
            # What the NVIDIA runtime reads (swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU").
            env = dict(e.split("=", 1) for e in site.container(task).attrs["Config"]["Env"])
            assert set(env["DOCKER_RESOURCE_NVIDIA-GPU"].split(",")) == set(gpus)
        assert len(claimed) == len(set(claimed)) == node_class.replicas * len(node_class.plan.per_gpu)
    data = site.cluster_verify(monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]
    replicas = [t for t in data["targets"] if t["kind"] == "replica"]
    assert sorted(t["class"] for t in replicas) == ["1x400gib", "1x400gib", "2x200gib"]
    assert len({t["url"] for t in replicas}) == 3
    assert {t["node"] for t in replicas} == {n.address for n in site.cluster.nodes}
    assert [t["kind"] for t in data["targets"]].count("endpoint") == 1
    assert {t["report"]["model"]["id"] for t in data["targets"]} == {"8bpw_H8"}
    assert httpx.get(f"{site.endpoint}/v1/model", timeout=5).status_code == 401  # the key is required


def test_a_killed_replica_is_restored_and_the_endpoint_stays_up(site, monkeypatch, capsys):
    # The worker's class has one replica: while Swarm replaces it, the manager's class serves the endpoint.
    service = f"{STACK}_{site.fleet_plan().classes[1].service}"
    (victim,) = site.running_tasks(service)
    site.container(victim).kill()
    for _ in range(20):  # requests that would have gone to the dead replica are retried on another one
        response = httpx.get(f"{site.endpoint}/v1/model", headers={"X-API-Key": site.api_key}, timeout=10)
        assert response.status_code == 200
        time.sleep(0.1)

    def restored() -> bool:
        running = site.running_tasks(service)
        return len(running) == 1 and running[0]["ID"] != victim["ID"]

    _wait(restored, 120, "Swarm to replace the killed replica", site.diagnose)
    data = site.cluster_verify(monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]


def test_cluster_verify_fails_while_a_class_is_short_of_replicas(site, monkeypatch, capsys):
    service = f"{STACK}_{site.fleet_plan().classes[1].service}"
    site.manager.cli("service", "scale", "--detach", f"{service}=0")
    try:
        _wait(lambda: not site.running_tasks(service), 60, "the class to scale to 0", site.diagnose)
        data = site.cluster_verify(monkeypatch, capsys)
        assert not data["passed"]
        assert data["problems"] == [f"{service}: 0/1 replicas running"]
        assert all(t["report"]["passed"] for t in data["targets"])  # the rest still serves
    finally:
        site.manager.cli("service", "scale", "--detach", f"{service}=1")
    _wait(lambda: site.converged(FULL_CONTEXT), 120, "the class to come back", site.diagnose)


def _claim(site: Site, gpus: int) -> str:
    name = f"glmdt-claim{gpus}-{secrets.token_hex(3)}"
    site.manager.cli(
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--generic-resource",
        f"NVIDIA-GPU={gpus}",
        "--constraint",
        f"node.hostname=={site.manager.name}",
        "--restart-condition",
        "none",
        site.images["tabby"],
        "--host",
        "127.0.0.1",
    )
    return name


def test_generic_resource_claims_place_or_refuse_services(site):
    # The stack holds 2 of the manager's 3 GPUs: a claim of 2 there cannot be placed, a claim of 1 can.
    too_many, fits = _claim(site, 2), _claim(site, 1)
    try:

        def state(name: str) -> tuple[str, str]:
            tasks = site.client.api.tasks(filters={"service": name})
            return (tasks[0]["Status"]["State"], tasks[0]["Status"].get("Err", "")) if tasks else ("", "")

        _wait(lambda: state(fits)[0] == "running", 60, "the 1-GPU claim to run", site.diagnose)
        _wait(
            lambda: "insufficient resources" in state(too_many)[1],
            60,
            "the 2-GPU claim to be refused",
            site.diagnose,
        )
        time.sleep(3)  # a negative check: still pending a while after the refusal (nothing to poll for)
        assert state(too_many)[0] == "pending"
        (claimed,) = _gpu_claims(site.client.api.tasks(filters={"service": fits})[0])
        stack_gpus = {
            g
            for t in site.running_tasks(f"{STACK}_{site.fleet_plan().classes[0].service}")
            for g in _gpu_claims(t)
        }
        assert claimed in set(MANAGER_GPUS) - stack_gpus
    finally:
        site.manager.cli("service", "rm", too_many, fits, check=False)
    _wait(
        lambda: (
            not site.manager.client().containers.list(
                filters={"label": f"com.docker.swarm.service.name={fits}"}
            )
        ),
        60,
        "the claim's container to go",
    )


def test_a_plan_change_rolls_out_without_a_failed_request(site, monkeypatch, capsys):
    key = site.api_key
    results = {"ok": 0, "failed": [], "contexts": set()}
    stop = threading.Event()

    def poll() -> None:
        """Alternate the readiness probe and a real (one-token) completion, as clients would."""
        with httpx.Client(timeout=10, headers={"X-API-Key": key}) as client:
            while not stop.is_set():
                try:
                    response = client.get(f"{site.endpoint}/v1/model")
                    if response.status_code == 200:
                        results["contexts"].add(response.json()["parameters"]["max_seq_len"])
                        response = client.post(
                            f"{site.endpoint}/v1/completions",
                            json={"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0},
                        )
                    if response.status_code == 200:
                        results["ok"] += 1
                    else:
                        results["failed"].append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as error:
                    results["failed"].append(f"{type(error).__name__}: {error}")
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.monotonic()
    try:
        _wait(lambda: results["ok"] >= 20, 60, "the client to get going", site.diagnose)
        old_tasks = {t["ID"] for service in site.services() for t in site.running_tasks(service)}
        site.write_fleet(context=65536)
        site.render_and_deploy()
        _wait(lambda: site.converged(65536), 240, "the rolling update to complete", site.diagnose)
        served = results["ok"]
        _wait(lambda: results["ok"] >= served + 20, 60, "requests after the update", site.diagnose)
    finally:
        stop.set()
        poller.join(timeout=30)
    new_tasks = {t["ID"] for service in site.services() for t in site.running_tasks(service)}
    assert not old_tasks & new_tasks, "every replica was replaced"
    assert results["failed"] == [], (
        f"{len(results['failed'])} failed of {results['ok']}: {results['failed'][:5]}"
    )
    assert results["ok"] > 50 and results["contexts"] == {FULL_CONTEXT, 65536}
    seconds = time.monotonic() - started
    data = site.cluster_verify(monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]
    assert {t["report"]["model"]["max_seq_len"] for t in data["targets"]} == {65536}
    print(
        f"\nrolling update of {len(old_tasks)} replicas: {results['ok']} probe+completion pairs, 0 failed, "
        f"{seconds:.0f} s"
    )

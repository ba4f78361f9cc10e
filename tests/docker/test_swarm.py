"""Fleets on a real Swarm: a rendered stack of the TabbyAPI test server, deployed with `docker stack deploy`.

The Swarm is a second, throw-away dockerd in its own network namespace (tests/docker/swarm_engine.py) that
advertises three fake GPUs as generic resources; the shared engine is never made a Swarm. The fleet is one node
with a one-GPU plan and two replicas, so one GPU stays free: enough for start-first updates, and for the
generic-resource test to see a claim of 2 refused and a claim of 1 placed.
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
from tests.docker.swarm_engine import SwarmEngine, build_gateway_image, prerequisites_problem
from tests.tabby_test_server.image import build_test_server_image
from toolkit.cli import main
from toolkit.cluster.fleet import load_fleet
from toolkit.cluster.fleet_plan import plan_fleet
from toolkit.cluster.stack import StackOptions, label_commands, write_stack
from toolkit.profiles import load_profile

pytestmark = pytest.mark.docker

STACK = "glmdt"
PORT = 5000
GPU_IDS = ["GPU-fake-uuid-0", "GPU-fake-uuid-1", "GPU-fake-uuid-2"]
# Test cadence (production defaults are 15 s checks and a 60 s monitor); the engine here may not raise
# RLIMIT_MEMLOCK/NOFILE (no CAP_SYS_RESOURCE), so the stack's ulimits are left out.
HEALTH_INTERVAL_S = 2
MONITOR_S = 5


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

    def __init__(self, engine: SwarmEngine, root: Path, images: dict[str, str]) -> None:
        self.engine = engine
        self.root = root
        self.images = images
        self.client = engine.client()
        self.node = self.client.nodes.list()[0].attrs["Description"]["Hostname"]
        self.models = root / "models"
        self.fleet_path = root / "fleet.yaml"
        self.out = root / "out"
        self.endpoint = f"http://{engine.address}:{PORT}"

    def write_fleet(self, context: int | None = None) -> None:
        requirements = f"requirements: {{context: {context}}}\n" if context else ""
        self.fleet_path.write_text(
            f"name: {STACK}\nmodels_dir: {self.models}\nreplicas: 2\nendpoint: {{port: {PORT}}}\n"
            f"nodes:\n  - name: {self.node}\n    gpus: 1x400GiB\n{requirements}", encoding="utf-8")

    def render_and_deploy(self) -> None:
        """The user's path: plan, render, label the node with the printed commands, docker stack deploy."""
        fleet_plan = plan_fleet(load_fleet(self.fleet_path), load_profile("glm-4.7"))
        write_stack(fleet_plan, self.out, StackOptions(
            image=self.images["tabby"], gateway_image=self.images["gateway"], health_interval_s=HEALTH_INTERVAL_S,
            monitor_s=MONITOR_S, ulimits=False))
        for quant in {c.plan.quant for c in fleet_plan.classes}:
            (self.models / quant).mkdir(parents=True, exist_ok=True)
        for command in label_commands(fleet_plan):
            self.engine.cli(*command.split()[1:])
        self.engine.cli("stack", "deploy", "--resolve-image", "never", "-c", str(self.out / "stack.yml"), STACK)

    @property
    def api_key(self) -> str:
        return yaml.safe_load((self.out / "api_tokens.yml").read_text())["api_key"]

    def service(self) -> str:
        return f"{STACK}_{plan_fleet(load_fleet(self.fleet_path), load_profile('glm-4.7')).classes[0].service}"

    def running_tasks(self, service: str) -> list[dict]:
        return [t for t in self.client.api.tasks(filters={"service": service, "desired-state": "running"})
                if t["Status"]["State"] == "running"]

    def diagnose(self) -> str:
        ps = self.engine.cli("service", "ps", "--no-trunc", "--format", "{{.Name}} {{.CurrentState}} {{.Error}}",
                             self.service(), f"{STACK}_gateway", check=False)
        return f"service ps:\n{ps.stdout}{ps.stderr}\ndockerd log tail:\n{self.engine.log_tail(2000)}"

    def model(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.endpoint}/v1/model", headers={"X-API-Key": self.api_key}, timeout=5)
        except httpx.HTTPError:
            return None

    def wait_converged(self, context: int, timeout_s: float = 180) -> None:
        """Both replicas running the expected context, and the endpoint serving it."""
        service = self.service()

        def ready() -> bool:
            if len(self.running_tasks(service)) != 2:
                return False
            state = (self.client.api.inspect_service(service).get("UpdateStatus") or {}).get("State")
            if state not in (None, "completed"):
                return False
            response = self.model()
            return response is not None and response.status_code == 200 and \
                response.json()["parameters"]["max_seq_len"] == context

        _wait(ready, timeout_s, f"2 replicas and the endpoint serving context {context}", self.diagnose)

    def cluster_verify(self, monkeypatch, capsys) -> dict:
        """`deploy cluster verify --json` through the CLI, with DOCKER_HOST at the Swarm manager."""
        monkeypatch.setenv("DOCKER_HOST", self.engine.docker_host)
        code = main(["cluster", "verify", "--inventory", str(self.fleet_path), "--url", self.endpoint,
                     "--api-key-file", str(self.out / "api_tokens.yml"), "--json", "--wait", "30"])
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
    engine = SwarmEngine(GPU_IDS)
    try:
        build_test_server_image(docker_client, images["tabby"], test_base_image)
        build_gateway_image(docker_client, images["gateway"], test_base_image)
        try:
            engine.start()
        except (RuntimeError, OSError) as error:
            _unavailable(f"the namespaced test dockerd could not start a Swarm: {error}")
        for image in images.values():
            engine.load_image(image)
        site = Site(engine, tmp_path_factory.mktemp("swarm"), images)
        site.write_fleet()
        site.render_and_deploy()
        site.wait_converged(context=202752)
        yield site
    finally:
        engine.stop()
        for image in images.values():
            with contextlib.suppress(docker.errors.ImageNotFound):  # the build may have failed before tagging
                docker_client.images.remove(image, force=True)


def test_replicas_converge_on_their_gpus_and_cluster_verify_passes(site, monkeypatch, capsys):
    tasks = site.running_tasks(site.service())
    claimed = []
    for task in tasks:
        resources = task["GenericResources"]
        assert len(resources) == 1 and resources[0]["NamedResourceSpec"]["Kind"] == "NVIDIA-GPU"
        claimed.append(resources[0]["NamedResourceSpec"]["Value"])
        container = site.client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
        # What the NVIDIA runtime reads (swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU").
        assert f"DOCKER_RESOURCE_NVIDIA-GPU={claimed[-1]}" in container.attrs["Config"]["Env"]
    assert len(set(claimed)) == 2 and set(claimed) <= set(GPU_IDS)
    data = site.cluster_verify(monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]
    replicas = [t for t in data["targets"] if t["kind"] == "replica"]
    assert len(replicas) == 2 and len({t["url"] for t in replicas}) == 2
    assert [t["kind"] for t in data["targets"]].count("endpoint") == 1
    for target in data["targets"]:
        assert target["report"]["model"]["id"] == "8bpw_H8"
    assert httpx.get(f"{site.endpoint}/v1/model", timeout=5).status_code == 401  # the key is required


def test_a_killed_replica_is_restored_and_verification_passes_again(site, monkeypatch, capsys):
    service = site.service()
    before = site.running_tasks(service)
    victim = before[0]
    site.client.containers.get(victim["Status"]["ContainerStatus"]["ContainerID"]).kill()

    def restored() -> bool:
        running = site.running_tasks(service)
        return len(running) == 2 and victim["ID"] not in {t["ID"] for t in running}

    _wait(restored, 120, "Swarm to replace the killed replica", site.diagnose)
    data = site.cluster_verify(monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]


def _claim(site: Site, gpus: int) -> str:
    name = f"glmdt-claim{gpus}-{secrets.token_hex(3)}"
    site.engine.cli("service", "create", "--detach", "--name", name, "--generic-resource", f"NVIDIA-GPU={gpus}",
                    "--restart-condition", "none", site.images["tabby"], "--host", "127.0.0.1")
    return name


def test_generic_resource_claims_place_or_refuse_services(site):
    # The stack holds 2 of the 3 advertised GPUs: a claim of 2 cannot be placed, a claim of 1 can.
    too_many, fits = _claim(site, 2), _claim(site, 1)
    try:
        def state(name: str) -> tuple[str, str]:
            tasks = site.client.api.tasks(filters={"service": name})
            return (tasks[0]["Status"]["State"], tasks[0]["Status"].get("Err", "")) if tasks else ("", "")

        _wait(lambda: state(fits)[0] == "running", 60, "the 1-GPU claim to run", site.diagnose)
        _wait(lambda: "insufficient resources" in state(too_many)[1], 60, "the 2-GPU claim to be refused",
              site.diagnose)
        time.sleep(3)
        assert state(too_many)[0] == "pending"
        claimed = site.client.api.tasks(filters={"service": fits})[0]["GenericResources"]
        stack_gpus = {t["GenericResources"][0]["NamedResourceSpec"]["Value"]
                      for t in site.running_tasks(site.service())}
        assert claimed[0]["NamedResourceSpec"]["Value"] in set(GPU_IDS) - stack_gpus
    finally:
        site.engine.cli("service", "rm", too_many, fits, check=False)
    _wait(lambda: not site.client.containers.list(filters={"label": f"com.docker.swarm.service.name={fits}"}),
          60, "the claim's container to go")


def test_a_plan_change_rolls_out_without_a_failed_request(site, monkeypatch, capsys):
    service = site.service()
    key = site.api_key
    results = {"ok": 0, "failed": [], "contexts": set()}
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10, headers={"X-API-Key": key}) as client:
            while not stop.is_set():
                try:
                    response = client.get(f"{site.endpoint}/v1/model")
                    if response.status_code == 200:
                        results["ok"] += 1
                        results["contexts"].add(response.json()["parameters"]["max_seq_len"])
                    else:
                        results["failed"].append(f"HTTP {response.status_code}")
                except httpx.HTTPError as error:
                    results["failed"].append(f"{type(error).__name__}: {error}")
                time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        time.sleep(2)
        old_tasks = {t["ID"] for t in site.running_tasks(service)}
        site.write_fleet(context=65536)
        site.render_and_deploy()
        _wait(lambda: (site.client.api.inspect_service(service).get("UpdateStatus") or {}).get("State")
              == "completed", 240, "the rolling update to complete", site.diagnose)
        site.wait_converged(context=65536, timeout_s=60)
        time.sleep(2)
    finally:
        stop.set()
        poller.join(timeout=30)
    assert not old_tasks & {t["ID"] for t in site.running_tasks(service)}, "every replica was replaced"
    assert results["failed"] == [], f"{len(results['failed'])} failed of {results['ok']}: {results['failed'][:5]}"
    assert results["ok"] > 50 and results["contexts"] == {202752, 65536}
    data = site.cluster_verify(monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]
    assert {t["report"]["model"]["max_seq_len"] for t in data["targets"]} == {65536}

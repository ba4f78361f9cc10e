"""Fleets on a real Swarm: a rendered stack of the TabbyAPI test server, deployed with `docker stack deploy`.

The Swarm is two throw-away dockerds, each in its own network namespace (tests/docker/swarm_engine.py), that
advertise fake GPUs as generic resources; the shared engine is never made a Swarm. The fleet (two node classes
serving one quant behind one endpoint) and the rolling-update measurement are in tests/docker/swarm_site.py,
shared with benchmarks/swarm_rollout.
"""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest

from tests.conftest import REQUIRE_DOCKER
from tests.docker.swarm_site import (
    FULL_CONTEXT,
    MANAGER_GPUS,
    ROLLED_CONTEXT,
    STACK,
    WORKER_GPUS,
    Site,
    SwarmUnavailable,
    roll_out,
    swarm_site,
    wait_for,
)
from toolkit.cli import main

pytestmark = pytest.mark.docker


def _unavailable(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"GLM_DEPLOY_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def _wait(predicate, timeout_s: float, what: str, diagnose=lambda: ""):
    """Poll predicate until truthy; fail the test with a diagnosis when the time is up."""
    try:
        return wait_for(predicate, timeout_s, what, diagnose)
    except TimeoutError as error:
        pytest.fail(str(error))


def _cluster_verify(site: Site, monkeypatch, capsys) -> dict:
    """`deploy cluster verify --json` through the CLI, with DOCKER_HOST at the Swarm manager."""
    monkeypatch.setenv("DOCKER_HOST", site.manager.docker_host)
    code = main(
        [
            "cluster",
            "verify",
            "--inventory",
            str(site.fleet_path),
            "--url",
            site.endpoint,
            "--api-key-file",
            str(site.out / "api_tokens.yml"),
            "--json",
            "--wait",
            "30",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert code == (0 if data["passed"] else 5)
    return data


@pytest.fixture(scope="module")
def site(docker_client, test_base_image, test_tools_image, tmp_path_factory):
    """Images built on the shared engine, copied into the namespaced Swarm, the fleet rendered and deployed."""
    try:
        with swarm_site(
            docker_client, test_base_image, test_tools_image, tmp_path_factory.mktemp("swarm")
        ) as site:
            yield site
    except SwarmUnavailable as reason:
        _unavailable(str(reason))
    except TimeoutError as error:
        pytest.fail(str(error))


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
    data = _cluster_verify(site, monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]
    replicas = [t for t in data["targets"] if t["kind"] == "replica"]
    assert sorted(t["class"] for t in replicas) == ["1x400gib", "1x400gib", "2x200gib"]
    assert len({t["url"] for t in replicas}) == 3
    assert {t["node"] for t in replicas} == {n.address for n in site.cluster.nodes}
    assert [t["kind"] for t in data["targets"]].count("endpoint") == 1
    assert {t["report"]["model"]["id"] for t in data["targets"]} == {"8bpw_H8"}
    # The class with two replicas: found through the manager, compared with each other at every position.
    (consistency,) = data["consistency"]
    assert consistency["class"] == "1x400gib" and consistency["passed"] and len(consistency["replicas"]) == 2
    assert consistency["pairs"][0]["positions"] == 159 and consistency["pairs"][0]["agree"]
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
    data = _cluster_verify(site, monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]


# Run inside a replica (as its user, who reads the mounted key): one generation that fails, as a client's bad
# request makes TabbyAPI's fail (benchmarks/gpu_stack/RESULTS.md section 3); prints the HTTP status.
FAIL_ONE_GENERATION = """
import json, re, urllib.error, urllib.request
key = re.search(r"api_key: *([A-Za-z0-9_-]+)", open("/app/api_tokens.yml").read()).group(1)
body = json.dumps({"prompt": "<<glm-test-server:generation-error>>", "max_tokens": 1}).encode()
request = urllib.request.Request("http://127.0.0.1:5000/v1/completions", data=body,
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as error:
    print(error.code)
"""


def test_a_failed_generation_takes_no_replica_out_of_rotation_or_service(site, monkeypatch, capsys):
    """Every replica's /health is left at 503 for good, as TabbyAPI leaves it after one failed generation; they
    still serve, so the Swarm healthcheck keeps them healthy (no task replaced, no reload) and the gateway keeps
    sending them requests (a /health check there would have emptied the backend)."""
    tasks = {service: site.running_tasks(service) for service in site.services()}
    containers = [site.container(task) for running in tasks.values() for task in running]
    assert len(containers) == 3
    for container in containers:
        code, output = container.exec_run(["python3", "-c", FAIL_ONE_GENERATION])
        assert code == 0 and output.decode().strip() == "503"

    def sticky_503_seen_by_three_health_checks() -> bool:
        for container in containers:
            container.reload()
            log = container.attrs["State"]["Health"]["Log"]
            if sum("/health 503" in entry["Output"] for entry in log) < 3:
                return False
        return True

    _wait(sticky_503_seen_by_three_health_checks, 60, "three health checks of every replica", site.diagnose)
    for container in containers:
        container.reload()
        health = container.attrs["State"]["Health"]
        assert health["Status"] == "healthy", health["Log"][-1]
        assert "one-token completion succeeds" in health["Log"][-1]["Output"]
    for _ in range(9):  # through the gateway: every replica has /health 503, and the endpoint serves
        response = httpx.post(
            f"{site.endpoint}/v1/completions",
            headers={"X-API-Key": site.api_key},
            json={"prompt": "Hello", "max_tokens": 1},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    assert {s: [t["ID"] for t in site.running_tasks(s)] for s in tasks} == {
        s: [t["ID"] for t in running] for s, running in tasks.items()
    }  # nothing replaced
    data = _cluster_verify(site, monkeypatch, capsys)  # liveness: 503, but a one-token completion succeeds
    assert data["passed"], json.dumps(data, indent=1)[:3000]


def test_cluster_verify_fails_while_a_class_is_short_of_replicas(site, monkeypatch, capsys):
    service = f"{STACK}_{site.fleet_plan().classes[1].service}"
    site.manager.cli("service", "scale", "--detach", f"{service}=0")
    try:
        _wait(lambda: not site.running_tasks(service), 60, "the class to scale to 0", site.diagnose)
        data = _cluster_verify(site, monkeypatch, capsys)
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
    rollout = roll_out(site, ROLLED_CONTEXT)
    assert rollout.replaced_all, "every replica was replaced"
    assert rollout.failed == [], f"{len(rollout.failed)} failed of {rollout.ok}: {rollout.failed[:5]}"
    assert rollout.ok > 50 and rollout.contexts == {FULL_CONTEXT, ROLLED_CONTEXT}
    data = _cluster_verify(site, monkeypatch, capsys)
    assert data["passed"], json.dumps(data, indent=1)[:3000]
    assert {t["report"]["model"]["max_seq_len"] for t in data["targets"]} == {ROLLED_CONTEXT}
    print(
        f"\nrolling update of {rollout.replicas} replicas: {rollout.ok} probe+completion pairs, 0 failed, "
        f"converged {rollout.converged_s:.0f} s after the deploy"
    )

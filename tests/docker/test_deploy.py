"""Deploy for real on the Docker engine: fetch-model -> up -> status -> logs -> down through the `deploy` CLI.

The image is the TabbyAPI-compatible test server (tests/tabby_test_server), built once per session through the
toolkit's own engine.build_image path. The rendered TabbyAPI Dockerfile needs CUDA images and PyPI, which CI cannot
reach, so each test tags the test-server image with the name the rendering expects (what `deploy build` would have
produced). GPU requests are off through the explicit --no-gpu option; nothing in the docker SDK is mocked.
The model comes from the fake hub (tests/fake_hf_hub, a test double of Hugging Face) through HF_ENDPOINT.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from docker.errors import APIError, ImageNotFound

from tests.fake_hf_hub import FakeHub, FakeRepo
from tests.tabby_test_server.image import ImageStack, build_test_server_image, prepare_context
from tests.tabby_test_server.testing import free_port
from tests.unit.quant.exl3_folders import MIX_LOWER, MIX_UPPER, mix_branches
from toolkit.deploy import compose_spec, engine, state
from toolkit.deploy.deployment import load_deployment
from toolkit.deploy.diagnose import DiagnosedFailure
from toolkit.deploy.retry import replan, smaller_context
from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.facts.layout import MODEL_MARKER, STATE
from toolkit.facts.profiles import load_profile
from toolkit.plan.plan import Plan, PlanRequest
from toolkit.plan.planner import make_plan
from toolkit.quant.mix import MIX_MANIFEST
from toolkit.render.bundle import RenderOptions, render_bundle

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
REPO = "mratsim/GLM-4.7-EXL3"
QUANT = (
    "3bpw_H6"  # 2-bit test-server weights babble special tokens; 3 bits keep the function check meaningful
)


@pytest.fixture(scope="session")
def tabby_context(tmp_path_factory) -> Path:
    """The test server's build context, with the pinned stack's test-double metadata (image.py)."""
    return prepare_context(tmp_path_factory.mktemp("tabby-image") / "context")


@pytest.fixture(scope="session")
def tabby_image(docker_client, test_base_image, tabby_context) -> Iterator[str]:
    """The test server image, built once through engine.build_image (streamed; reused when its hash label matches)."""
    tag = f"glmdt-deploy-tabby:{secrets.token_hex(4)}"
    built = engine.build_image(docker_client, tabby_context, tag, buildargs={"BASE": test_base_image})
    yield built.id
    for _ in range(20):  # a container being removed still holds the image for a moment
        try:
            docker_client.images.remove(tag)
            return
        except APIError:
            time.sleep(0.5)
    docker_client.images.remove(tag)


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory) -> Iterator[FakeHub]:
    """The fake hub serving a small quant folder as branch 3bpw_H6 of the model repo."""
    folder = tmp_path_factory.mktemp("quant")
    (folder / "config.json").write_text('{"architectures": ["Glm4MoeForCausalLM"]}')
    (folder / "model-00001-of-00001.safetensors").write_bytes(os.urandom(3 * 2**20))
    with FakeHub([FakeRepo(REPO, {QUANT: folder})]) as hub:
        yield hub


@dataclass
class Site:
    """One rendered deployment in a temp folder, plus what the test created on the engine."""

    out: Path
    models: Path
    port: int
    env: dict[str, str]
    tags: list[str]
    # The rendered image name is a hash of the plan: other sessions on this shared engine render the same plan
    # and tag their own image with that name. A context of our own makes ours unique.
    context: int = field(default_factory=lambda: 65536 + 256 * (1 + secrets.randbelow(200)))

    def deploy(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real CLI in a subprocess, as a user would."""
        return subprocess.run(
            [sys.executable, "-m", "toolkit.cli", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


def _plan(context: int):
    return make_plan(
        load_profile("glm-4.7"), parse_gpu_spec("1x144GiB"), PlanRequest(quant=QUANT, context=context)
    )


def _options(site: Site) -> RenderOptions:
    return RenderOptions(port=site.port, models_dir=str(site.models), gpu_reservation=False, force=True)


def _tag_as_rendered(docker_client, image_id: str, site: Site) -> None:
    """Give the test-server image the name this rendering's compose.yaml runs (what `deploy build` makes)."""
    name = load_deployment(site.out).manifest["image"]
    repository, _, version = name.rpartition(":")
    docker_client.images.get(image_id).tag(repository, version)
    site.tags.append(name)


@contextlib.contextmanager
def _site(
    docker_client, tabby_image: str | None, hub: FakeHub, tmp_path: Path, plan_of: Callable[[int], Plan]
) -> Iterator[Site]:
    """A deployment of plan_of(its context) rendered CPU-only on a free port, the model from `hub`; with
    tabby_image, that image tagged as the rendered one. Its container and tags are removed afterwards."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "", "PYTHONPATH": str(ROOT)}
    env.pop("GLM_DEPLOY_NO_GPU", None)
    site = Site(out=tmp_path / "out", models=tmp_path / "models", port=free_port(), env=env, tags=[])
    render_bundle(plan_of(site.context), site.out, _options(site))
    if tabby_image is not None:
        _tag_as_rendered(docker_client, tabby_image, site)
    try:
        yield site
    finally:
        container = engine.find_container(docker_client, state.default_container_name(site.out))
        if container is not None:
            container.remove(force=True)
        for tag in dict.fromkeys(site.tags):
            with contextlib.suppress(ImageNotFound):  # the same tag may have been added twice
                docker_client.images.remove(tag)


@pytest.fixture()
def site(docker_client, tabby_image, fake_hub, tmp_path) -> Iterator[Site]:
    """A deployment rendered for 3bpw_H6 at 64-117k context, CPU-only, on a free port; cleaned up afterwards."""
    with _site(docker_client, tabby_image, fake_hub, tmp_path, _plan) as made:
        yield made


def _json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_fetch_up_status_logs_down(docker_client, tabby_image, site: Site) -> None:
    fetched = _json(site.deploy("fetch-model", "--out", str(site.out), "--json"))
    assert fetched["revision"] == QUANT and not fetched["reused"]
    assert _json(site.deploy("fetch-model", "--out", str(site.out), "--json"))["reused"]

    up = _json(site.deploy("up", "--out", str(site.out), "--no-gpu", "--json"))
    assert up["action"] == "created" and up["url"] == f"http://127.0.0.1:{site.port}"
    assert up["model"]["id"] == QUANT and up["model"]["parameters"]["max_seq_len"] == site.context
    container = docker_client.containers.get(up["container"])
    ports = container.attrs["HostConfig"]["PortBindings"]["5000/tcp"]
    assert ports == [{"HostIp": "127.0.0.1", "HostPort": str(site.port)}]
    mounts = {m["Destination"]: m["RW"] for m in container.attrs["Mounts"]}
    assert mounts == {"/app/config.yml": False, "/app/api_tokens.yml": False, f"/app/models/{QUANT}": False}
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert not container.attrs["HostConfig"].get("DeviceRequests")  # --no-gpu: no GPU request at all
    state_file = site.out / STATE
    assert (state_file.stat().st_mode & 0o777) == 0o600
    assert json.loads(state_file.read_text())["container_id"] == container.id

    again = _json(site.deploy("up", "--out", str(site.out), "--no-gpu", "--json"))
    assert again["action"] == "kept" and docker_client.containers.get(again["container"]).id == container.id
    named = docker_client.containers.list(all=True, filters={"label": f"{engine.LABEL_OUT_DIR}={site.out}"})
    assert [c.id for c in named] == [container.id]  # converged, not duplicated

    status = _json(site.deploy("status", "--out", str(site.out), "--json"))
    assert status["state"] == "running" and status["health"] == 200
    assert status["model"] == {
        "id": QUANT,
        "max_seq_len": site.context,
        "cache_mode": up["model"]["parameters"]["cache_mode"],
        "cache_size": up["model"]["parameters"]["cache_size"],
    }
    assert status["gpus"] is None and "unavailable" in status["nvml"]  # no NVML on this host, and it says so
    planned = load_deployment(site.out).plan.stack  # read inside the container: the image's test doubles
    assert status["stack"]["differs"] == []
    assert status["stack"]["running"] == {
        "tabbyapi": planned.tabbyapi,
        "tabbyapi_head": planned.tabbyapi,
        "exllamav3": planned.exllamav3,
        "torch": planned.torch,
    }
    human = site.deploy("status", "--out", str(site.out))
    assert f"exllamav3 {planned.exllamav3}, torch {planned.torch} (as planned)" in human.stdout

    logs = site.deploy("logs", "--out", str(site.out), "--tail", "20")
    assert logs.returncode == 0 and "Uvicorn running on http://0.0.0.0:5000" in logs.stdout

    smaller = site.context - 4096
    render_bundle(_plan(smaller), site.out, _options(site))  # a changed plan: the container must be replaced
    _tag_as_rendered(docker_client, tabby_image, site)
    changed = _json(site.deploy("up", "--out", str(site.out), "--no-gpu", "--json"))
    assert changed["action"] == "replaced" and changed["model"]["parameters"]["max_seq_len"] == smaller

    down = site.deploy("down", "--out", str(site.out))
    assert down.returncode == 0, down.stderr
    assert engine.find_container(docker_client, changed["container"]) is None and not state_file.exists()
    assert (site.models / QUANT / "config.json").is_file() and (site.out / "api_tokens.yml").is_file()
    purge = site.deploy("down", "--out", str(site.out), "--purge")
    assert (
        purge.returncode == 0
        and not (site.models / QUANT).exists()
        and not (site.out / "api_tokens.yml").exists()
    )


def test_status_names_a_stack_that_differs_from_the_plan(
    docker_client, test_base_image, site: Site, tmp_path
) -> None:
    """An image holding exllamav3 1.4.2 (TabbyAPI's own pin) where the plan says 1.6.5: status says so."""
    planned = load_deployment(site.out).plan.stack
    tag = f"glmdt-deploy-tabby-other:{secrets.token_hex(4)}"
    other = ImageStack(planned.tabbyapi, "1.4.2", planned.torch)
    image_id = build_test_server_image(docker_client, tag, test_base_image, tmp_path, other)
    site.tags.append(tag)
    _tag_as_rendered(docker_client, image_id, site)
    assert site.deploy("fetch-model", "--out", str(site.out)).returncode == 0
    assert _json(site.deploy("up", "--out", str(site.out), "--no-gpu", "--json"))["action"] == "created"
    status = _json(site.deploy("status", "--out", str(site.out), "--json"))
    assert status["stack"]["differs"] == [f"exllamav3 1.4.2 (plan: {planned.exllamav3})"]
    human = site.deploy("status", "--out", str(site.out))
    assert human.returncode == 0
    assert f"stack DIFFERS from the plan: exllamav3 1.4.2 (plan: {planned.exllamav3})" in human.stdout


def _health(container) -> dict:
    container.reload()
    return container.attrs["State"].get("Health") or {}


def _poll(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.5)


def _fast_healthcheck(site: Site) -> None:
    """The rendered healthcheck, unchanged but for its cadence (1 s, 2 retries): the test need not wait minutes."""
    import yaml

    from toolkit.render.compose import health_test

    path = site.out / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    check = compose["services"]["tabbyapi"]["healthcheck"]
    assert check["test"] == health_test()  # the image's "can serve" probe, as the image runs it
    check.update(interval="1s", retries=2, start_period="0s")
    path.write_text(yaml.safe_dump(compose, sort_keys=False))


def test_one_failed_generation_keeps_the_container_healthy_one_that_cannot_generate_does_not(
    docker_client, tabby_image, site: Site
) -> None:
    """Health means "can serve" (as measured on TabbyAPI e632af4, benchmarks/gpu_stack/RESULTS.md section 3): a
    failed generation leaves /health at 503 while the server serves on, and the container stays healthy; a server
    whose every generation fails turns unhealthy."""
    import httpx

    key = (site.out / "api_tokens.yml").read_text().split("api_key:")[1].split()[0]
    assert site.deploy("fetch-model", "--out", str(site.out)).returncode == 0
    _fast_healthcheck(site)
    up = _json(site.deploy("up", "--out", str(site.out), "--no-gpu", "--json"))
    container = docker_client.containers.get(up["container"])
    _poll(lambda: _health(container).get("Status") == "healthy", 60, "healthy after start")
    url = f"http://127.0.0.1:{site.port}"
    failed = httpx.post(
        f"{url}/v1/completions",
        headers={"X-API-Key": key},
        json={"prompt": "<<glm-test-server:generation-error>>", "max_tokens": 1},
        timeout=30,
    )
    assert failed.status_code == 503 and httpx.get(f"{url}/health", timeout=10).status_code == 503

    def checks_since_the_failure() -> list[dict]:  # Docker keeps the last 5 results; these say "/health 503"
        return [e for e in _health(container)["Log"] if "/health 503" in e["Output"]]

    _poll(lambda: len(checks_since_the_failure()) >= 3, 60, "three health checks since the failed generation")
    health = _health(container)
    assert health["Status"] == "healthy" and health["FailingStreak"] == 0
    assert all(e["ExitCode"] == 0 for e in checks_since_the_failure())
    assert "one-token completion succeeds" in health["Log"][-1]["Output"], health["Log"][-1]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 503  # TabbyAPI's own /health: still 503

    config = site.out / "config.yml"
    config.write_text(config.read_text() + "test_server:\n  fail_generations: true\n")
    again = _json(site.deploy("up", "--out", str(site.out), "--no-gpu", "--json"))
    assert again["action"] == "replaced"  # the mounted config changed
    broken = docker_client.containers.get(again["container"])
    _poll(lambda: _health(broken).get("Status") == "healthy", 60, "healthy before any generation")
    refused = httpx.post(
        f"{url}/v1/completions",
        headers={"X-API-Key": key},
        json={"prompt": "Hi", "max_tokens": 1},
        timeout=30,
    )
    assert refused.status_code == 503
    _poll(lambda: _health(broken).get("Status") == "unhealthy", 60, "unhealthy: it cannot generate")
    assert "one-token completion 503" in _health(broken)["Log"][-1]["Output"]
    status = _json(site.deploy("status", "--out", str(site.out), "--json"))
    assert status["container"]["health"] == "unhealthy"


def test_oom_is_diagnosed_and_retry_smaller_recovers(
    docker_client, tabby_image, site: Site, tmp_path
) -> None:
    assert site.deploy("fetch-model", "--out", str(site.out)).returncode == 0
    config = site.out / "config.yml"
    config.write_text(
        config.read_text() + "test_server:\n  oom: true\n"
    )  # the server prints exllamav3's OOM, exits

    failed = site.deploy("up", "--out", str(site.out), "--no-gpu", "--ready-timeout", "120")
    assert failed.returncode == 3, failed.stderr
    assert "did not fit in GPU memory" in failed.stderr and "Insufficient VRAM" in failed.stderr
    container = docker_client.containers.get(state.default_container_name(site.out))
    assert container.status == "exited"  # stopped: no restart loop left behind

    # The retry re-renders for half the context; its image name is known by re-planning a copy the same way.
    preview = tmp_path / "preview"
    shutil.copytree(site.out, preview)
    (preview / "deploy-state.json").unlink()  # it names site.out's container: a copy is not that deployment
    half = smaller_context(site.context, 32768)
    assert half == site.context // 2 // 256 * 256
    retried = replan(load_deployment(preview), half)
    assert retried.manifest["image"] != load_deployment(site.out).manifest["image"]
    repository, _, version = retried.manifest["image"].rpartition(":")
    docker_client.images.get(tabby_image).tag(repository, version)
    site.tags.append(retried.manifest["image"])

    result = site.deploy("up", "--out", str(site.out), "--no-gpu", "--retry-smaller", "--json")
    outcome = _json(result)
    assert f"re-planning with context {half}" in result.stderr
    assert outcome["retried_context"] == half and outcome["model"]["parameters"]["max_seq_len"] == half


def test_port_in_use_is_exit_4(site: Site) -> None:
    assert site.deploy("fetch-model", "--out", str(site.out)).returncode == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", site.port))
        holder.listen()
        result = site.deploy("up", "--out", str(site.out), "--no-gpu")
    assert result.returncode == 4
    assert f"port {site.port} on 127.0.0.1 is already in use" in result.stderr and "--port" in result.stderr


def test_unreachable_engine_is_exit_4(site: Site, tmp_path) -> None:
    dead = f"unix://{tmp_path}/no-docker.sock"
    for command in (["up", "--no-gpu"], ["status"], ["down"]):
        result = site.deploy(command[0], "--out", str(site.out), *command[1:], env={"DOCKER_HOST": dead})
        assert result.returncode == 4, result.stderr
        assert f"Docker engine not reachable at {dead}" in result.stderr
        assert "Traceback" not in result.stderr


def test_up_without_the_model_says_fetch_first(site: Site) -> None:
    result = site.deploy("up", "--out", str(site.out), "--no-gpu")
    assert result.returncode == 4 and "deploy fetch-model" in result.stderr


def _auto_args(site: Site) -> list[str]:
    return [
        "auto",
        "--out",
        str(site.out),
        "--gpus",
        "1x144GiB",
        "--quant",
        QUANT,
        "--context",
        str(site.context),
        "--port",
        str(site.port),
        "--models-dir",
        str(site.models),
        "--no-gpu",
        "--skip-build",
    ]


def test_auto_runs_the_whole_pipeline_and_converges(docker_client, site: Site) -> None:
    args = _auto_args(site)
    refused = site.deploy(*args)  # no terminal to ask on, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr

    first_run = site.deploy(*args, "--yes", "--json")
    first = _json(first_run)
    assert first["ok"] and first["stage"] == "done" and first["action"] == "created"
    assert {c["name"]: c["passed"] for c in first["verify"]} == {
        "liveness": True,
        "readiness": True,
        "function": True,
        "tokenizer": True,
        "kl": True,
    }
    # The reference was computed inside the image from the downloaded folder, by the test double (it says so).
    reference = first["reference"]
    assert not reference["reused"] and reference["path"] == str(site.out / "deployment-reference.json.gz")
    assert reference["positions"] == 159 and reference["model_id"] == QUANT
    assert reference["backend"].startswith("test-double") and "TEST DOUBLE" in first_run.stderr
    assert reference["model_commit"] == first["model"]["commit"] and reference["cache_mode"] == "FP16"
    kl = first["kl"]
    assert kl["positions"] == 159 and kl["mean"] < kl["threshold"]
    assert "serving-path bound for cache" in kl["threshold_source"]
    assert not [
        c
        for c in docker_client.containers.list(all=True)
        if c.name.endswith("-reference") and c.labels.get(engine.LABEL_OUT_DIR) == str(site.out)
    ]  # the one-off container is gone
    assert not list(site.out.glob(".reference-*"))  # and so is its staging folder
    assert first["api_key_file"] == str(site.out / "api_tokens.yml")
    key = (site.out / "api_tokens.yml").read_text()
    assert f"-H @{site.out / 'api_key.header'}" in first["curl"] and "$(" not in first["curl"]
    assert key.split("api_key:")[1].split()[0] not in json.dumps(first)

    second = _json(site.deploy(*args, "--yes", "--json"))
    assert second["action"] == "kept" and second["container"] == first["container"]
    assert second["model"]["reused"] and second["reference"]["reused"]
    assert second["reference"]["key"] == reference["key"] and second["kl"]["mean"] == kl["mean"]

    human = site.deploy(*args, "--yes")
    assert human.returncode == 0 and f"endpoint: http://127.0.0.1:{site.port}/v1" in human.stdout
    assert "PASS kl" in human.stdout and "deployment reference reused" in human.stderr

    # The step on its own, forced: the container's log lines arrive as progress, the key stays the same.
    again = site.deploy("reference", "deployment", "--out", str(site.out), "--no-gpu", "--force")
    assert again.returncode == 0, again.stderr
    assert "[reference] TEST DOUBLE prompt 40/40" in again.stderr and "computed" in again.stdout
    status = _json(site.deploy("status", "--out", str(site.out), "--kl", "--json"))
    assert status["reference"]["current"] and status["kl"]["passed"] and status["kl"]["positions"] == 159
    verified = _json(site.deploy("verify", "--out", str(site.out), "--json"))
    assert verified["passed"] and verified["kl"]["mean"] == kl["mean"]
    curl = next(line for line in human.stdout.splitlines() if line.startswith("try: curl"))
    answer = subprocess.run(
        ["bash", "-c", curl.removeprefix("try: ")], capture_output=True, text=True, timeout=60, check=False
    )
    assert answer.returncode == 0 and json.loads(answer.stdout)["choices"][0]["message"]["content"]


def test_auto_fails_with_exit_5_when_the_server_serves_other_weights_than_the_reference(
    docker_client, tabby_image, site: Site
) -> None:
    """A build that computes differently: the image's server is told 4-bit weights (GLM_TEST_SERVER_BITS) while
    the folder it serves, from which the reference is computed, holds 3-bit ones (3bpw_H6)."""
    variant = docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {tabby_image}\nENV GLM_TEST_SERVER_BITS=4\n".encode()), rm=True, pull=False
    )[0]
    name = load_deployment(site.out).manifest["image"]
    repository, _, version = name.rpartition(":")
    variant.tag(repository, version)  # the rendered name now runs the variant (site cleanup removes the tag)

    skipped = site.deploy(*_auto_args(site), "--no-kl", "--yes", "--json")
    outcome = _json(skipped)
    assert outcome["ok"] and outcome["reference"] == {"skipped": "--no-kl"} and outcome["kl"] is None
    assert [c["name"] for c in outcome["verify"]] == ["liveness", "readiness", "function"]
    assert "--no-kl: no deployment reference and no KL spot-check" in skipped.stderr
    assert not (site.out / "deployment-reference.json.gz").exists()

    failed = site.deploy(*_auto_args(site), "--yes")
    assert failed.returncode == 5, failed.stderr
    assert "FAIL kl" in failed.stdout and "verification FAILED" in failed.stdout
    assert "PASS readiness" in failed.stdout  # same name, cache mode and context: only the KL can tell
    assert "deploy auto: verification failed: kl: mean KL" in failed.stderr
    assert (site.out / "deployment-reference.json.gz").is_file()  # made from the folder: 3 bits

    later = site.deploy("verify", "--out", str(site.out), "--json")
    assert later.returncode == 5 and not json.loads(later.stdout)["passed"]
    assert json.loads(later.stdout)["kl"]["mean"] > 10 * json.loads(later.stdout)["kl"]["threshold"]


def test_build_reuses_an_image_with_the_same_hash(
    docker_client, tabby_image, tabby_context, test_base_image
) -> None:
    tag = f"glmdt-deploy-tabby:{secrets.token_hex(4)}"
    lines: list[str] = []
    try:
        again = engine.build_image(
            docker_client, tabby_context, tag, buildargs={"BASE": test_base_image}, on_line=lines.append
        )
        assert again.reused and again.id == tabby_image and not lines  # no build ran
        assert tag in docker_client.images.get(tabby_image).tags
    finally:
        docker_client.images.remove(tag)


def test_gpu_deployment_on_an_engine_without_nvidia_runtime(docker_client, tabby_image, site: Site) -> None:
    """Without --no-gpu the GPU request is real: preflight refuses (exit 4), and so does the engine itself."""
    if engine.gpu_runtime_present(docker_client):
        pytest.skip("this engine has the NVIDIA runtime: the refusal path cannot be shown here")
    render_bundle(
        _plan(site.context), site.out, RenderOptions(port=site.port, models_dir=str(site.models), force=True)
    )
    _tag_as_rendered(docker_client, tabby_image, site)
    assert site.deploy("fetch-model", "--out", str(site.out)).returncode == 0
    refused = site.deploy("up", "--out", str(site.out))
    assert (
        refused.returncode == 4 and "no NVIDIA runtime" in refused.stderr and "nvidia-ctk" in refused.stderr
    )

    spec = compose_spec.spec_from_compose(
        site.out / "compose.yaml", name=state.default_container_name(site.out)
    )
    assert spec.gpu_device_ids == tuple(load_deployment(site.out).plan.device_ids)
    with pytest.raises(DiagnosedFailure) as failure:  # past preflight: the engine rejects the device request
        engine.converge(docker_client, compose_spec.RunSpec(**{**spec.__dict__, "ulimits": ()}), site.out)
    assert failure.value.diagnosis.kind == "no-gpu-runtime" and failure.value.exit_code == 4
    assert engine.find_container(docker_client, spec.name) is None  # nothing half-created is left


MIX_SPEC = f"mix:{MIX_LOWER}+{MIX_UPPER}@110"  # a mix of GLM-4.7's 2.57bpw-tuned and 3.15bpw-tuned at 110 GiB
MIX_NAME = f"mix-{MIX_LOWER}-{MIX_UPPER}-110GiB"


def _mix_plan(context: int) -> Plan:
    return make_plan(
        load_profile("glm-4.7"), parse_gpu_spec("1x144GiB"), PlanRequest(quant=MIX_SPEC, context=context)
    )


@pytest.fixture(scope="session")
def mix_hub(tmp_path_factory) -> Iterator[FakeHub]:
    """The fake hub serving two small EXL3 quants of one model (same codebook) as the mix's two branches."""
    with FakeHub([FakeRepo(REPO, mix_branches(tmp_path_factory.mktemp("mix-branches")))]) as hub:
        yield hub


def _auto_mix_args(site: Site) -> list[str]:
    args = _auto_args(site)
    args[args.index("--quant") + 1] = MIX_SPEC
    return args


def _shards_served(hub: FakeHub) -> int:
    return sum(
        1 for r in hub.requests if r.method == "GET" and str(r.file).endswith(".safetensors") and r.content
    )


def test_auto_deploys_a_mix_of_two_branches_end_to_end(docker_client, tabby_image, mix_hub, tmp_path) -> None:
    """plan -> render -> fetch (both branches) -> mix (exllamav3's assembly in the deployment's image: here the
    test image with the exllamav3 TEST DOUBLE) -> reference -> up -> verify, like a published branch."""
    with _site(docker_client, tabby_image, mix_hub, tmp_path, _mix_plan) as site:
        run = site.deploy(*_auto_mix_args(site), "--yes", "--json")
        first = _json(run)
        assert first["ok"] and first["stage"] == "done" and first["plan"]["mix"]["name"] == MIX_NAME
        assert all(c["passed"] for c in first["verify"]) and [c["name"] for c in first["verify"]][-1] == "kl"
        # both branches fetched, each pinned to its commit with its marker
        sources = {s["revision"]: s for s in first["model"]["sources"]}
        assert set(sources) == {MIX_LOWER, MIX_UPPER}
        for branch, source in sources.items():
            assert source["commit"] == mix_hub.repos[REPO].commit(branch) and not source["reused"]
            assert json.loads((site.models / branch / MODEL_MARKER).read_text())["commit"] == source["commit"]
        # the mix assembled in the deployment's image, into the folder the server mounts
        mix = first["mix"]
        image = load_deployment(site.out).manifest["image"]
        assert mix["path"] == str(site.models / MIX_NAME) and not mix["reused"] and mix["test_double"]
        assert mix["runner"]["kind"] == "image" and mix["runner"]["image"] == image
        assert [s["commit"] for s in mix["sources"]] == [
            sources[MIX_LOWER]["commit"],
            sources[MIX_UPPER]["commit"],
        ]
        assert mix["actual_bytes"] <= mix["target_bytes"] and mix["modules_from"][MIX_UPPER] > 0
        manifest = json.loads((site.models / MIX_NAME / MIX_MANIFEST).read_text())
        assert manifest["key"] == mix["key"] and "TEST DOUBLE of exllamav3" in run.stderr
        assert not docker_client.containers.list(all=True, filters={"label": "io.glm-deploy.role=mix"})
        assert not list(site.models.glob(".mix-*"))
        # served under the mix's name, verified against a reference computed from the mix folder
        container = docker_client.containers.get(first["container"])
        assert {m["Destination"] for m in container.attrs["Mounts"]} >= {f"/app/models/{MIX_NAME}"}
        status = _json(site.deploy("status", "--out", str(site.out), "--json"))
        assert status["model"]["id"] == MIX_NAME and status["reference"]["current"]
        reference = first["reference"]
        assert reference["model_id"] == MIX_NAME and reference["model_commit"] == manifest["key"]
        assert "serving-path bound" in first["kl"]["threshold_source"]

        second = _json(site.deploy(*_auto_mix_args(site), "--yes", "--json"))
        assert second["action"] == "kept" and second["mix"]["reused"] and second["reference"]["reused"]
        assert all(s["reused"] for s in second["model"]["sources"]) and second["mix"]["key"] == mix["key"]
        step = site.deploy("mix-model", "--out", str(site.out))
        assert step.returncode == 0 and "mix assembled" not in step.stdout and "reused" in step.stderr
        verified = _json(site.deploy("verify", "--out", str(site.out), "--json"))
        assert verified["passed"] and verified["model"]["id"] == MIX_NAME
        purged = _json(site.deploy("down", "--out", str(site.out), "--purge", "--json"))["purged"]
        assert [str(site.models / name) for name in (MIX_NAME, MIX_LOWER, MIX_UPPER)] == purged[:3]
        assert not list(site.models.iterdir())


def test_auto_refuses_unmixable_branches_before_anything_is_built(docker_client, tmp_path) -> None:
    """Branches with different codebooks: exit 2 at fetch-model, from their settings files alone, in one line;
    no shard downloaded, no image built (no --skip-build: a build would have been tried), no container."""
    branches = mix_branches(tmp_path / "hub", upper_codebook="mul1")
    with (
        FakeHub([FakeRepo(REPO, branches)]) as hub,
        _site(docker_client, None, hub, tmp_path, _mix_plan) as site,
    ):
        args = [a for a in _auto_mix_args(site) if a != "--skip-build"]
        refused = site.deploy(*args, "--yes", "--json")
        assert refused.returncode == 2, refused.stderr
        outcome = json.loads(refused.stdout)
        assert outcome["stage"] == "fetch-model" and outcome["exit_code"] == 2
        assert f"{MIX_UPPER} cannot be mixed with {MIX_LOWER}: codebook mul1 is not mcg" in outcome["error"]
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert _shards_served(hub) == 0 and not list(site.models.rglob("*.safetensors"))
        with pytest.raises(ImageNotFound):
            docker_client.images.get(load_deployment(site.out).manifest["image"])
        assert engine.find_container(docker_client, state.default_container_name(site.out)) is None

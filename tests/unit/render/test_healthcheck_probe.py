"""The image's health probe (dockerfiles/healthcheck.py) against the TabbyAPI test double: healthy means "can serve".

The test server follows what TabbyAPI e632af4 did on an H200 (benchmarks/gpu_stack/RESULTS.md section 3): one failed
generation leaves /health at 503 for good while the next completion succeeds; a server that cannot generate fails
every completion, /v1/model still 200.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from tests.tabby_test_server import testing
from tests.tabby_test_server.server import ERROR_TRIGGER
from toolkit.facts import layout
from toolkit.facts.paths import DOCKERFILES_DIR

KEY = "0123456789abcdef0123456789abcdef"


def _probe_module():
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKERFILES_DIR / layout.HEALTHCHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


PROBE = _probe_module()


@pytest.fixture()
def server(tmp_path: Path, request):
    running = testing.start(tmp_path, api_key=KEY, test_server=getattr(request, "param", None))
    yield running
    running.stop()


def _probe(server, tmp_path: Path, capsys) -> tuple[int, str]:
    code = PROBE.main([server.url, str(tmp_path / "api_tokens.yml")])
    return code, capsys.readouterr().out.strip()


def _fail_one_generation(server) -> None:
    failed = httpx.post(
        f"{server.url}/v1/completions",
        headers={"X-API-Key": KEY},
        json={"prompt": ERROR_TRIGGER, "max_tokens": 1},
    )
    assert failed.status_code == 503
    assert httpx.get(f"{server.url}/health").status_code == 503


def test_a_serving_server_is_healthy(server, tmp_path: Path, capsys) -> None:
    assert _probe(server, tmp_path, capsys) == (0, "healthy: /health 200")


def test_one_failed_generation_keeps_it_healthy(server, tmp_path: Path, capsys) -> None:
    _fail_one_generation(server)
    code, said = _probe(server, tmp_path, capsys)
    assert code == 0 and "/health 503" in said and "one-token completion succeeds" in said


@pytest.mark.parametrize("server", [{"fail_generations": True}], indirect=True)
def test_a_server_that_cannot_generate_is_unhealthy(server, tmp_path: Path, capsys) -> None:
    assert _probe(server, tmp_path, capsys)[0] == 0  # nothing failed yet: /health 200
    refused = httpx.post(
        f"{server.url}/v1/completions", headers={"X-API-Key": KEY}, json={"prompt": "Hi", "max_tokens": 1}
    )
    assert refused.status_code == 503
    code, said = _probe(server, tmp_path, capsys)
    assert code == 1 and said == "unhealthy: /health 503 and a one-token completion 503"


def test_without_the_key_a_sticky_503_is_unhealthy(server, tmp_path: Path, capsys) -> None:
    _fail_one_generation(server)
    (tmp_path / "api_tokens.yml").unlink()
    code, said = _probe(server, tmp_path, capsys)
    assert code == 1 and "no API key readable" in said


def test_a_wrong_key_is_unhealthy_not_a_pass(server, tmp_path: Path, capsys) -> None:
    _fail_one_generation(server)
    (tmp_path / "api_tokens.yml").write_text("api_key: not-the-key\nadmin_key: nor-this\n")
    assert _probe(server, tmp_path, capsys) == (1, "unhealthy: /health 503 and a one-token completion 401")


def test_nothing_listening_is_unhealthy(tmp_path: Path, capsys) -> None:
    code = PROBE.main([f"http://127.0.0.1:{testing.free_port()}", str(tmp_path / "api_tokens.yml")])
    assert code == 1 and capsys.readouterr().out.strip() == "unhealthy: no answer on /health"


def test_the_key_is_read_as_render_writes_it(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "api_tokens.yml"
    path.write_text(yaml.safe_dump({"api_key": KEY, "admin_key": "f" * 64}, sort_keys=False))
    assert PROBE.read_key(str(path)) == KEY
    path.write_text(f"admin_key: '{'e' * 32}'\n")
    assert PROBE.read_key(str(path)) == "e" * 32

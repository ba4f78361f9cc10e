"""`deploy verify --out` of a deployment that serves a mix, against a full-precision reference: the threshold is the
mix's expected KL (the card-point estimate) x 1.5, said to be an estimate; no branch's measured KL is used."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tabby_test_server import testing
from tests.tabby_test_server.backend import TinyModelBackend
from toolkit.cli import main
from toolkit.deploy.deployment import load_deployment
from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.facts.profiles import load_profile
from toolkit.plan.plan import PlanRequest
from toolkit.plan.planner import make_plan
from toolkit.render.bundle import RenderOptions, render_bundle
from toolkit.verify.checks import KL_TOLERANCE_FACTOR
from toolkit.verify.reference import compute_reference, load_prompts, save_reference

KEY = "verify-mix-key-7c1d2e"
SPEC = "mix:2.57bpw-tuned+3.15bpw-tuned@110"


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> Path:
    """A full-precision reference of the test model (the analogue of `reference compute` on BF16)."""
    path = tmp_path_factory.mktemp("ref") / "reference.json.gz"
    save_reference(compute_reference(TinyModelBackend(), load_prompts()), path)
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deployment") / "out"
    plan = make_plan(
        load_profile("glm-4.7"), parse_gpu_spec("1x144GiB"), PlanRequest(quant=SPEC, context=65536)
    )
    render_bundle(plan, out, RenderOptions(port=5123, models_dir=str(out.parent / "models")))
    (out.parent / "key").write_text(KEY + "\n")
    return out


@pytest.fixture(scope="module")
def servers(deployment, tmp_path_factory) -> Iterator[dict[int, testing.RunningServer]]:
    """The mix's name, cache mode and context served by the tiny model at 4 bits (KL ~0.18 from full precision)
    and at 3 bits (~0.90)."""
    plan = load_deployment(deployment).plan
    model = {
        "model_name": plan.quant,
        "cache_mode": plan.cache_mode,
        "max_seq_len": plan.context,
        "cache_size": plan.cache_size,
        "reasoning": True,
    }
    running = {
        bits: testing.start(
            tmp_path_factory.mktemp(f"s{bits}"), api_key=KEY, model=model, test_server={"bits": bits}
        )
        for bits in (4, 3)
    }
    yield running
    for server in running.values():
        server.stop()


def _verify(capsys, deployment: Path, url: str, reference: Path) -> tuple[int, dict]:
    key = str(deployment.parent / "key")
    code = main(
        [
            "verify",
            "--out",
            str(deployment),
            "--url",
            url,
            "--api-key-file",
            key,
            "--reference",
            str(reference),
            "--json",
        ]
    )
    return code, json.loads(capsys.readouterr().out)


def test_the_threshold_is_the_mixs_estimate(deployment, servers, reference_file, capsys) -> None:
    mix = load_deployment(deployment).plan.mix
    assert mix is not None
    code, report = _verify(capsys, deployment, servers[4].url, reference_file)
    assert code == 0, report
    kl = report["kl"]
    assert kl["threshold"] == pytest.approx(mix.expected_kl * KL_TOLERANCE_FACTOR)
    assert mix.name in kl["threshold_source"] and "estimate: log(KL) interpolated" in kl["threshold_source"]
    assert "measured KL" not in kl["threshold_source"]  # no branch's figure
    assert {c["name"]: c["passed"] for c in report["checks"]}["readiness"]
    worse, failed = _verify(capsys, deployment, servers[3].url, reference_file)
    assert worse == 5 and failed["kl"]["mean"] > failed["kl"]["threshold"] == kl["threshold"]

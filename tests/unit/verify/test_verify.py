"""`deploy verify` end to end against the in-process TabbyAPI test server at several weight bit widths."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.tabby_test_server import testing
from tests.tabby_test_server.backend import TinyModelBackend
from tests.tabby_test_server.server import ERROR_TRIGGER
from toolkit.cli import main
from toolkit.deploy.readiness import wait_ready
from toolkit.errors import VerificationFailed
from toolkit.verify.client import ServerError, TabbyClient
from toolkit.verify.readiness import Expectations, same_cache_mode
from toolkit.verify.reference import compute_reference, load_prompts, save_reference

KEY = "verify-test-key-5f3a9c"


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> Path:
    """A full-precision reference of the test model (the analogue of `reference compute` on BF16)."""
    path = tmp_path_factory.mktemp("ref") / "reference.json.gz"
    save_reference(compute_reference(TinyModelBackend(), load_prompts()), path)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, testing.RunningServer]]:
    """One test server per weight width; model ids carry the width like real quant folders do."""
    running = {}
    for name in ("tiny", "tiny-8bpw", "tiny-6bpw", "tiny-4bpw", "tiny-3bpw"):
        running[name] = testing.start(
            tmp_path_factory.mktemp(name),
            api_key=KEY,
            model={"model_name": name, "cache_mode": "5,4", "reasoning": True},
        )
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture()
def key_file(tmp_path) -> Path:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


def _verify(capsys, *args: str) -> tuple[int, dict]:
    code = main(["verify", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_kl_ranks_bit_widths_and_full_precision_matches_exactly(servers, reference_file, key_file, capsys):
    means = {}
    for name in ("tiny", "tiny-8bpw", "tiny-6bpw", "tiny-4bpw", "tiny-3bpw"):
        code, report = _verify(
            capsys,
            "--url",
            servers[name].url,
            "--api-key-file",
            str(key_file),
            "--reference",
            str(reference_file),
            "--max-kl",
            "10",
        )
        assert code == 0, report
        means[name] = report["kl"]
    assert means["tiny"]["mean"] == pytest.approx(0.0, abs=1e-12)
    order = [means[n]["mean"] for n in ("tiny", "tiny-8bpw", "tiny-6bpw", "tiny-4bpw", "tiny-3bpw")]
    assert order == sorted(order) and len(set(order)) == len(order)
    # 4 vs 6 bits are separated at 95% confidence: the intervals do not overlap.
    assert means["tiny-6bpw"]["ci95"][1] < means["tiny-4bpw"]["ci95"][0]


def test_json_shape(servers, reference_file, key_file, capsys):
    code, report = _verify(
        capsys,
        "--url",
        servers["tiny-6bpw"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(reference_file),
        "--max-kl",
        "0.05",
        "--expect-model",
        "tiny-6bpw",
    )
    assert code == 0
    assert report["passed"] is True
    assert [c["name"] for c in report["checks"]] == ["liveness", "readiness", "function", "tokenizer", "kl"]
    assert all(set(c) >= {"name", "passed", "detail"} for c in report["checks"])
    kl = report["kl"]
    assert set(kl) >= {"mean", "ci95", "median", "p99", "max", "positions"}
    assert kl["ci95"][0] <= kl["mean"] <= kl["ci95"][1]
    assert kl["median"] <= kl["p99"] <= kl["max"]
    assert kl["positions"] == len(report["per_position"]) > 100
    assert 0.5 < report["top1_agreement"] <= 1.0


def test_fails_with_exit_5_when_mean_exceeds_max_kl(servers, reference_file, key_file, capsys):
    code, report = _verify(
        capsys,
        "--url",
        servers["tiny-4bpw"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(reference_file),
        "--max-kl",
        "0.05",
    )
    assert code == 5
    kl_check = next(c for c in report["checks"] if c["name"] == "kl")
    assert not kl_check["passed"] and "threshold 0.05" in kl_check["detail"]


def test_profile_threshold_for_the_expected_quant(servers, reference_file, key_file, capsys):
    """No --max-kl: GLM-4.7's measured KL for 4bpw_H6 (0.1358) x 1.5 passes the 4-bit model, not the 3-bit one."""
    common = [
        "--api-key-file",
        str(key_file),
        "--reference",
        str(reference_file),
        "--expect-quant",
        "4bpw_H6",
    ]
    assert _verify(capsys, "--url", servers["tiny-4bpw"].url, *common)[0] == 0
    code, report = _verify(capsys, "--url", servers["tiny-3bpw"].url, *common)
    assert code == 5
    assert "4bpw_H6" in report["kl"]["threshold_source"]


def test_regression_against_a_recorded_deployment(servers, key_file, tmp_path, capsys):
    recorded = tmp_path / "recorded.json"
    assert (
        main(
            [
                "reference",
                "record",
                "--url",
                servers["tiny-6bpw"].url,
                "--api-key-file",
                str(key_file),
                "--out",
                str(recorded),
                "--top-k",
                "64",
            ]
        )
        == 0
    )
    code, same = _verify(
        capsys,
        "--url",
        servers["tiny-6bpw"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(recorded),
    )
    assert code == 0 and same["kl"]["mean"] == pytest.approx(0.0, abs=1e-12)
    code, worse = _verify(
        capsys,
        "--url",
        servers["tiny-4bpw"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(recorded),
    )
    assert code == 5 and "regression" in worse["kl"]["threshold_source"]


def test_junit_report_parses(servers, reference_file, key_file, tmp_path, capsys):
    junit = tmp_path / "reports" / "verify.xml"
    code, _ = _verify(
        capsys,
        "--url",
        servers["tiny-4bpw"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(reference_file),
        "--max-kl",
        "0.05",
        "--junit",
        str(junit),
    )
    assert code == 5
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "5" and suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["kl"].find("failure") is not None
    assert cases["liveness"].find("failure") is None


def test_unreachable_server_fails_with_exit_5(tmp_path, capsys):
    code, report = _verify(capsys, "--url", f"http://127.0.0.1:{testing.free_port()}")
    assert code == 5
    assert report["checks"][0]["name"] == "liveness" and "unreachable" in report["checks"][0]["detail"]
    assert all(not c["passed"] for c in report["checks"])


def test_bad_key_is_a_clear_failure_and_is_never_printed(servers, tmp_path, capsys):
    wrong = "wrong-key-that-must-not-leak"
    key_file = tmp_path / "key"
    key_file.write_text(wrong)
    code = main(["verify", "--url", servers["tiny"].url, "--api-key-file", str(key_file)])
    captured = capsys.readouterr()
    assert code == 5
    assert "401" in captured.out and "api-key-file" in captured.out
    assert wrong not in captured.out + captured.err


def test_api_key_from_api_tokens_yml_and_from_env(servers, tmp_path, capsys, monkeypatch):
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": KEY, "admin_key": "admin"}))
    assert _verify(capsys, "--url", servers["tiny"].url, "--api-key-file", str(tokens))[0] == 0
    monkeypatch.setenv("DEPLOY_API_KEY", KEY)
    assert _verify(capsys, "--url", servers["tiny"].url)[0] == 0


def test_wrong_model_id_cache_mode_or_context_fails_readiness(servers, key_file, capsys):
    for flags in (
        ["--expect-model", "GLM-4.7-other"],
        ["--expect-cache-mode", "FP16"],
        ["--expect-context", "8192"],
    ):
        code, report = _verify(capsys, "--url", servers["tiny"].url, "--api-key-file", str(key_file), *flags)
        readiness = next(c for c in report["checks"] if c["name"] == "readiness")
        assert code == 5 and not readiness["passed"], flags
    code, report = _verify(
        capsys,
        "--url",
        servers["tiny"].url,
        "--api-key-file",
        str(key_file),
        "--expect-model",
        "tiny",
        "--expect-cache-mode",
        "5,4",
        "--expect-context",
        "4096",
    )
    assert code == 0


@pytest.mark.parametrize(
    ("spelling", "ready"), [("5,4", True), ("5, 4", True), (" 5,4", True), ("5,5", False)]
)
def test_up_and_verify_judge_the_same_model_answer_alike(servers, key_file, capsys, spelling, ready):
    """`deploy up` (wait_ready) and `deploy verify` share one readiness model: same verdict, any spelling."""
    url = servers["tiny"].url
    code, report = _verify(
        capsys, "--url", url, "--api-key-file", str(key_file), "--expect-cache-mode", spelling
    )
    readiness = next(c for c in report["checks"] if c["name"] == "readiness")
    assert readiness["passed"] is ready and (code == 0) is ready, readiness["detail"]
    expect = Expectations(model_id="tiny", cache_mode=spelling, context=4096)
    if ready:
        assert wait_ready(url, KEY, expect, timeout_s=10, poll_s=0.1).model["id"] == "tiny"
    else:
        with pytest.raises(VerificationFailed, match="cache_mode is '5,4', expected '5,5'"):
            wait_ready(url, KEY, expect, timeout_s=10, poll_s=0.1)


def test_cache_modes_compare_by_meaning():
    assert same_cache_mode("8,8", "Q8") and same_cache_mode("4,4", "q4") and same_cache_mode("FP16", "fp16")
    assert not same_cache_mode("5,4", "4,5") and not same_cache_mode("FP16", "8,8")
    assert not same_cache_mode(None, "5,4") and same_cache_mode("k5v4", "K5V4")  # unparseable: as text


def test_reasoning_in_content_fails_the_function_check(tmp_path, key_file, capsys):
    server = testing.start(tmp_path, api_key=KEY, model={"model_name": "tiny", "reasoning": False})
    try:
        code, report = _verify(capsys, "--url", server.url, "--api-key-file", str(key_file))
    finally:
        server.stop()
    function = next(c for c in report["checks"] if c["name"] == "function")
    assert code == 5 and "PR #295" in function["detail"]


@pytest.mark.parametrize(
    "parser,words",
    [
        ("none", "are in content: the server does not split reasoning"),  # no parser: markers in content
        (
            "no-end",
            "are in reasoning_content: the reasoning split missed a tag",
        ),  # the answer stuck in reasoning
    ],
)
def test_a_broken_reasoning_parser_fails_the_function_check(tmp_path, key_file, capsys, parser, words):
    """The test server's split is not correct by construction: with what a broken parser returns, verify fails;
    with TabbyAPI's split it passes."""
    for mode, expected in (("tabby", 0), (parser, 5)):
        folder = tmp_path / mode
        folder.mkdir()
        server = testing.start(
            folder,
            api_key=KEY,
            model={"model_name": "tiny", "reasoning": True},
            test_server={"reasoning_parser": mode},
        )
        try:
            code, report = _verify(capsys, "--url", server.url, "--api-key-file", str(key_file))
        finally:
            server.stop()
        function = next(c for c in report["checks"] if c["name"] == "function")
        assert code == expected and function["passed"] is (expected == 0), function
        if expected:
            assert words in function["detail"] and "</think>" in function["detail"]


def test_a_context_overflow_reads_as_tabbyapis_message(tmp_path):
    server = testing.start(
        tmp_path, api_key=KEY, model={"model_name": "tiny", "max_seq_len": 512, "cache_size": 512}
    )
    client = TabbyClient(server.url, KEY)
    try:
        with pytest.raises(ServerError) as error:
            client.next_token_logprobs(["x" * 600], 5)
    finally:
        client.close()
        server.stop()
    assert error.value.status == 400
    assert (
        "Prompt length 600 exceeds the available context size of 512 tokens (context_length_exceeded)"
        in str(error.value)
    )


def test_a_sticky_503_after_one_failed_generation_still_passes_liveness(tmp_path, key_file, capsys):
    """TabbyAPI keeps /health at 503 after one failed generation while it serves on: verify says so, and passes."""
    import httpx

    server = testing.start(tmp_path, api_key=KEY, model={"model_name": "tiny", "reasoning": True})
    try:
        failed = httpx.post(
            f"{server.url}/v1/completions",
            headers={"X-API-Key": KEY},
            json={"prompt": ERROR_TRIGGER, "max_tokens": 1},
        )
        assert failed.status_code == 503 and httpx.get(f"{server.url}/health").status_code == 503
        code, report = _verify(capsys, "--url", server.url, "--api-key-file", str(key_file))
    finally:
        server.stop()
    liveness = report["checks"][0]
    assert liveness["passed"] and "503" in liveness["detail"] and "generation error" in liveness["detail"]
    assert "one-token completion succeeds" in liveness["detail"]
    assert code == 0, report


def test_a_server_that_cannot_generate_fails_liveness(tmp_path, key_file, capsys):
    import httpx

    server = testing.start(
        tmp_path,
        api_key=KEY,
        model={"model_name": "tiny", "reasoning": True},
        test_server={"fail_generations": True},
    )
    try:
        # a client's request fails first (as measured: /health turns 503, /v1/model stays 200)
        failed = httpx.post(
            f"{server.url}/v1/completions", headers={"X-API-Key": KEY}, json={"prompt": "Hi", "max_tokens": 1}
        )
        assert failed.status_code == 503
        assert httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": KEY}).status_code == 200
        code, report = _verify(capsys, "--url", server.url, "--api-key-file", str(key_file))
    finally:
        server.stop()
    checks = {c["name"]: c for c in report["checks"]}
    assert (
        code == 5 and not checks["liveness"]["passed"] and "cannot generate" in checks["liveness"]["detail"]
    )
    assert "503" in checks["liveness"]["detail"] and "aborted" in checks["liveness"]["detail"]
    assert checks["readiness"]["passed"] and not checks["function"]["passed"]


def test_wait_covers_a_closed_port_during_model_load(tmp_path, key_file, capsys):
    server = testing.start(
        tmp_path,
        api_key=KEY,
        model={"model_name": "tiny", "reasoning": True},
        test_server={"load_delay_s": 1.5},
    )
    try:
        code, report = _verify(capsys, "--url", server.url, "--api-key-file", str(key_file), "--wait", "30")
    finally:
        server.stop()
    assert code == 0, report


def test_tokenizer_mismatch_fails_before_kl(servers, reference_file, key_file, tmp_path, capsys):
    import gzip

    data = json.loads(gzip.decompress(reference_file.read_bytes()))
    data["tokenizer"]["probe_ids_sha256"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    code, report = _verify(
        capsys,
        "--url",
        servers["tiny"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(other),
        "--max-kl",
        "1",
    )
    names = {c["name"]: c for c in report["checks"]}
    assert code == 5 and not names["tokenizer"]["passed"] and names["kl"]["skipped"]


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "127.0.0.1:5000"],
        ["--url", "http://127.0.0.1:1", "--max-kl", "-1"],
        ["--url", "http://127.0.0.1:1", "--reference", "/nonexistent/ref.json"],
        ["--url", "http://127.0.0.1:1", "--api-key-file", "/nonexistent/key"],
        ["--url", "http://127.0.0.1:1", "--prompts", "0"],
        ["--url", "http://127.0.0.1:1", "--expect-quant", "7bpw_nonexistent"],
    ],
)
def test_bad_input_exits_2_with_one_line(args, capsys):
    assert main(["verify", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deploy verify:") and "\n" not in err and "Traceback" not in err


def test_malformed_reference_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "glm-deploy-reference", "version": 99}))
    assert main(["verify", "--url", "http://127.0.0.1:1", "--reference", str(bad)]) == 2
    assert "version" in capsys.readouterr().err


def test_prompts_limits_the_spot_check(servers, reference_file, key_file, capsys):
    code, report = _verify(
        capsys,
        "--url",
        servers["tiny-8bpw"].url,
        "--api-key-file",
        str(key_file),
        "--reference",
        str(reference_file),
        "--max-kl",
        "1",
        "--prompts",
        "5",
    )
    assert code == 0
    assert len({p["prompt"] for p in report["per_position"]}) == 5


def test_a_choice_without_logprobs_is_asked_again_alone():
    """A one-token completion that ended on EOS carries no logprobs: the client retries that prefix by itself."""
    import httpx

    from toolkit.verify.client import TabbyClient

    calls: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        prompts = json.loads(request.content)["prompt"]
        calls.append(prompts)
        empty = len(calls) == 1
        choices = [
            {
                "index": i,
                "text": "",
                "logprobs": None
                if empty and i == 1
                else {
                    "tokens": ["x"],
                    "token_logprobs": [-0.1],
                    "top_logprobs": [{"x": -0.1, "y": -2.4}],
                    "text_offset": [0],
                },
            }
            for i in range(len(prompts))
        ]
        return httpx.Response(200, json={"choices": choices})

    client = TabbyClient("http://server", "k", transport=httpx.MockTransport(handler))
    result = client.next_token_logprobs(["a", "b", "c"], 2)
    assert calls == [["a", "b", "c"], ["b"]]
    assert all(entries == [("x", -0.1), ("y", -2.4)] for entries in result)

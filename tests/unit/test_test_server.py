"""The TabbyAPI-compatible test server: shapes and quirks the verify code (and other helpers' tests) rely on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.tabby_test_server import testing
from tests.tabby_test_server.app import ConfigError, load_config, prepare
from tests.tabby_test_server.model import TinyModel
from tests.tabby_test_server.server import ERROR_TRIGGER, OOM_MESSAGE
from toolkit.verify.checks import check_function, profile_reasoning_markers
from toolkit.verify.client import TabbyClient
from toolkit.verify.kl import full_kl

KEY = "server-test-key-77aa"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def server(tmp_path):
    running = testing.start(
        tmp_path, api_key=KEY, model={"model_name": "tiny-6bpw", "cache_mode": "6,5", "reasoning": True}
    )
    yield running
    running.stop()


def _post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"X-API-Key": key} if key else {}, timeout=30)


def test_auth_like_tabbyapi(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    missing = httpx.get(f"{server.url}/v1/model")
    assert missing.status_code == 401 and missing.json() == {"detail": "Please provide an API key"}
    assert httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": "nope"}).json() == {
        "detail": "Invalid API key"
    }
    assert httpx.get(f"{server.url}/v1/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": f"admin-{KEY}"}).status_code == 200
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None).status_code == 401


def test_model_card_reports_config(server):
    card = httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": KEY}).json()
    assert card["id"] == "tiny-6bpw"
    assert (
        card["parameters"]["max_seq_len"],
        card["parameters"]["cache_size"],
        card["parameters"]["cache_mode"],
    ) == (4096, 4096, "6,5")


def test_top_logprobs_are_keyed_by_decoded_strings_and_collide(server):
    model = TinyModel(bits=6)
    prompt = "Über die Brücke gehen wir nach Hause, während die Glocken läuten"
    body = {
        "prompt": prompt,
        "max_tokens": 1,
        "logprobs": 300,
        "temperature": 1,
        "top_p": 1,
        "top_k": 0,
        "min_p": 0,
    }
    top = _post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    logprobs = model.logprobs(model.tokenizer.encode(prompt))
    order = np.argsort(-logprobs, kind="stable")[:300]
    replacement = [logprobs[i] for i in order if model.tokenizer.pieces[i] == "\ufffd"]
    assert len(replacement) > 1, "the test needs colliding pieces in the top-K"
    assert len(top) == 300 - len(replacement) + 1
    assert top["\ufffd"] == pytest.approx(min(replacement))  # the dict keeps the last (smallest) duplicate
    assert next(iter(top)) == model.tokenizer.pieces[order[0]]


def test_list_prompt_gives_one_choice_per_prompt(server):
    data = _post(
        server, "/v1/completions", {"prompt": ["The river", "def f(x):"], "max_tokens": 1, "logprobs": 5}
    ).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["top_logprobs"][0]) <= 5 for c in data["choices"])
    assert _post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1}).status_code == 422


def test_chat_splits_reasoning_when_configured(server, tmp_path):
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 24,
        "logprobs": True,
        "top_logprobs": 3,
    }
    message = _post(server, "/v1/chat/completions", body).json()["choices"][0]
    assert message["message"]["reasoning_content"] and "<think>" not in (message["message"]["content"] or "")
    assert all(
        len(entry["top_logprobs"]) == 3 and "token_id" in entry for entry in message["logprobs"]["content"]
    )
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    raw = testing.start(raw_dir, api_key=KEY, model={"model_name": "tiny", "reasoning": False})
    try:
        plain = _post(raw, "/v1/chat/completions", body).json()["choices"][0]["message"]
    finally:
        raw.stop()
    # no parser: the reasoning the template opened stays in content, up to and with the model's </think>
    assert "</think>" in plain["content"] and plain["reasoning_content"] is None


def test_generation_error_makes_health_503_for_good(server):
    failed = _post(server, "/v1/completions", {"prompt": f"x {ERROR_TRIGGER}", "max_tokens": 1})
    assert failed.status_code == 503
    assert _post(server, "/v1/completions", {"prompt": "fine", "max_tokens": 1}).status_code == 200
    for _ in range(2):
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "generation error" in health.json()["issues"][0]["description"]


def test_context_overflow_is_tabbyapis_openai_shaped_400(tmp_path):
    # TabbyAPI common/errors.py: 400 {"error": {..., "code": "context_length_exceeded"}}, not FastAPI's {"detail"}
    running = testing.start(
        tmp_path,
        api_key=KEY,
        model={"model_name": "tiny", "max_seq_len": 512, "cache_size": 512, "chunk_size": 256},
    )
    try:
        long_prompt = _post(running, "/v1/completions", {"prompt": "x" * 600, "max_tokens": 1})
        assert long_prompt.status_code == 400 and long_prompt.json() == {
            "error": {
                "message": "Prompt length 600 exceeds the available context size of 512 tokens",
                "type": "invalid_request_error",
                "param": None,
                "code": "context_length_exceeded",
            }
        }
        # the first allocation (prompt - 1 + chunk_size, in 256-token pages) must fit the cache
        allocation = _post(
            running, "/v1/chat/completions", {"messages": [{"content": "x" * 300}], "max_tokens": 1}
        )
        assert allocation.status_code == 400 and allocation.json()["error"]["message"].startswith(
            "Initial job allocation requires 768 cache tokens"
        )
        # a max_tokens beyond the context is no error: the generation ends at max_seq_len
        long_answer = _post(running, "/v1/completions", {"prompt": "x" * 10, "max_tokens": 10**6}).json()
        assert long_answer["choices"][0]["finish_reason"] == "length"
        assert long_answer["usage"]["prompt_tokens"] + long_answer["usage"]["completion_tokens"] == 512
    finally:
        running.stop()


def test_max_batch_size_defaults_to_tabbyapis_128_and_cache_modes_keep_their_spelling(tmp_path):
    running = testing.start(tmp_path, api_key=KEY, model={"model_name": "tiny", "cache_mode": "5, 4"})
    try:
        card = httpx.get(f"{running.url}/v1/model", headers={"X-API-Key": KEY}).json()
    finally:
        running.stop()
    assert card["parameters"]["max_batch_size"] == 128  # backends/exllamav3/model.py, non-recurrent models
    assert card["parameters"]["cache_mode"] == "5, 4"  # accepted with spaces, reported as configured


def _poll(condition, timeout_s: float = 30.0) -> bool:
    """True as soon as condition() holds (polled every 50 ms), False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _health_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health").status_code
    except httpx.ConnectError:
        return None


def test_open_port_answers_503_until_the_model_is_loaded(tmp_path):
    server = testing.start(
        tmp_path, api_key=KEY, test_server={"load_delay_s": 1.0, "port_during_load": "open"}
    )
    try:
        early = httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": KEY})
        assert early.status_code == 503 and early.json() == {"detail": "No models are currently loaded."}
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert _poll(
            lambda: httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": KEY}).status_code == 200
        )
    finally:
        server.stop()


def test_closed_port_during_load_like_tabbyapi(tmp_path):
    server = testing.start(tmp_path, api_key=KEY, test_server={"load_delay_s": 1.0})
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
        assert _poll(lambda: _health_status(server.url) == 200)
    finally:
        server.stop()


def test_no_model_name_means_no_model(tmp_path):
    server = testing.start(tmp_path, api_key=KEY, model={"model_name": None})
    try:
        assert httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": KEY}).status_code == 503
    finally:
        server.stop()


def _run_server_process(
    workdir: Path, config: dict, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess:
    (workdir / "config.yml").write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "tests.tabby_test_server"],
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_oom_mode_prints_exllamav3_message_and_exits(tmp_path):
    config = {"network": {"port": testing.free_port()}, "model": {"model_name": "tiny"}}
    by_env = _run_server_process(tmp_path, config, {"GLM_TEST_SERVER_OOM": "1"})
    assert by_env.returncode == 1 and f"RuntimeError: {OOM_MESSAGE}" in by_env.stderr
    by_config = _run_server_process(tmp_path, {**config, "test_server": {"oom": True}})
    assert by_config.returncode == 1 and OOM_MESSAGE in by_config.stderr


@pytest.mark.parametrize(
    "model, message",
    [
        ({"model_name": "tiny", "cache_size": 1000}, "multiple of 256"),
        ({"model_name": "tiny", "cache_mode": "k5v4"}, "invalid cache_mode"),
        ({"model_name": "0.4bpw-tiny"}, "rounds to 0"),
        ({"model_name": "GLM-4.7-EXL3-24bpw"}, "rounds to 24"),
    ],
)
def test_invalid_config_refuses_to_start(tmp_path, model, message):
    result = _run_server_process(tmp_path, {"network": {"port": testing.free_port()}, "model": model})
    assert result.returncode == 1 and message in result.stderr


def test_missing_api_tokens_are_generated(tmp_path):
    prepared = prepare({"model": {"model_name": "tiny"}}, tmp_path)
    tokens = yaml.safe_load((tmp_path / "api_tokens.yml").read_text())
    assert prepared.state.api_keys == {tokens["api_key"]} and prepared.state.admin_key == tokens["admin_key"]


def test_weights_degrade_as_bits_drop():
    full = TinyModel()
    ids = full.tokenizer.encode("The light on the water, the people of the city and the river at night")
    kl = {
        bits: np.mean(
            [
                full_kl(full.logprobs(ids[:n]), TinyModel(bits=bits).logprobs(ids[:n]))
                for n in range(4, len(ids))
            ]
        )
        for bits in (8, 6, 4, 3)
    }
    assert 0 < kl[8] < kl[6] < kl[4] < kl[3]


def test_tokenizer_round_trips_multilingual_text():
    tokenizer = TinyModel().tokenizer
    for text in ("héllo wörld", "清晨的市场", "def f(x):\n    return x", "<think>a</think>b"):
        assert tokenizer.decode(tokenizer.encode(text)) == text


# --- bit width -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("3.84bpw-tuned", 4),
        ("2.10bpw-tuned", 2),
        ("2.57bpw-tuned", 3),
        ("3.15bpw-tuned", 3),
        ("GLM-4.7-EXL3-4bpw_H6", 4),
        ("8bpw_H8", 8),
        ("tiny-6bpw", 6),
        ("GLM-4.7-EXL3", None),
        ("tiny", None),
    ],
)
def test_bits_come_from_the_leading_bpw_of_the_model_name(tmp_path, name, bits):
    # the deploy tests name the model after the quant branch (TabbyAPI's model_name is the folder)
    assert prepare({"model": {"model_name": name}}, tmp_path).options.bits == bits


@pytest.mark.parametrize(("setting", "bits"), [(5, 5), (3.84, 4), ("2.5", 3), ("none", None), ("None", None)])
def test_explicit_bits_win_over_the_model_name(tmp_path, setting, bits):
    config = {"model": {"model_name": "3.84bpw-tuned"}, "test_server": {"bits": setting}}
    assert prepare(config, tmp_path).options.bits == bits


def test_bits_env_overrides_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "config.yml").write_text(
        yaml.safe_dump({"model": {"model_name": "8bpw_H8"}, "test_server": {"bits": 6}})
    )
    monkeypatch.setenv("GLM_TEST_SERVER_BITS", "2.57")
    assert prepare(load_config(tmp_path), tmp_path).options.bits == 3


@pytest.mark.parametrize("setting", [1, 17, "four", True])
def test_unusable_bits_are_a_config_error(tmp_path, setting):
    with pytest.raises(ConfigError, match="test_server.bits"):
        prepare({"model": {"model_name": "tiny"}, "test_server": {"bits": setting}}, tmp_path)


def test_a_tuned_quant_name_serves_the_rounded_width(tmp_path):
    prompt = "The river runs through the city"
    running = testing.start(tmp_path, api_key=KEY, model={"model_name": "3.84bpw-tuned"})
    try:
        body = {"prompt": prompt, "max_tokens": 1, "logprobs": 5, "temperature": 0}
        top = _post(running, "/v1/completions", body).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    finally:
        running.stop()
    served = sorted(top.values(), reverse=True)
    for bits, same in ((4, True), (3, False), (None, False)):
        model = TinyModel(bits=bits)
        expected = np.sort(model.logprobs(model.tokenizer.encode(prompt)))[::-1][: len(served)]
        assert np.allclose(served, expected) is same, bits


# --- reasoning structure ------------------------------------------------------------------------------------------


def _chat(server, body: dict) -> dict:
    return _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]


@pytest.mark.parametrize("bits", [2, 3])
def test_chat_reasoning_is_one_well_formed_block_then_content_at_any_bit_width(tmp_path, bits):
    # at 2 bits, free sampling used to put a stray </think> into the content (seed 0, the verify prompt)
    prompts = ["Reply with one short sentence: what is the capital of France?", "hello", "def f(x):"]
    for seed in range(4):
        raw_dir, split_dir = tmp_path / f"raw{seed}", tmp_path / f"split{seed}"
        raw_dir.mkdir()
        split_dir.mkdir()
        raw = testing.start(
            raw_dir,
            api_key=KEY,
            model={"model_name": "tiny", "reasoning": False},
            test_server={"bits": bits, "seed": seed},
        )
        split = testing.start(
            split_dir,
            api_key=KEY,
            model={"model_name": "tiny", "reasoning": True},
            test_server={"bits": bits, "seed": seed},
        )
        try:
            for prompt in prompts:
                for temperature, max_tokens in ((0, 64), (1.0, 64), (2.0, 24), (1.0, 5), (1.0, 3)):
                    body = {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens,
                        "temperature": temperature,
                    }
                    text = _chat(raw, body)[
                        "content"
                    ]  # the template opened <think>: reasoning, </think>, content
                    assert "<think>" not in text and text.count("</think>") == 1, text
                    reasoning, end, content = text.partition("</think>")
                    assert end and content, text
                    message = _chat(split, body)
                    assert (message["reasoning_content"] or "", message["content"]) == (reasoning, content)
        finally:
            raw.stop()
            split.stop()


def _reasoning_server(tmp_path, name: str, model: dict | None = None, test_server: dict | None = None):
    folder = tmp_path / name
    folder.mkdir()
    return testing.start(
        folder,
        api_key=KEY,
        model={"model_name": "tiny", "reasoning": True, **(model or {})},
        test_server={"bits": 4, **(test_server or {})},
    )


BODY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 24, "temperature": 0}


def test_start_in_reasoning_follows_tabbyapi(tmp_path):
    """auto: the prompt ends in the template's <think>, so the output is reasoning up to </think>; never: it is read
    as content (the marker consumed, nothing left to show the split went wrong); always: reasoning even when the
    template closed the block (enable_thinking false)."""
    raw = _reasoning_server(tmp_path, "raw", {"reasoning": False})
    servers = {
        mode: _reasoning_server(tmp_path, mode, {"start_in_reasoning": mode}) for mode in ("auto", "never")
    }
    servers["always"] = _reasoning_server(
        tmp_path, "always", {"start_in_reasoning": "always"}, {"think": False}
    )
    servers["bogus"] = _reasoning_server(tmp_path, "bogus", {"start_in_reasoning": "sometimes"})
    raw_without_thinking = _reasoning_server(tmp_path, "raw-off", {"reasoning": False}, {"think": False})
    try:
        reasoning, _, content = _chat(raw, BODY)["content"].partition("</think>")
        auto, never, always, bogus = (_chat(servers[m], BODY) for m in ("auto", "never", "always", "bogus"))
        plain = _chat(raw_without_thinking, BODY)["content"]
    finally:
        for running in (raw, raw_without_thinking, *servers.values()):
            running.stop()
    assert reasoning and content
    assert (auto["reasoning_content"], auto["content"]) == (reasoning, content)
    assert bogus == auto  # an invalid value is TabbyAPI's "auto" (with a warning)
    assert never["reasoning_content"] is None and never["content"] == reasoning + content
    assert always["reasoning_content"] == plain and always["content"] is None


def test_enable_thinking_false_closes_the_block_in_the_prompt(tmp_path):
    running = _reasoning_server(tmp_path, "split")
    try:
        message = _chat(running, {**BODY, "template_vars": {"enable_thinking": False}})
        tokens = _post(running, "/v1/token/encode", {"text": "<|assistant|>\n</think>"}).json()["tokens"]
    finally:
        running.stop()
    assert message["reasoning_content"] is None and message["content"]
    assert tokens[-1] == 2  # </think> is one special token, as in GLM-4.7's tokenizer


@pytest.mark.parametrize(
    "parser,check",
    [
        # TabbyAPI without the reasoning parser: markers and reasoning in content
        ("none", lambda m, r, c: m["reasoning_content"] is None and m["content"] == r + "</think>" + c),
        # the end tag missed: the answer stays in reasoning_content, with the marker
        ("no-end", lambda m, r, c: m["reasoning_content"] == r + "</think>" + c and m["content"] is None),
    ],
)
def test_a_broken_reasoning_parser_mode_returns_what_that_parser_returns(tmp_path, parser, check):
    good = _reasoning_server(tmp_path, "good")
    broken = _reasoning_server(tmp_path, "broken", test_server={"reasoning_parser": parser})
    try:
        right = _chat(good, BODY)
        wrong = _chat(broken, BODY)
    finally:
        good.stop()
        broken.stop()
    assert right["reasoning_content"] and right["content"]
    assert check(wrong, right["reasoning_content"], right["content"])


def test_an_unknown_reasoning_parser_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="reasoning_parser"):
        prepare({"model": {"model_name": "tiny"}, "test_server": {"reasoning_parser": "maybe"}}, tmp_path)


def test_without_thinking_no_marker_is_ever_sampled(tmp_path):
    running = testing.start(
        tmp_path,
        api_key=KEY,
        model={"model_name": "tiny", "reasoning": True},
        test_server={"bits": 2, "think": False},
    )
    try:
        for temperature in (0, 1.0, 2.0):
            body = {
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 64,
                "temperature": temperature,
            }
            message = _chat(running, body)
            assert message["content"] and message["reasoning_content"] is None
            assert "<think>" not in message["content"] and "</think>" not in message["content"]
    finally:
        running.stop()


@pytest.mark.parametrize("seed", range(6))
def test_verify_function_check_passes_a_2_bit_server_with_a_reasoning_parser(tmp_path, seed):
    running = testing.start(
        tmp_path, api_key=KEY, model={"model_name": "2bpw_H6", "reasoning": True}, test_server={"seed": seed}
    )
    client = TabbyClient(running.url, KEY)
    try:
        check = check_function(client, profile_reasoning_markers("glm-4.7"))
    finally:
        client.close()
        running.stop()
    assert check.passed, check.detail
    assert "reasoning_content" in check.detail

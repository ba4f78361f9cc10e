"""`deploy bench` against the in-process TabbyAPI-compatible test server: what a user relies on.

Timing assertions are deliberately loose (speed is a benchmark; these check that the arithmetic is wired to the
right events): the server paces tokens, so TTFT cannot be shorter than its first-token delay, and TPOT and ITL
must land near its per-token delay.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.tabby_test_server import testing
from tests.tabby_test_server.server import ERROR_TRIGGER
from toolkit.bench import ceiling as ceiling_module
from toolkit.bench.endpoint import make_client, stream_request
from toolkit.bench.shaping import request_body
from toolkit.cli import main

KEY = "bench-test-key-5f3a9c"
STATS = ("mean", "median", "std", "p90", "p99")
VLLM_LEVEL_FIELDS = {  # `vllm bench serve --save-result` names (vllm/benchmarks/serve.py)
    "date", "endpoint_type", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_concurrent_requests",
}  # fmt: skip
LATENCY_FIELDS = {f"{stat}_{metric}_ms" for stat in STATS for metric in ("ttft", "tpot", "itl", "e2el")}
FIRST_TOKEN_DELAY_S = 0.05
TOKEN_DELAY_S = 0.01


def start(tmp_path, model=None, **test_server):
    model = {"max_batch_size": 8, **(model or {})}
    return testing.start(tmp_path, api_key=KEY, model=model, test_server=test_server)


@pytest.fixture()
def paced(tmp_path):
    server = start(
        tmp_path, first_token_delay_s=FIRST_TOKEN_DELAY_S, token_delay_s=TOKEN_DELAY_S, think=False
    )
    yield server
    server.stop()


@pytest.fixture()
def key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(0o600)
    return path


def bench(capsys, url, key_file, flags=""):
    """Run `deploy bench` with flags (a string, split on spaces); exit code, stdout, stderr."""
    code = main(["bench", "--url", url, "--api-key-file", str(key_file), "--seed", "11", *flags.split()])
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err, "the API key must never be printed"
    return code, captured.out, captured.err


def generations(server) -> int:
    return server.state.served["POST /v1/completions"] + server.state.served["POST /v1/chat/completions"]


def test_completion_sweep_measures_known_delays_and_sends_exactly_what_it_said(paced, key_file, capsys):
    flags = "--concurrency 1,2 --input-len 200 --output-len 12 --num-prompts 3 --warmup 1 --json"
    code, out, _ = bench(capsys, paced.url, key_file, flags + " --metadata tabbyapi=e632af4 exllamav3=1.4.2")
    assert code == 0
    sweep = json.loads(out)
    assert sweep["max_concurrency"] == [1, 2] and sweep["input_len_exact"] is True
    assert sweep["metadata"] == {"tabbyapi": "e632af4", "exllamav3": "1.4.2"}
    assert generations(paced) == sweep["max_requests"] == 1 + 3 + 3
    for level in sweep["levels"]:
        assert VLLM_LEVEL_FIELDS | LATENCY_FIELDS <= set(level)
        assert (level["completed"], level["failed"], level["sent"]) == (3, 0, 3)
        assert level["total_input_tokens"] == 3 * 200, "every prompt is exactly --input-len server tokens"
        assert level["total_output_tokens"] == 3 * 12 and level["output_tokens_counted_from"] == "usage"
        assert level["streamed_chunks"] == 3 * 12  # one token per event on this server
        assert level["median_ttft_ms"] >= FIRST_TOKEN_DELAY_S * 1000
        assert 0.5 * TOKEN_DELAY_S * 1000 <= level["median_tpot_ms"] <= 5 * TOKEN_DELAY_S * 1000
        assert 0.5 * TOKEN_DELAY_S * 1000 <= level["median_itl_ms"] <= 5 * TOKEN_DELAY_S * 1000
        assert level["median_e2el_ms"] >= (FIRST_TOKEN_DELAY_S + 11 * TOKEN_DELAY_S) * 1000
        assert level["request_goodput"] is None  # no --slo
    assert sweep["levels"][1]["max_concurrent_requests"] == 2


def test_chat_with_several_tokens_per_event_counts_tokens_from_usage(tmp_path, key_file, capsys):
    server = start(tmp_path, token_delay_s=TOKEN_DELAY_S, tokens_per_chunk=2, think=False)
    flags = "--endpoint chat --concurrency 2 --input-len 150 --output-len 10 --num-prompts 4 --json"
    try:
        code, out, _ = bench(capsys, server.url, key_file, flags + " --slo ttft:60000,tpot:60000")
    finally:
        server.stop()
    assert code == 0
    sweep = json.loads(out)
    level = sweep["levels"][0]
    assert sweep["endpoint_type"] == level["backend"] == "openai-chat"
    assert sweep["prompt_overhead_tokens"] > 0, "the chat template's generation prompt is measured"
    assert level["total_input_tokens"] == 4 * 150, (
        "and taken off, so the served prompt is exactly --input-len"
    )
    assert level["total_output_tokens"] == 4 * 10 and level["streamed_chunks"] == 4 * 5
    assert level["median_itl_ms"] >= 1.5 * TOKEN_DELAY_S * 1000, "ITL is per event: two tokens each"
    assert level["median_tpot_ms"] < level["median_itl_ms"], "TPOT is per token"
    assert level["request_goodput"] == pytest.approx(level["request_throughput"])


def test_table_for_people(paced, key_file, capsys):
    flags = "--concurrency 1,2 --input-len 64 --output-len 4 --num-prompts 2 --warmup 0 --slo ttft:1"
    code, out, err = bench(capsys, paced.url, key_file, flags)
    assert code == 0
    assert "input 64 tokens (exact, server tokenizer), output 4 tokens" in out
    assert "goodput req/s" in out and "TTFT" in out and "E2EL" in out
    assert "at most 4 requests" in err and "concurrency 2: 2 ok, 0 failed" in err


def test_duration_stops_starting_requests(tmp_path, key_file, capsys):
    server = start(tmp_path, token_delay_s=0.02)
    flags = "--concurrency 2 --input-len 32 --output-len 20 --num-prompts 12 --duration 0.2 --warmup 0 --json"
    try:
        code, out, _ = bench(capsys, server.url, key_file, flags)
        assert code == 0
        level = json.loads(out)["levels"][0]
        assert 2 <= level["sent"] <= 4 and level["completed"] == level["sent"]
        assert generations(server) == level["sent"]
    finally:
        server.stop()


def test_timeouts_and_server_errors_are_counted_not_fatal(tmp_path, key_file, capsys):
    # chunk_size 256: a job's first allocation (prompt - 1 + chunk_size) must fit the 512-token cache (TabbyAPI)
    server = start(
        tmp_path, model={"max_seq_len": 512, "cache_size": 512, "chunk_size": 256}, token_delay_s=0.5
    )
    try:
        flags = (
            "--concurrency 1 --input-len 32 --output-len 8 --num-prompts 2 --warmup 0 --request-timeout 0.2"
        )
        code, out, _ = bench(capsys, server.url, key_file, flags + " --json")
        assert code == 0
        level = json.loads(out)["levels"][0]
        assert (level["completed"], level["failed"]) == (0, 2)
        assert level["errors_by_message"] == {"no end of stream within --request-timeout 0.2 s": 2}
        assert level["mean_ttft_ms"] is None and level["request_throughput"] == 0
        # the chat template's tokens and a first 256-token chunk need more than the 512-token cache: the server
        # answers TabbyAPI's 400 (context_length_exceeded) to each request
        flags = "--endpoint chat --concurrency 1 --input-len 500 --output-len 12 --num-prompts 2"
        code, out, _ = bench(capsys, server.url, key_file, flags + " --warmup 0 --json")
        assert code == 0
        [(message, count)] = json.loads(out)["levels"][0]["errors_by_message"].items()
        assert message.startswith("HTTP 400: Initial job allocation requires") and count == 2
        sent = generations(server)
        code, _, err = bench(capsys, server.url, key_file, flags + " --warmup 2")
        assert code == 5 and err.splitlines()[-1].startswith("deploy bench: every warm-up request")
        assert generations(server) == sent + 2, "nothing is sent after a failed warm-up"
    finally:
        server.stop()


def test_an_error_inside_the_stream_fails_that_request(paced):
    async def one():
        async with make_client(paced.url, KEY, 30, 1) as http:
            body = request_body("completions", None, f"hello {ERROR_TRIGGER}", 8)
            return await stream_request(http, "/v1/completions", body, 0.0, 0.0)

    record = asyncio.run(one())
    assert not record.ok and record.error.startswith("Completion aborted")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--concurrency 0", "--concurrency must be between 1 and 1024"),
        ("--concurrency 1,x", "--concurrency 'x' is not a whole number"),
        ("--concurrency 2,2", "repeats a level"),
        ("--slo ttft", "--slo 'ttft' is not NAME:MS"),
        ("--slo itl:5", "--slo 'itl:5' is not NAME:MS"),
        ("--slo ttft:-1", "--slo ttft must be a positive number"),
        ("--input-len 0", "--input-len must be between 1"),
        ("--duration -1", "--duration must be a positive number of seconds"),
        ("--endpoint embeddings", "--endpoint 'embeddings' is not one of completions, chat"),
        ("--num-prompts lots", "--num-prompts 'lots' is not a whole number"),
        ("--metadata tabbyapi", "--metadata 'tabbyapi' is not KEY=VALUE"),
        ("--input-len 4000 --output-len 200", "exceed the server's max_seq_len 4096"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_sends_nothing(paced, key_file, capsys, flags, message):
    code, out, err = bench(capsys, paced.url, key_file, "--json " + flags)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("deploy bench: ") and message in err
    assert generations(paced) == 0


def test_bad_url_and_missing_key_file_are_bad_input(tmp_path, capsys):
    assert main(["bench", "--url", "ftp://127.0.0.1:1"]) == 2
    assert main(["bench", "--url", "http://127.0.0.1:1", "--api-key-file", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "is not an http(s) URL" in err and "cannot read --api-key-file" in err


def test_unreachable_endpoint_exits_4(key_file, capsys):
    code, out, err = bench(capsys, f"http://127.0.0.1:{testing.free_port()}", key_file, "--json")
    assert code == 4 and out == "" and err.startswith("deploy bench: cannot reach") and err.count("\n") == 1


def test_rejected_key_exits_2_without_printing_either_key(paced, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-key-8d1e")
    code = main(["bench", "--url", paced.url, "--api-key-file", str(wrong)])
    err = capsys.readouterr().err
    assert code == 2 and "rejected the API key" in err and "not-the-key-8d1e" not in err and KEY not in err


def test_out_writes_the_json_atomically_and_ignores_proxies_from_the_environment(
    paced, key_file, tmp_path, capsys, monkeypatch
):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a proxied request would fail
    out_file = tmp_path / "results" / "bench.json"
    flags = f"--concurrency 1 --input-len 32 --output-len 4 --num-prompts 2 --json --out {out_file}"
    code, out, _ = bench(capsys, paced.url, key_file, flags)
    assert code == 0 and json.loads(out_file.read_text()) == json.loads(out)
    assert json.loads(out)["levels"][0]["completed"] == 2
    assert KEY not in out_file.read_text() and list(out_file.parent.iterdir()) == [out_file]
    assert main(["bench", "--url", paced.url, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_level_near_the_instrument_ceiling_is_flagged(paced, key_file, tmp_path, capsys, monkeypatch):
    stored = tmp_path / "bench_ceiling.yaml"
    stored.write_text(
        "requests_per_s: 2\nstreamed_tokens_per_s: 100000\nmachine: a slow test client\n"
        "measured: '2026-12-02'\nrecord: none\n"
    )
    monkeypatch.setattr(ceiling_module, "CEILING_FILE", stored)
    flags = "--concurrency 1 --input-len 32 --output-len 2 --num-prompts 3 --warmup 0 --json"
    code, out, err = bench(capsys, paced.url, key_file, flags)
    sweep = json.loads(out)
    warning = sweep["levels"][0]["instrument_ceiling_warning"]
    assert (
        code == 0 and "within 2x of the load generator's own ceiling" in warning and "requests/s" in warning
    )
    assert "a slow test client" in warning and warning in sweep["warnings"] and "warning: within 2x" in err
    assert sweep["instrument_ceiling"]["requests_per_s"] == 2
    stored.write_text(stored.read_text().replace("requests_per_s: 2", "requests_per_s: 100000"))
    _, out, _ = bench(capsys, paced.url, key_file, flags)
    assert json.loads(out)["levels"][0]["instrument_ceiling_warning"] is None

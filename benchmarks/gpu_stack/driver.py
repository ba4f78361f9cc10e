"""The image's userland on the GPU: rendered config.yml + api_tokens.yml, TabbyAPI started as the image starts it,
a GLM-4.7-shaped scripted model, `deploy verify` with every check, the raw reasoning split, and what a failed
generation does to /health (issue 11 items 1, 3, 4). Run by run.sh; writes everything under --out as it goes.

Phases (each checks the time left):
  reference   `deploy reference compute` on the served folder (same weights, exllamav3 in-process)
  serve       TabbyAPI from the rendered Dockerfile's ENV/WORKDIR/USER/CMD, rendered config.yml unchanged
  verify      `deploy verify --json` with liveness, readiness (--expect-model/--expect-cache-mode/--expect-context),
              function, tokenizer and KL
  chat        raw /v1/chat/completions answers (non-streaming, streaming, enable_thinking false)
  health      requests that make generation raise inside TabbyAPI's generation loop, /health before and after,
              the next normal completion, /v1/model; then a fresh server whose GPU memory is taken by another
              process (can it still generate? does /health or a completion probe show it?)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import image_launch as il

URL = "http://127.0.0.1:5000"
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
FUNCTION_PROMPT = "Reply with one short sentence: what is the capital of France?"  # verify's function prompt
HOG = r"""
import sys, time, torch
blocks, total = [], 0
for size in (1 << 30, 1 << 26, 1 << 21):
    while True:
        try:
            blocks.append(torch.empty(size, dtype=torch.uint8, device="cuda:0")); total += size
        except torch.cuda.OutOfMemoryError:
            break
free, all_ = torch.cuda.mem_get_info(0)
print(f"HOG holds {total >> 20} MiB; device free now {free >> 20} MiB of {all_ >> 20}", flush=True)
open(sys.argv[1], "w").write(str(total))
time.sleep(3600)
"""


class Clock:
    """Seconds left before the deadline."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def snap_env() -> dict[str, str]:
    """The project's code from the frozen snapshot (PYTHONPATH set by run.sh), cwd never on sys.path (-P)."""
    return dict(os.environ)


def deploy(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`deploy ARGS` from the snapshot."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "toolkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=snap_env(),
        check=False,
    )


def exchange(
    client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60
) -> dict[str, Any]:
    """One request, recorded: status, body (JSON or text), seconds; never raises."""
    started = time.monotonic()
    try:
        response = client.request(method, path, json=body, timeout=timeout)
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.text[:4000]
        return {
            "request": f"{method} {path}",
            "status": response.status_code,
            "body": payload,
            "seconds": round(time.monotonic() - started, 3),
        }
    except httpx.HTTPError as error:
        return {
            "request": f"{method} {path}",
            "status": None,
            "error": f"{type(error).__name__}: {error}",
            "seconds": round(time.monotonic() - started, 3),
        }


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat completion: every SSE data line, and the reasoning/content deltas joined."""
    lines: list[str] = []
    reasoning, content = [], []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        status = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            lines.append(data)
            if data == "[DONE]":
                continue
            try:
                delta = (json.loads(data).get("choices") or [{}])[0].get("delta") or {}
            except ValueError:
                continue
            reasoning.append(delta.get("reasoning_content") or "")
            content.append(delta.get("content") or "")
    return {
        "status": status,
        "chunks": lines,
        "reasoning_content": "".join(reasoning),
        "content": "".join(content),
    }


def safe_stream_chat(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """stream_chat that records a transport error instead of raising."""
    try:
        return stream_chat(client, body)
    except httpx.HTTPError as error:
        return {
            "status": None,
            "error": f"{type(error).__name__}: {error}",
            "reasoning_content": "",
            "content": "",
        }


def fatal_count(log_path: Path) -> int:
    """How many times TabbyAPI logged its generation-loop failure."""
    return log_path.read_text(errors="replace").count("FATAL ERROR with generation")


def health(client: httpx.Client) -> dict[str, Any]:
    """/health status and body."""
    return exchange(client, "GET", "/health", timeout=10)


def normal_completion(client: httpx.Client) -> dict[str, Any]:
    """The probe a healthcheck could send: a 1-token completion."""
    return exchange(
        client,
        "POST",
        "/v1/completions",
        {"prompt": "The capital of France is", "max_tokens": 1, "stream": False, **NEUTRAL},
        timeout=30,
    )


def start_server(
    spec: il.ImageSpec, tabby_log: Path, clock: Clock, results: dict[str, Any], key: str
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start as the image's USER (once more as root if that cannot come up: recorded)."""
    proc, ready = il.start_and_wait(spec, tabby_log, URL, key, min(150.0, clock.left() - 30))
    if ready.get("as_image_user_failed"):
        results.setdefault("notes", []).append(
            f"server as {spec.user} failed ({ready['as_image_user_failed']}); ran as root"
        )
    return proc, ready


def health_experiments(client: httpx.Client, tabby_log: Path, model_vocab: int) -> list[dict[str, Any]]:
    """Requests that may make generation raise inside the loop; after each: /health, a normal completion, /v1/model."""
    steps: list[dict[str, Any]] = [
        {
            "step": "baseline",
            "health": health(client),
            "completion": normal_completion(client),
            "fatal_logged": fatal_count(tabby_log),
        }
    ]
    candidates = [
        (
            "top-K logprobs beyond the tokenizer's ids (padded vocabulary)",
            {"prompt": "The capital of France is", "max_tokens": 1, "logprobs": model_vocab, **NEUTRAL},
        ),
        (
            "the same, streamed",
            {
                "prompt": "The capital of France is",
                "max_tokens": 1,
                "logprobs": model_vocab,
                "stream": True,
                **NEUTRAL,
            },
        ),
        (
            "logit_bias banning every id (-1e39 = -inf in float32)",
            {
                "prompt": "The capital of France is",
                "max_tokens": 4,
                "logit_bias": {str(i): -1e39 for i in range(model_vocab)},
                **NEUTRAL,
            },
        ),
        (
            "json_schema that no token sequence can satisfy",
            {
                "prompt": "The capital of France is",
                "max_tokens": 8,
                **NEUTRAL,
                "json_schema": {"type": "string", "pattern": "^\\u0000{3}$", "minLength": 3, "maxLength": 3},
            },
        ),
    ]
    for name, body in candidates:
        before = fatal_count(tabby_log)
        answer = exchange(client, "POST", "/v1/completions", body, timeout=60)
        if isinstance(answer.get("body"), dict) and "choices" in answer["body"]:
            choices = answer["body"]["choices"]
            answer["body"] = {
                "choices_text": [c.get("text") for c in choices],
                "finish_reason": [c.get("finish_reason") for c in choices],
                "note": "logprobs omitted",
            }
        time.sleep(1.0)
        step = {
            "step": name,
            "answer": answer,
            "fatal_logged_by_this": fatal_count(tabby_log) - before,
            "health_after": health(client),
        }
        time.sleep(2.0)  # TabbyAPI recreates the generator in the background
        step["completion_after"] = normal_completion(client)
        step["health_after_completion"] = health(client)
        step["model_after"] = exchange(client, "GET", "/v1/model", timeout=10)
        steps.append(step)
        log(
            f"health step {name!r}: HTTP {answer.get('status')}, fatal +{step['fatal_logged_by_this']}, "
            f"/health {step['health_after']['status']}, next completion {step['completion_after']['status']}"
        )
    time.sleep(5.0)
    steps.append(
        {
            "step": "final, ~5 s after the last request",
            "health": health(client),
            "completion": normal_completion(client),
            "model": exchange(client, "GET", "/v1/model")["status"],
        }
    )
    return steps


def memory_taken_experiment(
    spec: il.ImageSpec, tabby_log: Path, work: Path, clock: Clock, results: dict[str, Any], key: str
) -> dict[str, Any]:
    """A fresh server, then another process takes every free byte of GPU memory: can it generate? what shows it?"""
    record: dict[str, Any] = {}
    quiet = os.environ.get(
        "GLM_GPU_QUIET_FLAG"
    )  # another job on this GPU (quant conversions) must finish first
    if quiet:
        deadline = time.monotonic() + min(120.0, clock.left() - 60)
        while not Path(quiet).exists() and time.monotonic() < deadline:
            time.sleep(1.0)
        if not Path(quiet).exists():
            return {"skipped": f"{quiet} did not appear: another job still uses the GPU"}
    proc, ready = start_server(spec, tabby_log, clock, results, key)
    record["ready"] = {k: v for k, v in ready.items() if k != "model"}
    if not ready["ready"]:
        il.stop(proc)
        return record
    flag = work / "hog.ready"
    flag.unlink(missing_ok=True)
    hog_log = open(work / "hog.log", "wb")  # noqa: SIM115 - the hog writes it until stopped
    hog = subprocess.Popen(
        [sys.executable, "-c", HOG, str(flag)],
        stdout=hog_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline and hog.poll() is None:
            time.sleep(0.2)
        record["hog_mib"] = int(flag.read_text()) >> 20 if flag.exists() else None
        with httpx.Client(base_url=URL, headers={"X-API-Key": key}) as client:
            probes = []
            for n in range(3):
                before = fatal_count(tabby_log)
                probe = {"n": n, "completion": normal_completion(client)}
                long_body = {
                    "prompt": "The capital of France is Paris. " * 400,
                    "max_tokens": 16,
                    "stream": False,
                    **NEUTRAL,
                }
                probe["long_completion"] = exchange(client, "POST", "/v1/completions", long_body, timeout=30)
                time.sleep(1.0)
                probe["fatal_logged"] = fatal_count(tabby_log) - before
                probe["health"] = health(client)
                probe["model"] = exchange(client, "GET", "/v1/model", timeout=10)["status"]
                probes.append(probe)
            record["while_memory_taken"] = probes
            il.stop(hog)
            time.sleep(2.0)
            record["after_release"] = {
                "completion": normal_completion(client),
                "long_completion": exchange(
                    client,
                    "POST",
                    "/v1/completions",
                    {
                        "prompt": "Paris is the capital of France. " * 400,
                        "max_tokens": 16,
                        "stream": False,
                        **NEUTRAL,
                    },
                    timeout=30,
                ),
                "health": health(client),
            }
    finally:
        il.stop(hog)
        hog_log.close()
        record["server_exit"] = il.stop(proc)
    record["hog_log"] = (work / "hog.log").read_text(errors="replace")[-2000:]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the scripted model folder")
    parser.add_argument("--render", type=Path, required=True, help="the `deploy render` output folder")
    parser.add_argument("--tabby", type=Path, required=True, help="TabbyAPI source tree")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/gpu_stack")
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"phases": {}}

    def save() -> None:
        tmp = args.out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(args.out / "results.json")

    spec = il.image_spec(args.render / "Dockerfile")
    results["image_spec"] = spec.__dict__
    config = il.prepare_app(spec, args.tabby, args.render, args.model)
    key = il.api_key(spec)
    keys = il.secrets(spec)
    served = Path(config["model"]["model_dir"]) / config["model"]["model_name"]
    results["app"] = {
        "workdir": spec.workdir,
        "config_yml": (Path(spec.workdir) / "config.yml").read_text(),
        "api_tokens_mode": il.file_mode(Path(spec.workdir) / "api_tokens.yml"),
        "model_link": f"{served} -> {args.model.resolve()}",
    }
    script = json.loads((args.model / "script.json").read_text())
    results["script"] = {
        k: script[k]
        for k in ("script_tokens", "reasoning", "answer", "min_margin_nats", "tokenizer_vocab", "model_vocab")
    }
    save()

    # reference: the served folder through the same path the server reads
    reference = args.out / "reference-scripted.json.gz"
    started = time.monotonic()
    done = deploy(["reference", "compute", "--model-dir", str(served), "--out", str(reference)], 150)
    results["phases"]["reference"] = {
        "exit": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "stdout": done.stdout[-1500:],
        "stderr": done.stderr[-3000:],
    }
    log(f"reference compute exit {done.returncode} in {time.monotonic() - started:.1f} s")
    save()

    tabby_log = args.out / "tabby.log"
    proc, ready = start_server(spec, tabby_log, clock, results, key)
    results["phases"]["serve"] = {k: v for k, v in ready.items()}
    log(f"server ready={ready['ready']} in {ready['seconds']} s as {ready.get('as')}")
    save()
    try:
        if ready["ready"]:
            expect = [
                "--expect-model",
                str(config["model"]["model_name"]),
                "--expect-cache-mode",
                str(config["model"]["cache_mode"]),
                "--expect-context",
                str(config["model"]["max_seq_len"]),
            ]
            verify_args = [
                "verify",
                "--url",
                URL,
                "--api-key-file",
                str(Path(spec.workdir) / "api_tokens.yml"),
                *expect,
                "--json",
                "--junit",
                str(args.out / "verify-junit.xml"),
            ]
            if done.returncode == 0:
                verify_args += ["--reference", str(reference)]
            started = time.monotonic()
            run = deploy(verify_args, 240)
            results["phases"]["verify"] = {
                "command": "deploy " + " ".join(verify_args),
                "exit": run.returncode,
                "seconds": round(time.monotonic() - started, 1),
                "stderr": run.stderr[-2000:],
            }
            (args.out / "verify.json").write_text(run.stdout)
            try:
                report = json.loads(run.stdout)
                results["phases"]["verify"]["checks"] = [
                    (c["name"], c["passed"], c["detail"]) for c in report["checks"]
                ]
            except ValueError:
                results["phases"]["verify"]["stdout"] = run.stdout[-3000:]
            log(f"verify exit {run.returncode}: {results['phases']['verify'].get('checks')}")
            save()

            with httpx.Client(base_url=URL, headers={"X-API-Key": key}) as client:
                messages = [{"role": "user", "content": FUNCTION_PROMPT}]
                chat = {
                    "plain": exchange(
                        client,
                        "POST",
                        "/v1/chat/completions",
                        {"messages": messages, "max_tokens": 64, "stream": False, **NEUTRAL},
                    ),
                    "greedy": exchange(
                        client,
                        "POST",
                        "/v1/chat/completions",
                        {"messages": messages, "max_tokens": 64, "stream": False, "temperature": 0.0},
                    ),
                    "no_thinking": exchange(
                        client,
                        "POST",
                        "/v1/chat/completions",
                        {
                            "messages": messages,
                            "max_tokens": 64,
                            "stream": False,
                            "template_vars": {"enable_thinking": False},
                            **NEUTRAL,
                        },
                    ),
                    "streamed": safe_stream_chat(client, {"messages": messages, "max_tokens": 64, **NEUTRAL}),
                    "completion_raw": exchange(
                        client,
                        "POST",
                        "/v1/completions",
                        {
                            "prompt": "[gMASK]<sop><|user|>" + FUNCTION_PROMPT + "<|assistant|>",
                            "max_tokens": 64,
                            "stream": False,
                            **NEUTRAL,
                        },
                    ),
                }
                (args.out / "chat-raw.json").write_text(json.dumps(chat, indent=1))
                summary: dict[str, Any] = {}
                for name in ("plain", "greedy", "no_thinking"):
                    choice = (
                        ((chat[name].get("body") or {}).get("choices") or [{}])[0]
                        if isinstance(chat[name].get("body"), dict)
                        else {}
                    )
                    summary[name] = choice.get("message") or chat[name]
                summary["streamed"] = {
                    "reasoning_content": chat["streamed"]["reasoning_content"],
                    "content": chat["streamed"]["content"],
                }
                raw = chat["completion_raw"].get("body")
                summary["completion_raw"] = (
                    (raw.get("choices") or [{}])[0].get("text") if isinstance(raw, dict) else raw
                )
                results["phases"]["chat"] = summary
                log(f"chat: {json.dumps(results['phases']['chat'])[:600]}")
                save()
                if clock.left() > 60:
                    results["phases"]["health"] = health_experiments(client, tabby_log, script["model_vocab"])
                    save()
    finally:
        results["phases"].setdefault("serve", {})["exit"] = il.stop(proc)
    if clock.left() > 70:
        results["phases"]["memory_taken"] = memory_taken_experiment(
            spec, tabby_log, work, clock, results, key
        )
        log(f"memory-taken experiment: {json.dumps(results['phases']['memory_taken'], default=str)[:800]}")
    else:
        results["phases"]["memory_taken"] = {"skipped": f"{clock.left():.0f} s left"}
    save()
    for path in args.out.iterdir():
        if path.suffix in (".log", ".json", ".xml") and path.is_file():
            path.write_text(il.redact(path.read_text(errors="replace"), keys))
    ok = results["phases"].get("verify", {}).get("exit") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

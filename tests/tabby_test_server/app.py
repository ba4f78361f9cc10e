"""Start the test server like TabbyAPI starts: config.yml + api_tokens.yml from the working directory, model load
before the port opens (or, optionally, an open port answering 503 while loading), exllamav3's OOM on request.

Settings beyond TabbyAPI's own live in config.yml's `test_server:` section, each overridable by an env var:
  bits (GLM_TEST_SERVER_BITS): weight bits of the tiny model, a number (a fractional bpw such as 3.84 is rounded
      half up to a whole width, model.whole_bits) or "none" for full precision; default: the first "<number>bpw"
      in model_name (GLM-4.7-EXL3-4bpw_H6 -> 4, 3.84bpw-tuned -> 3.84 -> 4), else full precision
  seed (GLM_TEST_SERVER_SEED): weight seed, default 0
  load_delay_s (GLM_TEST_SERVER_LOAD_DELAY_S): seconds the "model load" takes, default 0
  port_during_load (GLM_TEST_SERVER_PORT_DURING_LOAD): "closed" (TabbyAPI's behaviour, default) or "open"
  oom (GLM_TEST_SERVER_OOM=1): after the load delay print exllamav3's "Insufficient VRAM in split for model and
      cache" traceback on stderr and exit 1
  think (GLM_TEST_SERVER_THINK): the chat template makes the model reason in <think>..</think>, default true
  first_token_delay_s, token_delay_s (GLM_TEST_SERVER_FIRST_TOKEN_DELAY_S, ..._TOKEN_DELAY_S): simulated GPU time,
      token j of a generation is ready first_token_delay_s + j * token_delay_s after it starts; default 0
  tokens_per_chunk (GLM_TEST_SERVER_TOKENS_PER_CHUNK): tokens per streamed event, default 1
  fail_generations (GLM_TEST_SERVER_FAIL_GENERATIONS=1): every completion fails with 503 and adds a /health issue,
      /v1/model stays 200 (a server that cannot generate, e.g. its GPU memory taken)
  reasoning_parser (GLM_TEST_SERVER_REASONING_PARSER): "tabby" (TabbyAPI's split, default), or what a broken parser
      returns: "none" (nothing split, markers in content), "no-end" (the end tag missed: the answer stays in
      reasoning_content, the marker with it)
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from .model import TinyModel, whole_bits
from .server import OOM_MESSAGE, ModelSettings, Pacing, ServerState, make_http_server

DEFAULT_MAX_SEQ_LEN = 8192
# TabbyAPI's default for transformer models (backends/exllamav3/model.py: 4 only for recurrent ones); /v1/model
# reports it.
DEFAULT_MAX_BATCH_SIZE = 128
# TabbyAPI accepts FP16, Q4/Q6/Q8 and "K,V" with 2-8 bits each, spaces allowed around the comma ("5, 4";
# common/config_models.py CACHE_TYPE); "k5v4" is rejected. /v1/model reports it as given.
CACHE_MODE = re.compile(r"^(FP16|Q4|Q6|Q8|[2-8]\s*,\s*[2-8])$")
START_IN_REASONING = ("auto", "always", "never")
REASONING_PARSERS = ("tabby", "none", "no-end")
# A whole "<number>bpw" (3.84bpw-tuned, GLM-4.7-EXL3-4bpw_H6), never the tail of a longer number (84 of 3.84).
BPW_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)bpw")


class ConfigError(Exception):
    """config.yml is invalid (TabbyAPI refuses to start)."""


@dataclass(frozen=True)
class TestServerOptions:
    """The `test_server:` section after env overrides."""

    bits: int | None
    seed: int
    load_delay_s: float
    port_during_load: str
    oom: bool
    think: bool
    pacing: Pacing
    fail_generations: bool
    reasoning_parser: str


def _env_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """TABBY_<SECTION>_<KEY> (scalars) and GLM_TEST_SERVER_<KEY> override config.yml, as TabbyAPI's env does."""
    for name, raw in os.environ.items():
        for prefix, section_of in (("TABBY_", None), ("GLM_TEST_SERVER_", "test_server")):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :].lower()
            section, _, key = (section_of, None, rest) if section_of else rest.partition("_")
            if section and key:
                config.setdefault(section, {})
                if isinstance(config[section], dict):
                    config[section][key] = yaml.safe_load(raw)
    return config


def _bits(section: dict[str, Any], model_name: str) -> int | None:
    """test_server.bits when set (a number or "none"), else the first "<number>bpw" of model_name, else None."""
    value = section.get("bits")
    if value is None:
        match = BPW_IN_NAME.search(model_name)
        if match is None:
            return None
        value = match.group(1)
    elif str(value).strip().lower() == "none":
        return None
    try:
        return whole_bits(float(value))
    except ValueError as error:
        raise ConfigError(f"test_server.bits {value!r}: {error}") from None


def _options(config: dict[str, Any], model_name: str) -> TestServerOptions:
    section = config.get("test_server") or {}
    bits = _bits(section, model_name)
    port_during_load = str(section.get("port_during_load", "closed"))
    if port_during_load not in ("closed", "open"):
        raise ConfigError(f"test_server.port_during_load must be closed or open, got {port_during_load!r}")
    pacing = Pacing(
        first_token_delay_s=float(section.get("first_token_delay_s", 0)),
        token_delay_s=float(section.get("token_delay_s", 0)),
        tokens_per_chunk=int(section.get("tokens_per_chunk", 1)),
    )
    if pacing.first_token_delay_s < 0 or pacing.token_delay_s < 0 or pacing.tokens_per_chunk < 1:
        raise ConfigError("test_server delays must be >= 0 and tokens_per_chunk >= 1")
    parser = str(section.get("reasoning_parser", "tabby"))
    if parser not in REASONING_PARSERS:
        raise ConfigError(
            f"test_server.reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {parser!r}"
        )
    return TestServerOptions(
        bits=bits,
        seed=int(section.get("seed", 0)),
        load_delay_s=float(section.get("load_delay_s", 0)),
        port_during_load=port_during_load,
        oom=bool(section.get("oom", False)),
        think=bool(section.get("think", True)),
        pacing=pacing,
        fail_generations=bool(section.get("fail_generations", False)),
        reasoning_parser=parser,
    )


def _settings(model: dict[str, Any]) -> ModelSettings | None:
    """The model section validated like TabbyAPI validates it; None when no model_name is set."""
    name = model.get("model_name")
    if not name:
        return None
    max_seq_len = int(model.get("max_seq_len") or -1)
    if max_seq_len <= 0:
        max_seq_len = DEFAULT_MAX_SEQ_LEN
    cache_size = int(model.get("cache_size") or max_seq_len)
    if cache_size % 256:
        raise ConfigError(f"cache_size {cache_size} is not a multiple of 256")
    cache_mode = str(model.get("cache_mode") or "FP16")
    start_in_reasoning = str(model.get("start_in_reasoning") or "auto")
    if start_in_reasoning not in START_IN_REASONING:
        # TabbyAPI warns "Invalid start_in_reasoning value ..., using 'auto'." and goes on
        print(f"WARNING: Invalid start_in_reasoning value {start_in_reasoning!r}, using 'auto'.", flush=True)
        start_in_reasoning = "auto"
    if not CACHE_MODE.match(cache_mode):
        raise ConfigError(f'invalid cache_mode {cache_mode!r}: use FP16, Q4, Q6, Q8 or "K,V" with 2-8 bits')
    return ModelSettings(
        name=str(name),
        max_seq_len=min(max_seq_len, cache_size),
        cache_size=cache_size,
        cache_mode=cache_mode,
        max_batch_size=int(model.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE),
        # TabbyAPI's adjust_chunk_size: at least 256, rounded up to a multiple of 256
        chunk_size=-(-max(256, int(model.get("chunk_size") or 2048)) // 256) * 256,
        reasoning=bool(model.get("reasoning", False)),
        reasoning_start_token=str(model.get("reasoning_start_token") or "<think>"),
        reasoning_end_token=str(model.get("reasoning_end_token") or "</think>"),
        start_in_reasoning=start_in_reasoning,
    )


def _auth_keys(workdir: Path) -> tuple[frozenset[str], str]:
    """api_tokens.yml (api_key: str or list, admin_key), generated and written when missing, like TabbyAPI."""
    path = workdir / "api_tokens.yml"
    if not path.exists():
        keys = {"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)}
        path.write_text(yaml.safe_dump(keys), encoding="utf-8")
        print(f"Your API key is: {keys['api_key']}\nYour admin key is: {keys['admin_key']}", flush=True)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    api_key = data.get("api_key")
    api_keys = frozenset([api_key] if isinstance(api_key, str) else api_key or [])
    if not api_keys or not data.get("admin_key"):
        raise ConfigError("api_tokens.yml needs api_key and admin_key")
    return frozenset(str(k) for k in api_keys), str(data["admin_key"])


def load_config(workdir: Path) -> dict[str, Any]:
    """config.yml of workdir (empty when absent) with env overrides applied."""
    path = workdir / "config.yml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
    if not isinstance(config, dict):
        raise ConfigError("config.yml must be a mapping")
    return _env_overrides(config)


@dataclass
class Prepared:
    """A configured server, ready to load and bind."""

    state: ServerState
    options: TestServerOptions
    host: str
    port: int


def prepare(config: dict[str, Any], workdir: Path) -> Prepared:
    """Everything config decides, before the (simulated) load."""
    network = config.get("network") or {}
    model = config.get("model") or {}
    settings = _settings(model)
    options = _options(config, settings.name if settings else "")
    disable_auth = bool(network.get("disable_auth", False))
    api_keys, admin_key = (frozenset(), "") if disable_auth else _auth_keys(workdir)
    state = ServerState(
        settings=settings,
        api_keys=api_keys,
        admin_key=admin_key,
        disable_auth=disable_auth,
        think=options.think,
        pacing=options.pacing,
        fail_generations=options.fail_generations,
        reasoning_parser=options.reasoning_parser,
    )
    return Prepared(
        state=state,
        options=options,
        host=str(network.get("host") or "127.0.0.1"),
        port=int(network.get("port") or 5000),
    )


def load_model(prepared: Prepared) -> None:
    """The model load: the configured delay, then the tiny model at the configured bits (or the OOM exit)."""
    time.sleep(prepared.options.load_delay_s)
    if prepared.options.oom:
        print(
            "Traceback (most recent call last):\n"
            '  File "/app/backends/exllamav3/model.py", line 1, in load_model\n'
            '  File "/opt/venv/lib/python3.12/site-packages/exllamav3/model/model_ls.py", line 204, in load\n'
            f"RuntimeError: {OOM_MESSAGE}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)
    if prepared.state.settings is not None:
        prepared.state.model = TinyModel(bits=prepared.options.bits, seed=prepared.options.seed)


def serve(prepared: Prepared) -> ThreadingHTTPServer:
    """Load then bind (closed port during load), or bind then load in the background (open port)."""
    if prepared.options.port_during_load == "closed":
        load_model(prepared)
        return make_http_server(prepared.state, prepared.host, prepared.port)
    server = make_http_server(prepared.state, prepared.host, prepared.port)
    threading.Thread(target=load_model, args=(prepared,), daemon=True).start()
    return server


def main(argv: list[str]) -> int:
    """`python3 -m tabby_test_server [main.py] [--host H] [--port P]` in a folder holding config.yml."""
    config = load_config(Path.cwd())
    args = list(argv)
    if args and args[0] == "main.py":
        args.pop(0)  # TabbyAPI's image command is `python3 main.py --host 0.0.0.0`
    while args:
        flag = args.pop(0)
        if flag in ("--host", "--port") and args:
            config.setdefault("network", {})[flag[2:]] = args.pop(0)
        else:
            print(f"unknown argument {flag!r}", file=sys.stderr)
            return 2
    try:
        prepared = prepare(config, Path.cwd())
    except ConfigError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    server = serve(prepared)
    host, port = server.server_address[:2]
    print(f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0

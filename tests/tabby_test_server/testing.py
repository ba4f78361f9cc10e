"""Run the test server in-process (a thread) for unit tests; port 0 picks a free port."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from .app import prepare, serve
from .server import ServerState


def free_port() -> int:
    """A port nothing listens on right now (for tests that need the port before the server binds)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningServer:
    """A test server serving from a thread."""

    url: str
    api_key: str
    state: ServerState
    holder: dict[str, ThreadingHTTPServer]
    ready: threading.Event
    thread: threading.Thread

    def stop(self) -> None:
        """Wait for the (delayed) bind if needed, then shut down and close the port."""
        self.ready.wait(30)
        server = self.holder.get("server")
        if server is not None:
            server.shutdown()
            server.server_close()
        self.thread.join(timeout=30)


def start(
    workdir: Path,
    model: dict[str, Any] | None = None,
    test_server: dict[str, Any] | None = None,
    port: int = 0,
    api_key: str = "test-key-0123456789abcdef",
) -> RunningServer:
    """Write config.yml + api_tokens.yml to workdir and serve; with a load delay the port opens later."""
    config = {
        "network": {"host": "127.0.0.1", "port": port or free_port()},
        "model": {"model_name": "tiny", "max_seq_len": 4096, "cache_size": 4096, **(model or {})},
        "test_server": test_server or {},
    }
    (workdir / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (workdir / "api_tokens.yml").write_text(
        yaml.safe_dump({"api_key": api_key, "admin_key": "admin-" + api_key}), encoding="utf-8"
    )
    prepared = prepare(config, workdir)
    holder: dict[str, ThreadingHTTPServer] = {}
    ready = threading.Event()

    def run() -> None:
        holder["server"] = serve(prepared)
        ready.set()
        holder["server"].serve_forever(poll_interval=0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if prepared.options.load_delay_s == 0 or prepared.options.port_during_load == "open":
        ready.wait(10)
    return RunningServer(
        url=f"http://127.0.0.1:{prepared.port}",
        api_key=api_key,
        state=prepared.state,
        holder=holder,
        ready=ready,
        thread=thread,
    )

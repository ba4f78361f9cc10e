"""Wait until a started TabbyAPI serves the planned model: port open -> /health answers -> /v1/model matches the plan.

TabbyAPI loads the model before it opens its port, and /health does not say whether a model is loaded
(../shared/facts/tabbyapi.md); it stays 503 after one failed generation while the server serves on (a kept
container may be in that state), so 503 counts as up too. Only /v1/model with the planned id, cache mode and
context proves readiness --
the one readiness model of toolkit.verify.readiness, which `deploy verify` checks too.
While waiting, the container is watched: an exit or restart is diagnosed from its log at once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import VerificationFailed
from ..facts.layout import API_TOKENS
from ..verify.readiness import Expectations, model_problems
from . import engine
from .diagnose import diagnose, last_line

# Load time is dominated by reading the weights: a fixed allowance for container start, Python imports and a
# possible first-run exllamav3 extension build (272 s measured, ../shared/facts/exllamav3.md), plus 4 s per GiB
# on disk (= 256 MiB/s, a slow SSD or network disk). 158 GiB (3.84bpw-tuned) -> 300 + 632 = 932 s.
READY_BASE_S = 300
READY_S_PER_GIB = 4


def ready_timeout_s(model_bytes: int) -> int:
    """Seconds to wait for a model of this size on disk to load (formula above)."""
    return READY_BASE_S + int(READY_S_PER_GIB * model_bytes / 2**30 + 0.5)


@dataclass(frozen=True)
class Ready:
    """Readiness reached: how long it took and what the server reported."""

    seconds: float
    model: dict[str, Any]


def port_open(url: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_ready(
    url: str,
    api_key: str,
    expect: Expectations,
    *,
    timeout_s: float,
    container: Any = None,
    on_progress: Callable[[str, str], None] = lambda stage, line: None,
    poll_s: float = 1.0,
) -> Ready:
    """Poll until ready; raise the diagnosed error if the container dies, VerificationFailed on mismatch/timeout."""
    from ..verify.client import ServerError, TabbyClient

    start = time.monotonic()
    stage, detail = "starting", ""
    with closing(TabbyClient(url, api_key, timeout_s=5.0)) as client:
        while True:
            if container is not None:
                _raise_if_failed(container)
                detail = last_line(engine.read_logs(container, tail=20))
            if port_open(url):
                stage = "port open"
                try:
                    health = client.health()
                    stage = "healthy" if health.status_code == 200 else f"/health {health.status_code}"
                    if health.status_code in (200, 503):
                        model = client.model()
                        problems = model_problems(model, expect)
                        if problems:
                            raise VerificationFailed(
                                "the server is up but serves the wrong model: " + "; ".join(problems),
                                "run `deploy render` and `deploy up` again",
                            )
                        return Ready(time.monotonic() - start, model)
                except ServerError as error:
                    if error.status == 401:
                        raise VerificationFailed(
                            f"the server refused the API key from {API_TOKENS}",
                            "re-render so the mounted key file matches",
                        ) from None
                    stage = "port open, no HTTP yet" if error.status is None else f"/v1/model {error.status}"
            on_progress(stage, detail)
            if time.monotonic() - start > timeout_s:
                raise VerificationFailed(
                    f"not ready after {int(timeout_s)} s (last stage: {stage}; last log: {detail[:160] or '-'})",
                    "see `deploy logs`; a slow disk may need --ready-timeout",
                )
            time.sleep(poll_s)


def _raise_if_failed(container: Any) -> None:
    """A known failure in the log, an exit or a crash loop ends the wait at once with the diagnosis."""
    state = engine.status(container)
    if state.status == "created":
        return
    log = engine.read_logs(container, tail=400)
    stopped = not state.running
    found = diagnose(
        log,
        exit_code=state.exit_code if stopped else None,
        restart_count=state.restart_count,
        oom_killed=state.oom_killed,
    )
    if found is not None:
        raise found.error()
    if stopped:
        raise VerificationFailed(f"the server stopped ({state.status})", "see `deploy logs`")

"""Container health that means "can serve": the image's HEALTHCHECK and the Swarm healthcheck run this (stdlib only).

TabbyAPI's /health turns 503 after any failed generation and never recovers, even when the recreated generator
serves again; /v1/model stays 200 even when no generation can succeed. Measured on an H200 (TabbyAPI e632af4,
exllamav3 1.6.5: benchmarks/gpu_stack/RESULTS.md section 3): one bad request -> /health 503 for good, the next
completion 200; GPU memory taken by another process -> every completion 503 within ~50 ms. So /health alone would
turn one failed request into a permanently unhealthy container (under Swarm: a replaced task, a model reload), and
a one-token completion is what tells "can serve" from "cannot":
  /health 200                  -> healthy (exit 0)
  /health 503                  -> a one-token completion with the API key decides: 200 healthy, anything else not
  no answer / another status   -> unhealthy (exit 1)
Usage: python3 healthcheck.py [BASE_URL] [API_TOKENS_FILE]   (default http://127.0.0.1:5000, /app/api_tokens.yml)
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request

BASE_URL = "http://127.0.0.1:5000"
API_TOKENS = "/app/api_tokens.yml"
BUDGET_S = 25.0  # below the HEALTHCHECK timeout (30 s): a busy server still gets to answer
PROBE = {"prompt": "Hello", "max_tokens": 1, "temperature": 0, "stream": False}
# api_tokens.yml as TabbyAPI and `deploy render` write it: `api_key: VALUE` (quoted or not).
KEY_LINE = re.compile(r"""^(api_key|admin_key):\s*['"]?([A-Za-z0-9_-]+)['"]?\s*$""", re.MULTILINE)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def read_key(path: str) -> str | None:
    """The API key (else the admin key, which TabbyAPI also accepts) from the mounted key file."""
    try:
        with open(path, encoding="utf-8") as handle:
            keys = dict(KEY_LINE.findall(handle.read()))
    except OSError:
        return None
    return keys.get("api_key") or keys.get("admin_key")


def status_of(request: urllib.request.Request, timeout_s: float) -> int | None:
    """HTTP status of a request, None when nothing answered (refused, reset, timed out)."""
    try:
        with OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


def check(base_url: str, key_file: str) -> tuple[bool, str]:
    """(healthy, why) for the server at base_url."""
    deadline = time.monotonic() + BUDGET_S
    health = status_of(urllib.request.Request(f"{base_url}/health"), 5.0)
    if health == 200:
        return True, "/health 200"
    if health != 503:
        return False, "no answer on /health" if health is None else f"/health {health}"
    key = read_key(key_file)
    if key is None:
        return False, f"/health 503 and no API key readable in {key_file} to probe generation"
    probe = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps(PROBE).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": key},
        method="POST",
    )
    answer = status_of(probe, max(1.0, deadline - time.monotonic()))
    if answer == 200:
        return True, "/health 503 (an earlier generation failed) but a one-token completion succeeds"
    return False, f"/health 503 and a one-token completion {'got no answer' if answer is None else answer}"


def main(argv: list[str]) -> int:
    """Exit 0 when the server can serve, 1 when it cannot (Docker's healthcheck convention)."""
    healthy, why = check(argv[0] if argv else BASE_URL, argv[1] if len(argv) > 1 else API_TOKENS)
    print(("healthy: " if healthy else "unhealthy: ") + why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

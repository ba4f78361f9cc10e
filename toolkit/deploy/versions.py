"""The serving stack a running container really holds, read inside it, against the plan's stack.

`deploy status` runs a Python one-liner in the container (docker exec): importlib.metadata's exllamav3 and torch
versions (what the image's build step checked) and the TabbyAPI ref recorded at build in /app/.glm-deploy-tabby.json
by the rendered Dockerfile. An image built by hand, pulled from elsewhere or left over from another plan shows up as
a difference.
"""

from __future__ import annotations

import json
from typing import Any

from ..plan.plan import Stack

TABBY_RECORD = "/app/.glm-deploy-tabby.json"
PROBE = f"""
import json
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
try:
    with open({TABBY_RECORD!r}) as handle:
        tabby = json.load(handle)
except (OSError, ValueError):
    tabby = {{}}
print(json.dumps({{"tabbyapi": tabby.get("ref"), "tabbyapi_head": tabby.get("head"),
                  "exllamav3": version("exllamav3"), "torch": version("torch")}}))
"""
COMPARED = ("tabbyapi", "exllamav3", "torch")


def running_stack(container: Any) -> dict[str, Any]:
    """What the container holds: tabbyapi (ref built), tabbyapi_head, exllamav3, torch; or {"error": ...}."""
    from docker.errors import APIError

    try:
        code, output = container.exec_run(["python3", "-c", PROBE], stdout=True, stderr=True)
    except APIError as error:
        return {"error": f"cannot run python3 in the container ({error.explanation or error})"}
    text = output.decode("utf-8", errors="replace").strip()
    if code != 0:
        return {
            "error": f"python3 in the container exited {code}: {text.splitlines()[-1][:200] if text else ''}"
        }
    try:
        data = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"unreadable answer from the container: {text[:200]!r}"}
    return {key: data.get(key) for key in (*COMPARED, "tabbyapi_head")}


def differences(planned: Stack, running: dict[str, Any]) -> list[str]:
    """'exllamav3 1.4.2 (plan: 1.6.5)' for every compared part that differs; missing counts as different."""
    return [
        f"{name} {running.get(name) or 'unknown'} (plan: {getattr(planned, name)})"
        for name in COMPARED
        if running.get(name) != getattr(planned, name)
    ]


def stack_status(planned: Stack, container: Any) -> dict[str, Any]:
    """The planned and the running stack, and what differs (status's `stack` entry)."""
    running = running_stack(container)
    plan = {name: getattr(planned, name) for name in COMPARED}
    if "error" in running:
        return {"planned": plan, "running": None, "error": running["error"], "differs": None}
    return {"planned": plan, "running": running, "differs": differences(planned, running)}

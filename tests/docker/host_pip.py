"""The host's pip settings (index, certificate, ...) as environment variables and read-only mounts for a container.

On an ordinary internet-connected host this is empty and pip in a container reaches PyPI as it is. Where the host
reaches the package index through its own set-up (a CA certificate pip is pointed to, local index folders), a
fresh container needs the same (shared/facts/containers-and-network.md): every setting of `pip config list` is
passed as PIP_<NAME>, and every local file or folder it names is mounted read-only under /host-pip (for a local
index, its parent folder: index pages link to files beside the index).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MOUNT_ROOT = "/host-pip"
CONFIG_LINE = re.compile(r"^(?P<section>:env:|global|install)\.(?P<name>[a-z0-9-]+)='(?P<value>.*)'$")
SECTION_RANK = {"global": 0, "install": 1, ":env:": 2}  # later wins: the environment beats the config files


@dataclass
class ContainerPip:
    """What to give `docker run`: environment variables and {host path: container path} read-only mounts."""

    environment: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)

    def docker_volumes(self) -> dict[str, dict[str, str]]:
        """The mounts in the docker SDK's `volumes=` form."""
        return {host: {"bind": inside, "mode": "ro"} for host, inside in self.mounts.items()}


def host_pip_settings() -> dict[str, str]:
    """{setting: value} from `pip config list` of this interpreter (environment over install over global)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout
    ranked: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        match = CONFIG_LINE.match(line.strip())
        if match:
            rank = SECTION_RANK[match["section"]]
            if match["name"] not in ranked or ranked[match["name"]][0] <= rank:
                ranked[match["name"]] = (rank, match["value"])
    return {name: value for name, (_, value) in ranked.items()}


def for_container(settings: dict[str, str]) -> ContainerPip:
    """Environment and mounts that give a container's pip the host's settings; local paths are remapped."""
    result = ContainerPip()
    for name, value in settings.items():
        items = []
        for item in value.split():
            local = item.removeprefix("file://")
            if not local.startswith("/"):
                items.append(item)
                continue
            if not Path(local).exists():
                continue  # pip would ignore it on the host too
            # A local index's pages link to files beside it (../../files/...): mount the index's parent folder.
            mounted = str(Path(local).parent) if name.endswith("index-url") else local
            result.mounts[mounted] = MOUNT_ROOT + mounted
            items.append(item.replace(local, MOUNT_ROOT + local, 1))
        if items:
            result.environment["PIP_" + name.upper().replace("-", "_")] = " ".join(items)
    cert = result.environment.get("PIP_CERT")
    if cert:  # other TLS clients (build back-ends fetching files) read these
        result.environment.update(SSL_CERT_FILE=cert, REQUESTS_CA_BUNDLE=cert)
    return result

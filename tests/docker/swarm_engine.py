"""A throw-away Docker engine in its own network namespace, made a one-node Swarm for the fleet tests.

Why a second engine: `docker swarm init` on the shared engine would change it under every other test. Why its
own network namespace: a second dockerd in the root namespace rewrites the same iptables chains (DOCKER,
DOCKER-ISOLATION-*) as the first one and breaks its port publishing; in a namespace it has private iptables,
bridges and overlay plumbing. `ip netns exec` is not used because it remounts /sys, which hides the cgroup mounts
dockerd needs ("Devices cgroup isn't mounted"); `nsenter --net` switches only the network namespace.

The namespace is joined to the host by a veth pair on a private /30, so tests (in the root namespace) reach the
node at its advertise address: published ports in host mode work there. The routing mesh (ingress) needs IPVS,
which some kernels lack (CONFIG_IP_VS unset); `ipvs_available` says whether it can work.

The engine advertises fake GPUs with `--node-generic-resource NVIDIA-GPU=<id>`, so the scheduler places or refuses
services by their generic-resource claims exactly as on a GPU node. DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 stops
the agent from trying a registry for images that were loaded locally (no registry is reachable).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

GATEWAY_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null \\
    && rm -rf /var/lib/apt/lists/* && mkdir -p /usr/local/etc/haproxy
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
"""


def prerequisites_problem() -> str | None:
    """Why a namespaced engine cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the Swarm tests start a second dockerd in a network namespace, which needs root"
    for tool in ("dockerd", "ip", "nsenter", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (needed for the Swarm test engine)"
    return None


def build_gateway_image(client: Any, tag: str, base: str) -> None:
    """HAProxy from Debian on the local base image (the stack's default haproxy image needs a registry)."""
    client.images.build(fileobj=io.BytesIO(GATEWAY_DOCKERFILE.encode()), tag=tag, buildargs={"BASE": base},
                        rm=True, forcerm=True, pull=False)


class SwarmEngine:
    """dockerd in a fresh network namespace with its own data and exec roots; start(), then stop() always."""

    def __init__(self, gpu_ids: list[str]) -> None:
        token = secrets.token_hex(3)
        self.name = f"glmdt-{token}"
        self.root = Path(f"/tmp/glmdt-swarm-{token}")
        self.socket = self.root / "docker.sock"
        self.host_veth, self.node_veth = f"glmdt{token}h", f"glmdt{token}n"
        third, fourth = secrets.randbelow(256), secrets.randbelow(64) * 4
        self.host_address = f"10.231.{third}.{fourth + 1}"
        self.address = f"10.231.{third}.{fourth + 2}"  # the node's advertise address, reachable from here
        self.gpu_ids = gpu_ids
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "dockerd.log"

    @property
    def docker_host(self) -> str:
        """DOCKER_HOST for the docker CLI and SDK."""
        return f"unix://{self.socket}"

    def cli(self, *args: str, check: bool = True, timeout: float = 300, input_bytes: bytes | None = None) \
            -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine."""
        result = subprocess.run(["docker", "--host", self.docker_host, *args], capture_output=True, text=True,
                                timeout=timeout, check=False, env={**os.environ, "DOCKER_HOST": self.docker_host})
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
        return result

    def client(self) -> Any:
        """A docker SDK client of this engine."""
        import docker

        return docker.DockerClient(base_url=self.docker_host, timeout=120)

    def _ip(self, *args: str, netns: bool = False) -> None:
        command = (["ip", "netns", "exec", self.name] if netns else []) + ["ip", *args]
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def start(self, timeout_s: float = 60) -> None:
        """Namespace, veth, dockerd, then `docker swarm init` on the node's address."""
        self.root.mkdir(mode=0o700)
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        self._ip("link", "add", self.host_veth, "type", "veth", "peer", "name", self.node_veth)
        self._ip("link", "set", self.node_veth, "netns", self.name)
        self._ip("addr", "add", f"{self.host_address}/30", "dev", self.host_veth)
        self._ip("link", "set", self.host_veth, "up")
        self._ip("addr", "add", f"{self.address}/30", "dev", self.node_veth, netns=True)
        self._ip("link", "set", self.node_veth, "up", netns=True)
        self._ip("link", "set", "lo", "up", netns=True)
        command = ["nsenter", f"--net=/var/run/netns/{self.name}", "dockerd", "--host", self.docker_host,
                   "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                   "--pidfile", str(self.root / "docker.pid")]
        for gpu_id in self.gpu_ids:
            command += ["--node-generic-resource", f"NVIDIA-GPU={gpu_id}"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"})
        deadline = time.monotonic() + timeout_s
        while self.cli("version", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test dockerd did not start: {self.log_tail()}")
            time.sleep(0.5)
        self.cli("swarm", "init", "--advertise-addr", self.address, "--listen-addr", f"{self.address}:2377")

    @property
    def ipvs_available(self) -> bool:
        """The routing mesh works only with IPVS (the node logs this when it cannot get it)."""
        return "ipvs is not enabled" not in self.log_path.read_text(errors="replace").lower() and \
            Path("/proc/net/ip_vs").exists()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of dockerd's log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def load_image(self, tag: str) -> None:
        """Copy an image from the shared engine into this one (docker save | docker load, streamed)."""
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE, env={
            k: v for k, v in os.environ.items() if k != "DOCKER_HOST"})
        load = subprocess.run(["docker", "--host", self.docker_host, "load", "--quiet"], stdin=save.stdout,
                              capture_output=True, text=True, timeout=600, check=False)
        assert save.stdout is not None
        save.stdout.close()
        if save.wait(timeout=600) != 0 or load.returncode != 0:
            raise RuntimeError(f"copying {tag} into the test engine failed: {load.stderr.strip()[-1000:]}")

    def stop(self) -> None:
        """Leave the swarm, stop dockerd, unmount what it left, delete the namespace, veth and data (best effort,
        every step even when an earlier one failed)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):  # teardown goes on regardless
                client = self.client()
                for container in client.containers.list(all=True):
                    container.remove(force=True)
                client.close()
            self.cli("swarm", "leave", "--force", check=False, timeout=60)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root) + "/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True, check=False, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

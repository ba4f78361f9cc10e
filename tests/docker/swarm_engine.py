"""A throw-away Docker engine in its own network namespace, made a one-node Swarm for the fleet tests.

Why a second engine: `docker swarm init` on the shared engine would change it under every other test. Why its
own network namespace: a second dockerd in the root namespace rewrites the same iptables chains (DOCKER,
DOCKER-ISOLATION-*) as the first one and breaks its port publishing; in a namespace it has private iptables,
bridges and overlay plumbing. `ip netns exec` is not used because it remounts /sys, which hides the cgroup mounts
dockerd needs ("Devices cgroup isn't mounted"); `nsenter --net` switches only the network namespace.

Several such nodes form one Swarm (SwarmCluster): every node namespace and the host are plugged into one bridge
that lives in a namespace of its own (a "switch"), on a private /24. Tests (in the root namespace) reach every node
at its advertise address, where host-mode published ports answer; the bridge sees no iptables rules of the host.
The routing mesh (ingress) needs IPVS, which some kernels lack (CONFIG_IP_VS unset); `ipvs_available` says
whether it can work.

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
    for tool in ("dockerd", "ip", "nsenter", "unshare", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (needed for the Swarm test engine)"
    return None


def build_gateway_image(client: Any, tag: str, base: str) -> None:
    """HAProxy from Debian on the local base image (the stack's default haproxy image needs a registry)."""
    client.images.build(
        fileobj=io.BytesIO(GATEWAY_DOCKERFILE.encode()),
        tag=tag,
        buildargs={"BASE": base},
        rm=True,
        forcerm=True,
        pull=False,
    )


class SwarmEngine:
    """One dockerd in its own network namespace, plugged into the cluster's switch at `address`."""

    def __init__(self, cluster: SwarmCluster, index: int, gpu_ids: list[str]) -> None:
        self.cluster = cluster
        self.name = f"{cluster.name}-n{index}"
        self.root = cluster.root / f"n{index}"
        self.socket = self.root / "docker.sock"
        self.node_veth, self.switch_veth = f"{cluster.ifprefix}a{index}", f"{cluster.ifprefix}b{index}"
        self.address = f"{cluster.subnet}.{index + 2}"  # the node's advertise address, reachable from here
        self.gpu_ids = gpu_ids
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "dockerd.log"

    @property
    def docker_host(self) -> str:
        """DOCKER_HOST for the docker CLI and SDK."""
        return f"unix://{self.socket}"

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine."""
        result = subprocess.run(
            ["docker", "--host", self.docker_host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "DOCKER_HOST": self.docker_host},
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
        return result

    def client(self) -> Any:
        """A docker SDK client of this engine."""
        import docker

        return docker.DockerClient(base_url=self.docker_host, timeout=120)

    def start(self, timeout_s: float = 60) -> None:
        """Namespace, a veth into the switch, then dockerd (entered with nsenter --net only)."""
        self.root.mkdir(mode=0o700, parents=True)
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.node_veth, "type", "veth", "peer", "name", self.switch_veth)
        self.cluster.plug(self.switch_veth)
        _run("ip", "link", "set", self.node_veth, "netns", self.name)
        _run(
            "ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.address}/24", "dev", self.node_veth
        )
        _run("ip", "netns", "exec", self.name, "ip", "link", "set", self.node_veth, "up")
        _run("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        # Its own UTS namespace too: Swarm names nodes by host name, and two nodes must not share one.
        command = [
            "nsenter",
            f"--net=/var/run/netns/{self.name}",
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.name,
            "dockerd",
            "--host",
            self.docker_host,
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "docker.pid"),
        ]
        for gpu_id in self.gpu_ids:
            command += ["--node-generic-resource", f"NVIDIA-GPU={gpu_id}"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
            )
        deadline = time.monotonic() + timeout_s
        while self.cli("version", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test dockerd did not start: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of dockerd's log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def load_image(self, tag: str) -> None:
        """Copy an image from the shared engine into this one (docker save | docker load, streamed)."""
        save = subprocess.Popen(
            ["docker", "save", tag],
            stdout=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "DOCKER_HOST"},
        )
        load = subprocess.run(
            ["docker", "--host", self.docker_host, "load", "--quiet"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert save.stdout is not None
        save.stdout.close()
        if save.wait(timeout=600) != 0 or load.returncode != 0:
            raise RuntimeError(f"copying {tag} into the test engine failed: {load.stderr.strip()[-1000:]}")

    def stop(self) -> None:
        """Remove containers, leave the swarm, stop dockerd, unmount what it left, delete the namespace."""
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
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.root) + "/")
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False, timeout=30)


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class SwarmCluster:
    """A switch namespace with a bridge, the host plugged in, and one SwarmEngine per node; node 0 is the
    manager. start() then stop() always (stop undoes whatever part of start happened)."""

    def __init__(self, nodes_gpu_ids: list[list[str]]) -> None:
        token = secrets.token_hex(3)
        self.name = f"glmdt-{token}"
        self.root = Path(f"/tmp/glmdt-swarm-{token}")
        self.ifprefix = f"glmdt{token}"
        taken = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        third = next(n for n in (secrets.randbelow(256) for _ in range(64)) if f" 10.231.{n}." not in taken)
        self.subnet = f"10.231.{third}"
        self.switch = f"{self.name}-sw"
        self.nodes = [SwarmEngine(self, index, gpu_ids) for index, gpu_ids in enumerate(nodes_gpu_ids)]

    @property
    def manager(self) -> SwarmEngine:
        """Node 0: the Swarm manager (and the only one)."""
        return self.nodes[0]

    def plug(self, interface: str) -> None:
        """Move a veth end into the switch and attach it to the bridge."""
        _run("ip", "link", "set", interface, "netns", self.switch)
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", interface, "master", "br0")
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", interface, "up")

    def start(self) -> None:
        """Switch, the host's port on it, every node's dockerd; swarm init on node 0, the rest join as workers."""
        self.root.mkdir(mode=0o700)
        _run("ip", "netns", "add", self.switch)
        _run("ip", "netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", "br0", "up")
        _run("ip", "link", "add", f"{self.ifprefix}h", "type", "veth", "peer", "name", f"{self.ifprefix}s")
        self.plug(f"{self.ifprefix}s")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", f"{self.ifprefix}h")
        _run("ip", "link", "set", f"{self.ifprefix}h", "up")
        for node in self.nodes:
            node.start()
        manager = self.manager
        manager.cli(
            "swarm", "init", "--advertise-addr", manager.address, "--listen-addr", f"{manager.address}:2377"
        )
        token = manager.cli("swarm", "join-token", "--quiet", "worker").stdout.strip()
        for node in self.nodes[1:]:
            node.cli(
                "swarm",
                "join",
                "--token",
                token,
                "--advertise-addr",
                node.address,
                "--listen-addr",
                f"{node.address}:2377",
                f"{manager.address}:2377",
            )

    @property
    def ipvs_available(self) -> bool:
        """The routing mesh works only with IPVS (the node logs this when it cannot get it)."""
        return (
            "ipvs is not enabled" not in self.manager.log_tail(10**7).lower()
            and Path("/proc/net/ip_vs").exists()
        )

    def load_image(self, tag: str) -> None:
        """The image on every node (no registry: each engine gets its own copy)."""
        for node in self.nodes:
            node.load_image(tag)

    def stop(self) -> None:
        """Workers first, then the manager; then the switch (its veths die with it) and the data."""
        for node in reversed(self.nodes):
            node.stop()
        subprocess.run(
            ["ip", "link", "del", f"{self.ifprefix}h"], capture_output=True, check=False, timeout=30
        )
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True, check=False, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

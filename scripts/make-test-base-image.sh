#!/usr/bin/env bash
# Build, once, the local images the Docker tests start from (no registry is reachable; nothing is installed at
# test time):
#   glm-deploy-test-stock:bookworm  debootstrap minbase + python3: a stock Debian 12 (no pip, no venv, no packages)
#   glm-deploy-test-stock:trixie    the same for Debian 13 (Python 3.13), when the mirror carries it
#   glm-deploy-test-stock:noble     the same for Ubuntu 24.04, only when the host's apt sources (or UBUNTU_MIRROR)
#                                   name an Ubuntu mirror and its archive keyring is installed to verify it
#   glm-deploy-test-base:bookworm   stock + Debian's python3-numpy, python3-yaml, git, curl, ca-certificates, tini
#   glm-deploy-test-tools:bookworm  base + haproxy (the Swarm gateway) and an /usr/local/etc/haproxy folder
# The mirror comes from the host's own apt configuration (scripts/apt_mirror.py); DEBIAN_MIRROR / UBUNTU_MIRROR
# override it. Each image that already exists is kept. Needs root (debootstrap) and a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${GLM_DEPLOY_TEST_BASE:-glm-deploy-test-base:bookworm}"
STOCK="${GLM_DEPLOY_TEST_STOCK:-glm-deploy-test-stock}"
TOOLS="${GLM_DEPLOY_TEST_TOOLS:-glm-deploy-test-tools:bookworm}"

have() { docker image inspect "$1" >/dev/null 2>&1; }
rootfs=()
cleanup() {  # an interrupted debootstrap leaves /proc mounted in its target: unmount before deleting
  local root
  for root in "${rootfs[@]}"; do
    awk -v r="$root/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
    rm -rf --one-file-system "$root"
  done
}
trap cleanup EXIT

# stock_image SUITE DISTRO REQUIRED: debootstrap SUITE (minbase + python3) and import it as $STOCK:SUITE.
stock_image() {
  local suite="$1" distro="$2" required="$3" image="$STOCK:$1" mirror keyring="" script=""
  if have "$image"; then echo "image $image already present"; return 0; fi
  if [ "$(id -u)" -ne 0 ]; then
    [ "$required" = yes ] && { echo "building $image needs root (debootstrap): run this as root"; exit 4; }
    echo "skipped $image: building it needs root (debootstrap)"
    return 0
  fi
  local override; override="$(echo "$distro" | tr a-z A-Z)_MIRROR"
  mirror="${!override:-}"
  if [ -z "$mirror" ] && ! mirror="$(python3 scripts/apt_mirror.py "$suite" --distro "$distro")"; then
    [ "$required" = yes ] && { echo "set $override to a $distro mirror and run this again"; exit 4; }
    echo "skipped $image: no $distro mirror in the host's apt sources (set $override to build it)"
    return 0
  fi
  if [ "$distro" = ubuntu ]; then
    keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg
    [ -f "$keyring" ] || { echo "skipped $image: $keyring is missing (install ubuntu-keyring)"; return 0; }
    [ -f "/usr/share/debootstrap/scripts/$suite" ] || script=/usr/share/debootstrap/scripts/gutsy
  fi
  local root log="/tmp/glm-deploy-debootstrap-$suite.log"
  root="$(mktemp -d "/tmp/glm-deploy-rootfs-$suite.XXXXXX")"
  rootfs+=("$root")
  echo "debootstrap $suite from $mirror (log: $log)"
  if ! debootstrap --variant=minbase --include=python3 ${keyring:+--keyring="$keyring"} \
      "$suite" "$root" "$mirror" $script >"$log" 2>&1; then
    [ "$required" = yes ] && { tail -20 "$log"; exit 1; }
    echo "skipped $image: debootstrap $suite failed (see $log)"
    return 0
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
  echo "built $image"
}

# derived_image TAG FROM PACKAGES EXTRA_RUN: FROM + apt-get install at set-up time, never at test time.
derived_image() {
  local image="$1" from="$2" packages="$3" extra="${4:-true}"
  if have "$image"; then echo "image $image already present"; return 0; fi
  local log="/tmp/glm-deploy-build-${image//[:\/]/-}.log"
  docker build -t "$image" --build-arg "FROM=$from" - >"$log" 2>&1 <<EOF || { tail -20 "$log"; exit 1; }
ARG FROM
FROM \${FROM}
RUN apt-get update -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null \\
    && rm -rf /var/lib/apt/lists/* && $extra
EOF
  echo "built $image"
}

stock_image bookworm debian yes
stock_image trixie debian no
stock_image noble ubuntu no
derived_image "$BASE" "$STOCK:bookworm" "python3-numpy python3-yaml git curl ca-certificates tini"
derived_image "$TOOLS" "$BASE" "haproxy" "mkdir -p /usr/local/etc/haproxy"

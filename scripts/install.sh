#!/usr/bin/env bash
# Install glm-deploy the way PEP 668 systems (Debian 12, Ubuntu 24.04) want it: the project in its own virtual
# environment (<repo>/.venv, or GLM_DEPLOY_VENV), `deploy` linked onto the PATH (/usr/local/bin as root,
# ~/.local/bin otherwise). Needs only the distribution's python3 (3.10+); python3-venv is installed with apt-get
# when it is missing and this runs as root, otherwise one line says what to install. Idempotent: a re-run
# reuses the environment and updates the project in it.
# Usage: scripts/install.sh [--extras EXTRA[,EXTRA]] [--no-link]     Exit 2 bad option, 4 something missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${GLM_DEPLOY_VENV:-$ROOT/.venv}"
extras=""
link=yes
say() { echo "install.sh: $*" >&2; }
fail() { say "$1"; exit "${2:-4}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) [ $# -ge 2 ] || fail "--extras needs a value, e.g. --extras test" 2; extras="[$2]"; shift 2 ;;
    --no-link) link=no; shift ;;
    *) fail "unknown option $1 -- usage: scripts/install.sh [--extras EXTRA] [--no-link]" 2 ;;
  esac
done

command -v python3 >/dev/null || fail "python3 is missing -- install it (apt-get install python3), then run this again"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$(python3 -V 2>&1) is too old -- glm-deploy needs Python 3.10 or newer"

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
      fail "python3 cannot make virtual environments -- run \`sudo apt-get install python3-venv\`, then this again"
    fi
    say "installing python3-venv with apt-get (python3 cannot make virtual environments without it)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; } \
      || fail "apt-get could not install python3-venv -- check the apt sources, then run this again"
  fi
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    fail "$VENV exists and is not a virtual environment -- move it away or set GLM_DEPLOY_VENV" 2
  fi
  say "creating the virtual environment $VENV"
  python3 -m venv --clear "$VENV" || fail "python3 -m venv $VENV failed"
fi

say "installing glm-deploy$extras into $VENV (from $ROOT)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT$extras" \
  || fail "pip could not install glm-deploy into $VENV (see pip's message above); run this again to retry"

[ "$link" = yes ] || exit 0
if [ "$(id -u)" -eq 0 ]; then bindir=/usr/local/bin; else bindir="$HOME/.local/bin"; fi
if [ -e "$bindir/deploy" ] && [ ! -L "$bindir/deploy" ]; then
  fail "$bindir/deploy exists and is not a link -- remove it, or run $VENV/bin/deploy directly"
fi
mkdir -p "$bindir"
ln -sfn "$VENV/bin/deploy" "$bindir/deploy"
say "$("$bindir/deploy" --version) installed: $bindir/deploy -> $VENV/bin/deploy"
case ":$PATH:" in
  *":$bindir:"*) ;;
  *) say "note: $bindir is not on your PATH -- run: export PATH=\"$bindir:\$PATH\" (new logins on Debian and Ubuntu add it)" ;;
esac

#!/usr/bin/env bash
# Installs everything the product and its tests need into .venv (idempotent and quick when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
STAMP=.venv/.setup-stamp
HASH=$(cat pyproject.toml scripts/setup.sh scripts/jupyterlab-overrides.json | sha256sum | cut -d' ' -f1)

need_apt=()
command -v node >/dev/null || need_apt+=(nodejs npm)
command -v pg_isready >/dev/null || need_apt+=(postgresql)
command -v chromium >/dev/null || need_apt+=(chromium)  # the account page is tested in a real browser
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x .venv/bin/jupyterhub-inference ] \
   && [ -x .node/node_modules/.bin/configurable-http-proxy ] && [ -d .node/node_modules/oidc-provider ]; then
  echo "setup: up to date"
  exit 0
fi

[ -x .venv/bin/python ] || $PY -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exactly: this version is on the machine's disk; anything looser downloads a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
(mkdir -p .node && npm install -s --no-fund --no-audit --prefix .node configurable-http-proxy@5 oidc-provider@9 >/dev/null 2>&1) &
NPM=$!
.venv/bin/python -m pip install -q -e ".[service,notebook,test]"
wait $NPM
[ -x .node/node_modules/.bin/configurable-http-proxy ] || { echo "setup: configurable-http-proxy failed to install"; exit 1; }
[ -d .node/node_modules/oidc-provider ] || { echo "setup: oidc-provider (the tests' OIDC provider) failed to install"; exit 1; }
# JupyterLab in spawned servers: no prompt to fetch news or check for updates (these machines may be offline).
mkdir -p .venv/share/jupyter/lab/settings
cp scripts/jupyterlab-overrides.json .venv/share/jupyter/lab/settings/overrides.json
echo "$HASH" > "$STAMP"
echo "setup: done"

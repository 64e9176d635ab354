#!/usr/bin/env bash
# Starts a real JupyterHub with the inference service on http://127.0.0.1:8000 (SQLite, demo models).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
export DEMO_PASSWORD=${DEMO_PASSWORD:-inference-demo}
export INFERENCE_STATE_DIR=${INFERENCE_STATE_DIR:-$(pwd)/var}
cat <<MSG

  JupyterHub with the inference service: http://127.0.0.1:8000
  Log in with any user name and the password:  $DEMO_PASSWORD
  (user name 'admin' is a Hub admin; it needs DEMO_ADMIN_PASSWORD, 32+ characters, to log in)
  Then: Services -> inference, or make a key:
    Token page: http://127.0.0.1:8000/hub/token  (a Hub token works as a credential too)
    curl -H "Authorization: Bearer \$TOKEN" -X POST -d '{"name":"laptop"}' http://127.0.0.1:8000/services/inference/api/keys
    curl -H "Authorization: Bearer \$KEY" http://127.0.0.1:8000/services/inference/v1/models
  The first start builds a small offline model when the machine cannot download one (about a minute).

MSG
exec .venv/bin/jupyterhub -f jupyterhub_config.py

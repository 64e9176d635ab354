#!/usr/bin/env bash
# Starts a real JupyterHub with the inference service on http://127.0.0.1:8000 (SQLite, demo models, local accounts).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
export INFERENCE_STATE_DIR=${INFERENCE_STATE_DIR:-$(pwd)/var}
export INFERENCE_LOGIN=${INFERENCE_LOGIN:-local}
export INFERENCE_FIRST_ADMIN=${INFERENCE_FIRST_ADMIN:-admin}
if [ -n "${INFERENCE_FIRST_ADMIN_PASSWORD:-}" ]; then
  admin_password="the password in INFERENCE_FIRST_ADMIN_PASSWORD"
else
  admin_password="printed ONCE in the log below at the first start (\"First admin ... created with the password\")"
fi
cat <<MSG

  JupyterHub with the inference service: http://127.0.0.1:8000
  Sign in as the first admin '$INFERENCE_FIRST_ADMIN': $admin_password
    (change it at http://127.0.0.1:8000/hub/change-password)
  Anyone else signs up at http://127.0.0.1:8000/hub/signup (registration: ${INFERENCE_REGISTRATION:-open};
    INFERENCE_REGISTRATION=approval or invite to change it; README "Login and registration")
  Signing in starts your JupyterLab; open 01-quickstart.ipynb in its file browser and run it (no key needed;
    02-account and 03-admin are there too). Or: Services -> inference, or make a key:
    Token page: http://127.0.0.1:8000/hub/token  (a Hub token works as a credential too)
    curl -H "Authorization: Bearer \$TOKEN" -X POST -d '{"name":"laptop"}' http://127.0.0.1:8000/services/inference/api/keys
    curl -H "Authorization: Bearer \$KEY" http://127.0.0.1:8000/services/inference/v1/models
  The first start builds a small offline model when the machine cannot download one (about a minute).

MSG
exec .venv/bin/jupyterhub -f jupyterhub_config.py

"""JupyterHub with the inference service: `make demo` runs it; login providers by environment.

INFERENCE_LOGIN   demo (default: one shared password, printed by `make demo`), github, oidc
INFERENCE_DB_URL  the service's database (default: sqlite:///var/inference.sqlite; see jupyterhub_inference_config.py)
INFERENCE_MODELS_CONFIG  the model registry (default: the demo models: a small instruct model by hub id
                  when online, else a tiny model built offline; MiniLM for embeddings)
"""

import os
import shutil
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
from hub_extension.hub_config import configure  # noqa: E402

c = get_config()  # noqa: F821
state = Path(os.environ.get("INFERENCE_STATE_DIR", here / "var"))
state.mkdir(parents=True, exist_ok=True)

c.JupyterHub.bind_url = os.environ.get("JUPYTERHUB_BIND_URL", "http://127.0.0.1:8000")
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.db_url = os.environ.get("JUPYTERHUB_DB_URL", f"sqlite:///{state / 'jupyterhub.sqlite'}")
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.command = [
    str(here / ".node/node_modules/.bin/configurable-http-proxy") if (here / ".node").exists()
    else shutil.which("configurable-http-proxy") or "configurable-http-proxy"
]
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
c.JupyterHub.spawner_class = "simple"
c.Spawner.cmd = [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
if os.getuid() == 0:
    c.Spawner.args = ["--allow-root"]

login = os.environ.get("INFERENCE_LOGIN", "demo")
admins = {a for a in os.environ.get("INFERENCE_ADMINS", "admin").split(",") if a}
if login == "github":
    c.JupyterHub.authenticator_class = "github"
    c.GitHubOAuthenticator.oauth_callback_url = os.environ["OAUTH_CALLBACK_URL"]
    c.GitHubOAuthenticator.allow_all = os.environ.get("INFERENCE_ALLOW_ALL", "") == "1"
elif login == "oidc":
    c.JupyterHub.authenticator_class = "generic-oauth"
    c.GenericOAuthenticator.oauth_callback_url = os.environ["OAUTH_CALLBACK_URL"]
    c.GenericOAuthenticator.manage_groups = True
    c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"
    c.GenericOAuthenticator.username_claim = "preferred_username"
    c.GenericOAuthenticator.allow_all = os.environ.get("INFERENCE_ALLOW_ALL", "") == "1"
else:
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = os.environ.get("DEMO_PASSWORD") or "inference-demo"
    if os.environ.get("DEMO_ADMIN_PASSWORD"):
        c.SharedPasswordAuthenticator.admin_password = os.environ["DEMO_ADMIN_PASSWORD"]
    c.Authenticator.allow_all = True
c.Authenticator.admin_users = admins

# The service's own settings (database, models) live in jupyterhub_inference_config.py, which the admin
# commands read too.
# Spawned servers' kernels load `kernel_ext` (no key to paste) unless INFERENCE_KERNEL_EXTENSION=0.
configure(
    c,
    port=int(os.environ.get("INFERENCE_PORT", "8010")),
    config_file=here / "jupyterhub_inference_config.py",
    load_kernel_extension=os.environ.get("INFERENCE_KERNEL_EXTENSION", "1") != "0",
)

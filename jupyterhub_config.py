"""JupyterHub with the inference service: `make demo` runs it; login providers by environment.

INFERENCE_LOGIN   local (default: accounts kept by the service), github, oidc; with INFERENCE_REGISTRATION and
                  the provider's variables (README "Login and registration")
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
from hub_extension.hub_config import configure, example_notebooks_hook  # noqa: E402

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
# Each user's server opens in var/users/<name> (also its home, so everything of the demo stays in var/), where
# the example notebooks (notebooks/*.ipynb) are copied at every start unless the user already has a copy there.
c.Spawner.pre_spawn_hook = example_notebooks_hook(state / "users")
c.SimpleLocalProcessSpawner.home_dir_template = str(state / "users" / "{username}")

# -- Login (README "Login and registration"): one registration policy for every provider -------------------
def env_list(name: str) -> set[str]:
    return {v.strip() for v in os.environ.get(name, "").split(",") if v.strip()}


AUTHENTICATORS = {
    "local": "hub_extension.login.local.LocalAccountsAuthenticator",
    "github": "hub_extension.login.providers.GitHubLogin",
    "oidc": "hub_extension.login.providers.OIDCLogin",
}
login = os.environ.get("INFERENCE_LOGIN", "local")
if login not in AUTHENTICATORS:
    raise ValueError(f"INFERENCE_LOGIN must be one of {', '.join(AUTHENTICATORS)}, not {login!r}")
c.JupyterHub.authenticator_class = AUTHENTICATORS[login]
registration_mode = os.environ.get("INFERENCE_REGISTRATION", "open")
c.Authenticator.registration_mode = registration_mode
c.Authenticator.service_config_file = str(here / "jupyterhub_inference_config.py")
if os.environ.get("INFERENCE_TRUSTED_PROXIES"):
    c.Authenticator.trusted_proxies = sorted(env_list("INFERENCE_TRUSTED_PROXIES"))
if login == "local":
    from hub_extension.login.local import NAV_TEMPLATES

    c.JupyterHub.template_paths = [NAV_TEMPLATES]  # a "Password" link in the Hub's navigation bar
    # Admin by name for local accounts only; the first admin is created at first start.
    c.LocalAccountsAuthenticator.admin_users = env_list("INFERENCE_ADMINS")
    c.LocalAccountsAuthenticator.bootstrap_admin = os.environ.get("INFERENCE_FIRST_ADMIN", "admin")
    c.LocalAccountsAuthenticator.bootstrap_admin_password = os.environ.get("INFERENCE_FIRST_ADMIN_PASSWORD", "")
else:
    # Never admin by name (`admin_users` is refused): admin only for an e-mail the provider verified.
    provider = c[AUTHENTICATORS[login].rsplit(".", 1)[1]]
    provider.admin_emails = env_list("INFERENCE_ADMIN_EMAILS")
    provider.oauth_callback_url = os.environ.get(
        "OAUTH_CALLBACK_URL", c.JupyterHub.bind_url.rstrip("/") + "/hub/oauth_callback"
    )
if login == "github":
    c.GitHubLogin.client_id = os.environ["GITHUB_CLIENT_ID"]
    c.GitHubLogin.client_secret = os.environ["GITHUB_CLIENT_SECRET"]
    c.GitHubLogin.allowed_organizations = env_list("GITHUB_ORGS")
elif login == "oidc":
    c.OIDCLogin.issuer = os.environ["OIDC_ISSUER"]
    c.OIDCLogin.client_id = os.environ["OIDC_CLIENT_ID"]
    c.OIDCLogin.client_secret = os.environ["OIDC_CLIENT_SECRET"]
    c.OIDCLogin.groups_claim = os.environ.get("OIDC_GROUPS_CLAIM", "groups")
    c.OIDCLogin.username_claim = os.environ.get("OIDC_USERNAME_CLAIM", "preferred_username")
    c.OIDCLogin.scope = sorted(env_list("OIDC_SCOPES") or {"openid", "email", "profile"})
    if os.environ.get("OIDC_NAME"):
        c.OIDCLogin.login_service = os.environ["OIDC_NAME"]

# The service's own settings (database, models) live in jupyterhub_inference_config.py, which the admin
# commands read too.
# Spawned servers' kernels load `kernel_ext` (no key to paste) unless INFERENCE_KERNEL_EXTENSION=0.
configure(
    c,
    port=int(os.environ.get("INFERENCE_PORT", "8010")),
    config_file=here / "jupyterhub_inference_config.py",
    registration_mode=registration_mode,  # a user the service sees first (through the API) is pending too
    load_kernel_extension=os.environ.get("INFERENCE_KERNEL_EXTENSION", "1") != "0",
)

"""A real JupyterHub (and its proxy) with local accounts in one registration mode, and the inference service as a
Hub-managed service (no models: these tests need none). The session `hub` fixture keeps its own authenticator;
this one is for the login tests (`test_login_local_e2e.py`), one Hub per mode and module at most.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from conftest import HubAPI, free_port, wait_for
from hub_process import PROXY, hub_base_config, start_hub, stop_hub
from requests.adapters import HTTPAdapter

ADMIN = "boss"
ADMIN_PASSWORD = "a long passphrase for the chief"
# Low enough for the brute-force tests to reach quickly, high enough for the browser tests' own mistakes.
LIMITS = {"login_limit_per_account": 5, "login_limit_per_address": 12, "signup_limit_per_address": 100,
          "signup_limit_per_account": 100, "invite_limit_per_address": 100, "invite_limit_per_code": 100}


@dataclass
class LoginHub:
    mode: str
    url: str  # the proxy's public URL, e.g. http://127.0.0.1:PORT
    hub_url: str  # the Hub's own port, without the proxy
    api: HubAPI  # the Hub's REST API as an admin service
    db_url: str  # the service's database, which the Hub's login uses too
    log_path: Path

    @property
    def service_url(self) -> str:
        return f"{self.url}/services/inference/"

    def admin_token(self) -> str:
        """A Hub API token of the first admin (a Hub admin: an admin of the service too)."""
        return self.api.user_token(ADMIN)

    def service(self, method: str, path: str, token: str, **kw) -> requests.Response:
        return requests.request(method, self.service_url + path, headers={"Authorization": f"Bearer {token}"},
                                timeout=30, **kw)


def _config(tmp: Path, mode: str, ports: dict, token: str, service_config: Path) -> str:
    return hub_base_config(tmp, ports) + f"""
from hub_extension.hub_config import configure

c.JupyterHub.redirect_to_server = False
c.JupyterHub.spawner_class = "simple"
c.JupyterHub.log_level = "INFO"
c.JupyterHub.authenticator_class = "hub_extension.login.local.LocalAccountsAuthenticator"
from hub_extension.login.local import NAV_TEMPLATES
c.JupyterHub.template_paths = [NAV_TEMPLATES]
c.LocalAccountsAuthenticator.registration_mode = {mode!r}
c.LocalAccountsAuthenticator.bootstrap_admin = {ADMIN!r}
c.LocalAccountsAuthenticator.bootstrap_admin_password = {ADMIN_PASSWORD!r}
c.LocalAccountsAuthenticator.service_config_file = {str(service_config)!r}
c.LocalAccountsAuthenticator.auth_refresh_age = 1  # a user disabled meanwhile is signed out within a second
for name, value in {LIMITS!r}.items():
    setattr(c.LocalAccountsAuthenticator, name, value)
configure(
    c,
    port={ports['service']},
    config_file={str(service_config)!r},
    registration_mode={mode!r},
    load_kernel_extension=False,
    extra_args=["--UserDirectory.sync_interval=1", "--UserDirectory.cache_seconds=1",
                "--IdentityProvider.hub_token_cache_seconds=1", "--InferenceService.port={ports['service']}"],
)
c.JupyterHub.services.append({{"name": "tester", "api_token": {token!r}}})
c.JupyterHub.load_roles.append({{"name": "tester", "services": ["tester"],
                                 "scopes": ["admin:users", "admin:groups", "tokens", "list:users", "read:users"]}})
"""


@contextmanager
def login_hub(tmp: Path, mode: str) -> Iterator[LoginHub]:
    """Start the Hub in `mode`; yield once the service answers through the proxy; stop everything it started."""
    if not PROXY.exists():
        raise RuntimeError("configurable-http-proxy is missing: run `make setup`")
    ports = {k: free_port() for k in ("public", "hub", "proxy_api", "service")}
    token = secrets.token_hex(32)
    db_url = f"sqlite:///{tmp / 'inference.sqlite'}"
    service_config = tmp / "jupyterhub_inference_config.py"
    service_config.write_text(f"c = get_config()\nc.InferenceService.db_url = {db_url!r}\n"
                              f"c.InferenceService.cookie_secret_file = {str(tmp / 'inference_cookie_secret')!r}\n")
    log_path = tmp / "hub.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "INFERENCE_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = start_hub(tmp, _config(tmp, mode, ports, token, service_config), env)
    public = f"http://127.0.0.1:{ports['public']}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited: {log_path.read_text()[-3000:]}")
            return requests.get(f"{public}/services/inference/health", timeout=5).status_code == 200

        wait_for(up, timeout=180, interval=0.3, what=f"the login Hub ({mode}; log: {log_path})")
        yield LoginHub(mode, public, f"http://127.0.0.1:{ports['hub']}", HubAPI(public, token), db_url, log_path)
    finally:
        stop_hub(proc, tmp / "proxy.pid", cmdline_marker=f"--InferenceService.port={ports['service']}")


class SourceAddress(HTTPAdapter):
    """Connections from a given local address (127.0.0.2...: untrusted, as the Hub's trusted proxy is 127.0.0.1)."""

    def __init__(self, address: str, **kwargs):
        self.address = address
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client_from(address: str) -> requests.Session:
    session = requests.Session()
    adapter = SourceAddress(address)
    session.mount("http://", adapter)
    return session

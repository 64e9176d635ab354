"""A JupyterHub of its own for the provider login tests (GitHub faked on loopback, a real OIDC provider).

`OAuthHub(tmp, login_config).start()` runs `jupyterhub` with the inference service (no models) and the given
authenticator lines (tests/login_hub.py is the same for local accounts, whose config it fixes), every outgoing request of the Hub held to loopback: Tornado's HTTP client (what
oauthenticator uses) refuses any other host and logs `BLOCKED non-loopback request`, and HTTP(S)_PROXY point
at a dead port for anything using the environment's proxies. `stop()` stops the Hub, its proxy and the service.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from conftest import ROOT, HubAPI, free_port, wait_for
from hub_process import hub_base_config, start_hub, stop_hub
from traitlets.config.loader import PyFileConfigLoader

BLOCKED = "BLOCKED non-loopback request"

_GUARD = f'''
from urllib.parse import urlsplit
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.log import app_log
from tornado.simple_httpclient import SimpleAsyncHTTPClient


class LoopbackOnly(SimpleAsyncHTTPClient):
    """Any host that is not faked on loopback fails the request (and the test, which reads the log)."""

    def fetch_impl(self, request, callback):
        if urlsplit(request.url).hostname not in ("127.0.0.1", "::1"):
            app_log.error("{BLOCKED} to %s", request.url)
            callback(HTTPResponse(request, 599, error=OSError("{BLOCKED}")))
            return
        super().fetch_impl(request, callback)


AsyncHTTPClient.configure(LoopbackOnly)
'''


class OAuthHub:
    def __init__(self, tmp: Path, login_config: str = "", roles: list[dict] | None = None,
                 registration_mode: str = "open"):
        self.tmp = tmp
        self.login_config = login_config
        self.roles = roles or []
        self.registration_mode = registration_mode  # the service's too (a user it sees first is pending)
        self.ports = {k: free_port() for k in ("public", "hub", "proxy_api", "service")}
        self.url = f"http://127.0.0.1:{self.ports['public']}"
        self.token = secrets.token_hex(32)
        self.api = HubAPI(self.url, self.token)
        self.service_db = f"sqlite:///{tmp / 'inference.sqlite'}"
        self.log_path = tmp / "hub.log"
        self.process: subprocess.Popen | None = None

    @property
    def callback_url(self) -> str:
        return f"{self.url}/hub/oauth_callback"

    def user(self, name: str) -> dict:
        """The Hub's model of a user (admin flag, groups)."""
        return self.api.request("GET", f"/users/{name}").json()

    def config(self) -> str:
        service_config = self.tmp / "inference_config.py"
        service_config.write_text(f"c = get_config()\nc.InferenceService.db_url = {self.service_db!r}\n")
        return hub_base_config(self.tmp, self.ports) + f"""
{_GUARD}
from hub_extension.hub_config import configure

c.JupyterHub.spawner_class = "simple"
c.JupyterHub.log_level = "INFO"
configure(c, port={self.ports['service']}, config_file={str(service_config)!r}, load_kernel_extension=False,
          roles={self.roles!r}, registration_mode={self.registration_mode!r}, extra_args=["--InferenceService.port={self.ports['service']}"])
c.JupyterHub.services.append({{"name": "tester", "api_token": {self.token!r}}})
c.JupyterHub.load_roles.append({{"name": "tester", "services": ["tester"],
                                 "scopes": ["admin:users", "admin:groups", "tokens", "list:users", "read:users"]}})
c.Authenticator.service_config_file = {str(service_config)!r}
{self.login_config}
"""

    def start(self, wait: bool = True) -> OAuthHub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "INFERENCE_"))}
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        env.update({
            "INFERENCE_CONFIG": "", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
        })
        self.process = start_hub(self.tmp, self.config(), env)
        if wait:
            try:
                wait_for(self._up, timeout=120, interval=0.2, what=f"the Hub (log: {self.log_path})")
            except BaseException:
                self.stop()
                raise
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"jupyterhub exited: {self.log()[-3000:]}")
        return requests.get(f"{self.url}/services/inference/health", timeout=5).status_code == 200

    def service_status(self, name: str) -> str | None:
        """The user's status in the service's database (what the login and the service both go by)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.service_db)
        try:
            with engine.connect() as conn:
                return conn.execute(text("SELECT status FROM users WHERE name = :n"), {"n": name}).scalar()
        finally:
            engine.dispose()

    def service(self, method: str, path: str, token: str, **kw) -> requests.Response:
        return requests.request(method, f"{self.url}/services/inference/{path}",
                                headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_hub(self.process, self.tmp / "proxy.pid",
                     cmdline_marker=f"--InferenceService.port={self.ports['service']}")

    def __enter__(self) -> OAuthHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def follow_login(session: requests.Session, hub: OAuthHub, login: str, password: str) -> requests.Response:
    """Sign in through the provider's own login form, the way a browser would; the last response."""
    r = session.get(f"{hub.url}/hub/oauth_login", params={"next": "/hub/home"}, timeout=30)
    assert r.status_code == 200 and 'name="login"' in r.text, r.text[:500]
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    target = requests.compat.urljoin(r.url, action.group(1)) if action else r.url
    return session.post(target, data={"login": login, "password": password}, timeout=60)


def invited_login(hub: OAuthHub, admin: str, name: str, password: str) -> str:
    """Invite mode through the provider: `admin` (let in without an invite) makes an invite with the group
    `invited-team`; `name` is refused without it (nobody made), then let in with it, active. The invite's link."""
    assert follow_login(requests.Session(), hub, admin, f"{admin}-password").url.endswith("/hub/home")
    assert hub.user(admin)["admin"] is True
    r = hub.service("POST", "api/invites", hub.api.user_token(admin), json={"groups": ["invited-team"]})
    assert r.status_code == 201, r.text
    invite = r.json()["url"]
    r = follow_login(requests.Session(), hub, name, password)
    assert r.status_code == 403 and r.url.endswith("/hub/registration/invite-required"), r.url
    assert hub.service_status(name) is None
    session = requests.Session()
    assert session.get(invite, timeout=30).status_code == 200
    r = follow_login(session, hub, name, password)
    assert r.status_code == 200 and r.url.endswith("/hub/home"), r.url
    assert hub.service_status(name) == "active"
    return invite


def hub_config(monkeypatch, tmp_path, **env):
    """The repository's jupyterhub_config.py loaded with `env` (and none of the login variables not given)."""
    for name in ("INFERENCE_ADMINS", "INFERENCE_ADMIN_EMAILS", "INFERENCE_REGISTRATION", "GITHUB_ORGS",
                 "INFERENCE_TRUSTED_PROXIES", "OAUTH_CALLBACK_URL", "JUPYTERHUB_BIND_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INFERENCE_STATE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return PyFileConfigLoader("jupyterhub_config.py", path=str(ROOT)).load_config()


def start_login(hub: OAuthHub) -> tuple[requests.Session, str]:
    """Begin a login (the state cookie is set) without going to the provider: the session and the OAuth state."""
    session = requests.Session()
    r = session.get(f"{hub.url}/hub/oauth_login", allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text[:300]
    return session, parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]

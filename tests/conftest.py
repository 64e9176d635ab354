"""Session fixtures: a PostgreSQL database, one real JupyterHub with its proxy and the inference service.

The Hub runs as a subprocess with the service as a Hub-managed service on SQLite (`/services/inference/`).
A second instance of the service, registered with the Hub as an external service, runs in this process on
its own thread against PostgreSQL (`/services/inference-pg/`), so every end-to-end test runs through the
Hub's proxy on both databases, and tests can look inside that instance (statement counts, the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from engine_fixtures import model_config_file, tiny_model_dir  # noqa: F401
from hub_process import PROXY, hub_base_config, start_hub, stop_hub  # noqa: F401 (shared with tests)
from pg import temp_database

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No config file for the services tests start (the repository's own jupyterhub_inference_config.py is the demo's).
os.environ["INFERENCE_CONFIG"] = ""
ROOT = Path(__file__).resolve().parent.parent

# Short bounds so "within the bound" tests finish quickly; tests poll, they never assert durations.
HUB_SYNC_SECONDS = 1
CACHE_SECONDS = 1

# Roles the test Hub is configured with (config as code), also handed to the services.
TEST_ROLES = [
    {"name": "inference-embedders", "groups": ["embedders"], "scopes": ["custom:inference:embeddings"]},
    {"name": "inference-admins", "groups": ["inference-admins"], "scopes": ["custom:inference:admin"]},
    # A model scope (declared by hub_config.configure because a role uses it): test_admin_e2e.
    {"name": "inference-minilm", "groups": ["embedders"], "scopes": ["custom:inference:model:minilm"]},
    # A scraper's role: /metrics without administering anything (test_metrics_e2e).
    {"name": "inference-scrapers", "groups": ["scrapers"], "scopes": ["custom:inference:metrics"]},
]


def pytest_collection_finish(session) -> None:
    """Everything imported so far (torch, transformers...) lives as long as the run: move it out of the garbage
    collector's sight, so the full collections transformers and the service make on every model unload cost
    milliseconds, not a third of a second each."""
    gc.freeze()


def pytest_collection_modifyitems(items) -> None:
    """Every test that needs the Hub is end-to-end (`-m e2e`); the rest is the fast tier (`-m "not e2e"`)."""
    for item in items:
        if "hub" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except requests.ConnectionError:  # a server still starting refuses connections
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def new_key(url: str, token: str, **fields) -> str:
    """A key made through the API with `token` (a Hub token or a key): the secret."""
    r = requests.post(url + "api/keys", headers=bearer(token), json={"name": "k", **fields}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def run_command(capsys, *argv: str) -> tuple[int, str]:
    """An admin command in this process: (exit code, its output; the error message when it failed)."""
    from hub_extension.cli import run

    code = run(list(argv))
    out = capsys.readouterr()
    return code, out.out if code == 0 else out.err  # stderr may also hold other threads' log lines


def clean_env() -> dict:
    """This process's environment without the Hub's or the service's settings (and no config file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "INFERENCE_"))}
    return {**env, "INFERENCE_CONFIG": ""}


def serve(tmp_path, *args, env=None) -> tuple[subprocess.Popen, str]:
    """The service as its own process on a free port (SQLite in `tmp_path`), once it answers /health."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub_extension", "serve", f"--port={port}", f"--db-url=sqlite:///{tmp_path / 'svc.sqlite'}", *args],
        cwd=ROOT, env={**clean_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: proc.poll() is None and requests.get(url + "health", timeout=2).ok, 60, 0.1, "service")
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.stdout.read().decode()) from None
    return proc, url


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)  # the service must stop by itself; this only bounds the test
    return out.decode()


def user_action(app, name: str, action: str) -> None:
    """An admin's `approve|deny|disable|enable` on the in-process instance, as the admin API would make it."""
    audit = {"actor": "test", "subject": name, "client_ip": None}
    asyncio.run_coroutine_threadsafe(app.services.users.apply_action(name, action, audit=audit), app._loop).result(10)


# -- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test run, dropped at the end."""
    with temp_database("jhi_test") as url:
        yield url


@pytest.fixture(scope="session")
def pg_unit_url():
    """One PostgreSQL database with the current schema for the component tests, emptied before each of them
    (making a database costs about 0.4 s here; emptying one costs milliseconds)."""
    from hub_extension.db import Database

    with temp_database("jhi_unit") as url:
        db = Database(url, threads=1)
        db.upgrade()
        db.close()
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A database URL for component tests, on both backends: a new, empty database each time."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite'}"
        return
    from sqlalchemy import create_engine, text

    from hub_extension.orm import Base

    url = request.getfixturevalue("pg_unit_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield url


@pytest.fixture
def db(db_url):
    """A migrated `Database` on `db_url` (both backends), closed after the test."""
    from hub_extension.db import Database

    database = Database(db_url, threads=8)  # enough connections for the concurrency tests (invite races)
    database.upgrade()
    yield database
    database.close()


# -- the Hub ----------------------------------------------------------------------------------------


@dataclass
class HubAPI:
    """The Hub's REST API with an admin service token (how tests make users, groups and tokens)."""

    url: str  # public URL of the proxy, e.g. http://127.0.0.1:PORT
    token: str

    def request(self, method: str, path: str, **kw) -> requests.Response:
        # A connection per call: a kept-alive one can be closed by the proxy (idle for 5 s) just as a request
        # goes out on it, and a POST is not retried ("Remote end closed connection without response").
        r = requests.request(method, f"{self.url}/hub/api{path}", headers={"Authorization": f"token {self.token}"},
                             timeout=30, **kw)
        r.raise_for_status()
        return r

    def create_user(self, name: str, admin: bool = False) -> str:
        if admin:
            self.request("POST", f"/users/{name}", json={"admin": True})
        else:
            self.request("POST", f"/users/{name}")
        return name

    def user_token(self, name: str, scopes: list[str] | None = None, expires_in: int | None = None) -> str:
        body: dict = {"note": "test"}
        if scopes is not None:
            body["scopes"] = scopes
        if expires_in is not None:
            body["expires_in"] = expires_in
        return self.request("POST", f"/users/{name}/tokens", json=body).json()["token"]

    def delete_user(self, name: str) -> None:
        self.request("DELETE", f"/users/{name}")

    def add_to_group(self, group: str, user: str) -> None:
        try:
            self.request("POST", f"/groups/{group}")
        except requests.HTTPError as e:
            if e.response.status_code != 409:
                raise
        self.request("POST", f"/groups/{group}/users", json={"users": [user]})

    def remove_from_group(self, group: str, user: str) -> None:
        self.request("DELETE", f"/groups/{group}/users", json={"users": [user]})


@dataclass
class Instance:
    """One instance of the service behind the Hub's proxy."""

    name: str
    backend: str
    url: str  # base URL through the proxy, ending in '/'
    app: object | None = None  # the in-process InferenceService (PostgreSQL instance only)


@dataclass
class Hub:
    url: str
    api: HubAPI
    instances: dict[str, Instance]
    process: subprocess.Popen
    log_path: Path

    def new_user(self, prefix: str = "u", admin: bool = False) -> str:
        return self.api.create_user(f"{prefix}-{secrets.token_hex(4)}", admin=admin)

    def new_admin(self) -> str:
        """A fresh service admin: a member of the Hub group whose role grants `custom:inference:admin`.

        (The Hub lets only its own admins create Hub admins; the tests' Hub client is a service.)
        """
        name = self.new_user("adm")
        self.api.add_to_group("inference-admins", name)
        return name


class ServiceThread(threading.Thread):
    """Runs an InferenceService on its own event loop in this process."""

    def __init__(self, config):
        super().__init__(daemon=True, name="inference-pg")
        from hub_extension.app import InferenceService

        self.app = InferenceService(config=config)
        self.app.initialize([])
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.app.start()
        except BaseException as e:  # surfaced by the fixture
            self.error = e
            self.app.ready.set()

    def stop(self) -> None:
        self.app.stop()
        self.join(30)


@contextlib.contextmanager
def direct_instance(hub, models_config, db_url: str, tmp: Path, name: str, configure=None):
    """Another instance of the service in this process, checking credentials with the session's Hub but reached
    directly on loopback (not through the proxy); `configure(cfg)` adds settings. Yields its URL (ending in /)."""
    from traitlets.config import Config

    port = free_port()
    cfg = Config()
    cfg.IdentityProvider.mode = "hub"
    cfg.InferenceService.ip = "127.0.0.1"
    cfg.InferenceService.port = port
    cfg.InferenceService.base_url = "/"
    cfg.InferenceService.db_url = db_url
    cfg.InferenceService.models_config = str(models_config)
    cfg.InferenceService.cookie_secret_file = str(tmp / f"{name}-cookie-secret")
    cfg.PermissionPolicy.hub_roles = TEST_ROLES
    cfg.UserDirectory.sync_interval = HUB_SYNC_SECONDS
    cfg.IdentityProvider.hub_token_cache_seconds = CACHE_SECONDS
    cfg.UserDirectory.cache_seconds = CACHE_SECONDS
    cfg.HubOAuth.api_url = f"{hub.url}/hub/api"
    cfg.HubOAuth.api_token = hub.api.token
    cfg.HubOAuth.oauth_client_id = f"service-inference-{name}"
    cfg.HubOAuth.access_scopes = set()
    if configure is not None:
        configure(cfg)
    with running(cfg):
        yield f"http://127.0.0.1:{port}/"


@contextlib.contextmanager
def running(cfg):
    """A `ServiceThread` on `cfg`, started and ready (or its start error raised), stopped on exit."""
    service = ServiceThread(cfg)
    service.start()
    try:
        service.app.ready.wait(120)
        if service.error:
            raise service.error
        yield service
    finally:
        service.stop()


UPSTREAM_ENTRIES = """
  - name: upstream-chat
    task: chat
    upstream: {{base_url: "{base}", api_key_env: INFERENCE_TEST_UPSTREAM_KEY, model: tiny-chat}}
  - name: upstream-embed
    task: embedding
    upstream: {{base_url: "{base}", api_key_env: INFERENCE_TEST_UPSTREAM_KEY, model: minilm}}
"""


def _hub_config(tmp: Path, ports: dict, tokens: dict, sqlite_url: str, models: Path) -> str:
    return hub_base_config(tmp, ports) + f"""
from hub_extension.hub_config import configure, SERVICE_SCOPES, access_scope, example_notebooks_hook

c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = "test-password-1"
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {{"admin"}}
c.JupyterHub.spawner_class = "simple"
# Real single-user servers (tests/remote_kernel.py spawns them): each opens in its own notebook dir under the
# test's tmp dir, where the hook of `make demo` put the example notebooks.
c.Spawner.cmd = [{str(Path(sys.executable).parent / "jupyterhub-singleuser")!r}]
c.Spawner.args = {["--allow-root"] if os.getuid() == 0 else []!r}
c.SimpleLocalProcessSpawner.home_dir_template = {str(tmp / "home" / "{username}")!r}
c.Spawner.pre_spawn_hook = example_notebooks_hook({str(tmp / "notebooks")!r})
c.Spawner.start_timeout = c.Spawner.http_timeout = 180  # two busy cores
c.JupyterHub.log_level = "WARN"
configure(
    c,
    port={ports['service']},
    db_url={sqlite_url!r},
    models_config={str(models)!r},
    roles={TEST_ROLES!r},
    load_kernel_extension=True,
    environment={{"INFERENCE_API_KEYS": {tokens['upstream']!r}}},  # the PostgreSQL instance's upstream key
    extra_args=[
        "--UserDirectory.sync_interval={HUB_SYNC_SECONDS}",
        "--IdentityProvider.hub_token_cache_seconds={CACHE_SECONDS}",
        "--UserDirectory.cache_seconds={CACHE_SECONDS}",
        "--InferenceService.flush_interval=0.5",
        "--InferenceService.port={ports['service']}",
    ],
)
c.JupyterHub.services.append({{"name": "tester", "api_token": {tokens['tester']!r}}})
c.JupyterHub.services.append({{
    "name": "inference-pg", "url": "http://127.0.0.1:{ports['service_pg']}", "api_token": {tokens['pg']!r},
    "oauth_no_confirm": True, "oauth_redirect_uri": "http://127.0.0.1:{ports['public']}/services/inference-pg/oauth_callback",
}})
for role in c.JupyterHub.load_roles:
    if role["name"] in ("user", "server"):
        role["scopes"].append(access_scope("inference-pg"))
c.JupyterHub.load_roles.append({{"name": "tester", "services": ["tester"], "scopes": ["admin:users", "admin:groups", "tokens", "list:users", "read:users", "admin:auth_state", "servers"]}})
c.JupyterHub.load_roles.append({{"name": "inference-pg-service", "services": ["inference-pg"], "scopes": SERVICE_SCOPES}})
"""


@pytest.fixture(scope="session")
def hub(tmp_path_factory, model_config_file, pg_url):  # noqa: F811
    if not PROXY.exists():
        pytest.fail("configurable-http-proxy is missing: run `make setup`")
    tmp = tmp_path_factory.mktemp("hub")
    ports = {k: free_port() for k in ("public", "hub", "proxy_api", "service", "service_pg")}
    tokens = {"tester": secrets.token_hex(32), "pg": secrets.token_hex(32), "upstream": secrets.token_hex(32)}
    sqlite_url = f"sqlite:///{tmp / 'inference.sqlite'}"
    log_path = tmp / "hub.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("JUPYTERHUB_API_TOKEN", None)
    proc = start_hub(tmp, _hub_config(tmp, ports, tokens, sqlite_url, model_config_file), env)
    public = f"http://127.0.0.1:{ports['public']}"

    from traitlets.config import Config

    from hub_extension.hub_config import SERVICE_SCOPES, access_scope  # noqa: F401

    cfg = Config()
    cfg.IdentityProvider.mode = "hub"
    cfg.InferenceService.ip = "127.0.0.1"
    cfg.InferenceService.port = ports["service_pg"]
    cfg.InferenceService.base_url = "/services/inference-pg/"
    cfg.InferenceService.db_url = pg_url
    # The PostgreSQL instance also serves models of the SQLite instance as an upstream (E6), through its
    # static key: two instances of our own service, one in front of the other.
    pg_models = tmp / "models-pg.yaml"
    upstream_base = f"http://127.0.0.1:{ports['service']}/services/inference/v1"
    pg_models.write_text(Path(model_config_file).read_text() + UPSTREAM_ENTRIES.format(base=upstream_base))
    os.environ["INFERENCE_TEST_UPSTREAM_KEY"] = tokens["upstream"]
    cfg.InferenceService.models_config = str(pg_models)
    cfg.UserDirectory.sync_interval = HUB_SYNC_SECONDS
    cfg.IdentityProvider.hub_token_cache_seconds = CACHE_SECONDS
    cfg.UserDirectory.cache_seconds = CACHE_SECONDS
    cfg.InferenceService.flush_interval = 0.5
    cfg.InferenceService.cookie_secret_file = str(tmp / "inference-pg-cookie-secret")
    cfg.PermissionPolicy.hub_roles = TEST_ROLES
    cfg.HubOAuth.api_url = f"http://127.0.0.1:{ports['hub']}/hub/api"
    cfg.HubOAuth.api_token = tokens["pg"]
    cfg.HubOAuth.oauth_client_id = "service-inference-pg"
    cfg.HubOAuth.base_url = "/services/inference-pg/"
    cfg.HubOAuth.hub_prefix = "/hub/"
    cfg.HubOAuth.access_scopes = {"access:services!service=inference-pg", "access:services"}
    cfg.HubOAuth.oauth_redirect_uri = f"{public}/services/inference-pg/oauth_callback"
    try:
        with running(cfg) as service:
            def up(prefix: str) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyterhub exited: {log_path.read_text()[-3000:]}")
                return requests.get(f"{public}/services/{prefix}/health", timeout=5).status_code == 200

            for prefix in ("inference", "inference-pg"):
                wait_for(
                    lambda p=prefix: up(p),
                    timeout=180, interval=0.3, what=f"{prefix} behind the Hub proxy (log: {log_path})",
                )
            yield Hub(
                url=public,
                api=HubAPI(public, tokens["tester"]),
                instances={
                    "sqlite": Instance("inference", "sqlite", f"{public}/services/inference/"),
                    "postgresql": Instance("inference-pg", "postgresql", f"{public}/services/inference-pg/", service.app),
                },
                process=proc,
                log_path=log_path,
            )
    finally:
        stop_hub(proc, tmp / "proxy.pid", cmdline_marker=f"--InferenceService.port={ports['service']}",
                 env_marker=f"JUPYTERHUB_API_URL=http://127.0.0.1:{ports['hub']}/hub/api")


@pytest.fixture(params=["sqlite", "postgresql"])
def instance(request, hub) -> Instance:
    """Each end-to-end test runs once against each instance (SQLite and PostgreSQL)."""
    return hub.instances[request.param]


@pytest.fixture(scope="session")
def notebook_servers(hub) -> dict:
    """Real single-user servers the Hub spawned, one per role: `user` (a new user) and `admin` (a new service
    admin); shared by the notebook and JupyterLab tests, stopped at the end (tests/remote_kernel.py)."""
    from remote_kernel import spawned_servers

    with spawned_servers(hub, user=hub.new_user("nb"), admin=hub.new_admin()) as servers:
        yield servers




# -- a real browser ---------------------------------------------------------------------------------


@pytest.fixture
def browser():
    """A headless Chromium for one test (Playwright with the system browser). Per test, not per session: sync
    Playwright keeps an event loop running on this thread while it is started, which would break every later
    `asyncio.run` (the admin commands) and async test; starting it costs about half a second."""
    from browser import launch
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, request):
    """A fresh browser context (no cookies) and page; a screenshot named after the test is kept at the end."""
    from browser import screenshot

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    try:
        yield pg
    finally:
        try:
            screenshot(pg, request.node.nodeid.split("::", 1)[-1] + "-final")
        except Exception:  # a page that crashed has nothing to show
            pass
        context.close()

"""The service as a traitlets Application: `jupyterhub-inference [serve]` / `python -m hub_extension`.

The admin commands (`users`, `keys`, `grants`, `audit`, `db`) are subcommands of this application, as
JupyterHub's `upgrade-db` is of JupyterHub's, so they read the same config file and environment as `serve`.
Each component (identity, keys, users, permissions) is a configurable with its own settings (`--help-all`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from traitlets import Bool, Float, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import Application

from . import __version__, logs
from .api_keys import KeyManager
from .db import Database, unavailable
from .identity import IdentityProvider
from .knowledge import KnowledgeBase
from .metrics import Metrics
from .net import parse_networks
from .permissions import PermissionPolicy
from .presets import PresetStore
from .quotas import QuotaPolicy
from .usage import UsageRecorder, UsageReports
from .users import UserDirectory

if TYPE_CHECKING:
    from .services import Services

# The only routes that answer without credentials. A test checks the route table against this list.
PUBLIC_ROUTES = frozenset({"/health", "/oauth_callback", "/openapi.json"})
# Identity mode `none` (everyone is one anonymous admin, for a laptop) has no one to tell apart: only OpenAI's API and
# these are served; the routes about users, keys, grants, invites, quotas of others and resources do not exist there.
ANONYMOUS_ROUTES = frozenset({
    "/health", "/openapi.json", "/metrics", "/api/me", "/api/me/permissions", "/api/me/quota", "/api/usage",
    "/api/admin/usage",
})
CONFIG_FILE_NAME = "jupyterhub_inference_config.py"
# Where a config file is looked for when neither --config nor $INFERENCE_CONFIG names one (first found wins).
CONFIG_SEARCH_PATH = (".", "~/.jupyterhub-inference", "/etc/jupyterhub-inference")


class InferenceService(Application):
    name = "jupyterhub-inference"
    version = __version__
    description = "Serve language models to JupyterHub users with per-user API keys and permissions."
    examples = """
jupyterhub-inference serve --models=models.yaml     # usually started by the Hub (jupyterhub_config.py)
jupyterhub-inference serve --identity=static         # standalone; keys from $INFERENCE_API_KEYS
jupyterhub-inference db upgrade
jupyterhub-inference users list|disable|enable|approve|deny|reset-password ...   (each with --help)
jupyterhub-inference invites create|list|revoke ...
jupyterhub-inference keys list|create|revoke --user NAME ...
jupyterhub-inference grants show|set ...
jupyterhub-inference audit [--user NAME] [--action A] [--since ISO]
jupyterhub-inference quotas show|set|clear --user NAME | --group NAME | --default [--tokens-per-day N] ...
jupyterhub-inference usage [--user NAME] [--since ISO] [--bucket day|hour|month] [--group-by user|model|key|endpoint|none] [--csv]
"""

    classes = [IdentityProvider, KeyManager, UserDirectory, PermissionPolicy, UsageRecorder, QuotaPolicy, Metrics,
               PresetStore, KnowledgeBase]
    _log_formatter_cls = logs.Formatter  # traitlets' own lines are formatted and redacted like every other line

    subcommands = {
        "db": ("hub_extension.cli.DbCommand", "Database schema: `db upgrade`."),
        "users": ("hub_extension.cli.UsersCommand", "List users; approve, deny, disable or enable one."),
        "keys": ("hub_extension.cli.KeysCommand", "List, create or revoke a user's API keys."),
        "grants": ("hub_extension.cli.GrantsCommand", "Show or set grants for a user or a group."),
        "audit": ("hub_extension.cli.AuditCommand", "Read the audit log, newest first."),
        "usage": ("hub_extension.cli.UsageCommand", "Usage by hour, day or month, grouped by user, model, key or endpoint."),
        "resources": ("hub_extension.cli.ResourcesCommand", "List or delete a user's presets and collections."),
        "quotas": ("hub_extension.cli.QuotasCommand", "Show, set or clear quotas for a user, a group or everyone."),
        "invites": ("hub_extension.cli.InvitesCommand", "Create, list or revoke invitations (registration by invite)."),
    }

    aliases = {
        "ip": "InferenceService.ip",
        "port": "InferenceService.port",
        "db-url": "InferenceService.db_url",
        "identity": "IdentityProvider.mode",
        "models": "InferenceService.models_config",
        "config": "InferenceService.config_file",
        "log-level": "Application.log_level",
    }

    @default("log_level")
    def _log_level_default(self):
        return os.environ.get("INFERENCE_LOG_LEVEL", "INFO")

    config_file = Unicode(
        help=f"""A Python config file (`c.InferenceService.db_url = ...`, `c.KeyManager....`) to load.

        Defaults to $INFERENCE_CONFIG (set but empty: none), else the first `{CONFIG_FILE_NAME}` found in
        {", ".join(CONFIG_SEARCH_PATH)}; none is fine (then only the environment and the command line count).
        The admin commands read the same file, so they open the service's real database."""
    ).tag(config=True)

    @default("config_file")
    def _config_file_default(self):
        if "INFERENCE_CONFIG" in os.environ:  # set but empty: no config file at all
            return os.environ["INFERENCE_CONFIG"]
        for folder in CONFIG_SEARCH_PATH:
            candidate = Path(folder).expanduser() / CONFIG_FILE_NAME
            if candidate.is_file():
                return str(candidate.resolve())
        return ""

    log_json = Bool(
        help="Log lines as JSON objects (for log collectors) instead of text. Defaults to $INFERENCE_LOG_FORMAT == json."
    ).tag(config=True)

    @default("log_json")
    def _log_json_default(self):
        return os.environ.get("INFERENCE_LOG_FORMAT", "text") == "json"

    # -- network ----------------------------------------------------------------------------------
    ip = Unicode(help="Address to listen on. Defaults to the host of $JUPYTERHUB_SERVICE_URL, else 127.0.0.1.").tag(
        config=True
    )

    @default("ip")
    def _ip_default(self):
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).hostname if url else None) or "127.0.0.1"

    port = Integer(help="Port to listen on. Defaults to the port of $JUPYTERHUB_SERVICE_URL, else 8010.").tag(
        config=True
    )

    @default("port")
    def _port_default(self):
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).port if url else None) or 8010

    base_url = Unicode(help="URL prefix of every route. Defaults to $JUPYTERHUB_SERVICE_PREFIX, else '/'.").tag(
        config=True
    )

    @default("base_url")
    def _base_url_default(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")

    @validate("base_url")
    def _validate_base_url(self, proposal):
        value = proposal.value
        if not value.startswith("/"):
            raise ValueError("InferenceService.base_url must start with '/'")
        return value if value.endswith("/") else value + "/"

    max_body_bytes = Integer(
        8 * 1024 * 1024, help="Largest request body accepted; larger ones get 413."
    ).tag(config=True)

    trusted_proxies = List(
        Unicode(),
        ["127.0.0.1", "::1"],
        help="""Addresses or networks (CIDR) of proxies in front of the service, e.g. the Hub's proxy.

        The client address (audit log, logs) comes from `X-Forwarded-For` only when the direct peer is one of
        these, and then it is the right-most address that is not a trusted proxy (what the nearest proxy saw);
        otherwise it is the peer itself. `X-Real-Ip` is never trusted. As JupyterHub's `trusted_downstream_ips`.""",
    ).tag(config=True)

    @validate("torch_threads")
    def _validate_torch_threads(self, proposal):
        if proposal.value < 0:
            raise ValueError("InferenceService.torch_threads must be >= 0 (0: torch's choice)")
        return proposal.value

    @validate("trusted_proxies")
    def _validate_proxies(self, proposal):
        try:
            parse_networks(proposal.value)
        except ValueError as e:
            raise ValueError(f"InferenceService.trusted_proxies: {e}") from None
        return proposal.value

    hub_public_url = Unicode(
        help="""The Hub's address as people reach it, base URL included (JupyterHub's `public_url`, e.g.
        https://hub.example.org/): invitation links are made with it, by the API and the CLI. Defaults to
        $INFERENCE_HUB_PUBLIC_URL (`hub_config.configure` passes the Hub's `public_url` or `bind_url`); empty: the
        API answers with the address the admin reached it through, and the CLI prints the code alone."""
    ).tag(config=True)

    @default("hub_public_url")
    def _hub_public_url_default(self):
        return os.environ.get("INFERENCE_HUB_PUBLIC_URL", "")

    @validate("hub_public_url")
    def _validate_hub_public_url(self, proposal):
        value = proposal.value.strip()
        parsed = urlparse(value)
        if value and (parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment):
            raise ValueError(f"InferenceService.hub_public_url must be an http(s) URL, not {value!r}")
        return value.rstrip("/") + "/" if value else ""

    allow_remote_none = Bool(
        False, help="Allow identity mode `none` on a non-loopback address (otherwise refused at start)."
    ).tag(config=True)

    # -- state ------------------------------------------------------------------------------------
    db_url = Unicode(
        help="""SQLAlchemy URL of the service's database.

        SQLite by default (`sqlite:///inference.sqlite`, WAL mode); PostgreSQL as
        `postgresql+psycopg://user@host/db` (`postgresql://` is accepted and means the same).
        Defaults to $INFERENCE_DB_URL."""
    ).tag(config=True)

    @default("db_url")
    def _db_url_default(self):
        return os.environ.get("INFERENCE_DB_URL", "sqlite:///inference.sqlite")

    db_threads = Integer(4, help="Threads that run blocking database calls off the event loop.").tag(config=True)

    flush_interval = Float(5.0, help="Seconds between batched writes of `last_used` / `last_seen`.").tag(
        config=True
    )

    cookie_secret_file = Unicode(
        "inference_cookie_secret",
        help="""File holding the secret that signs browser session cookies (created, mode 0600, if missing), so a
        restart keeps users logged in. Replicas must share it: give them the same file or $INFERENCE_COOKIE_SECRET
        (hex), which takes precedence.""",
    ).tag(config=True)

    models_config = Unicode(
        help="Path of the YAML model registry. Defaults to $INFERENCE_MODELS_CONFIG; empty: no models."
    ).tag(config=True)

    torch_threads = Integer(
        0,
        help="""Threads torch uses inside one operation on the CPU (0: torch's choice, one per core). On a small
        machine serving several people, 1 keeps each request's latency steady (bench/collections.py --threads).""",
    ).tag(config=True)

    @default("models_config")
    def _models_config_default(self):
        return os.environ.get("INFERENCE_MODELS_CONFIG", "")

    shutdown_grace_seconds = Float(
        8.0,
        help="""On SIGTERM or SIGINT, how long requests in flight (streams included) may take to finish while new
        ones are refused with 503; what is still running then is cut off, as it is at once on a second signal.
        Keep it below what your process manager waits before SIGKILL (a Hub-managed service gets 10 s after its
        SIGINT, then SIGTERM, then 5 s).""",
    ).tag(config=True)

    # -- life cycle --------------------------------------------------------------------------------

    def initialize(self, argv=None):
        self.ready = threading.Event()
        super().initialize(argv)
        if self.subapp is None:  # a subcommand loads the settings itself, with its own command line on top
            self.load_settings()
            self.identity  # noqa: B018 - built now, so a bad identity setting fails at start

    def load_settings(self, cli_config=None) -> None:
        """The config file under the command line (a subcommand's too), then the checks that span settings."""
        if cli_config is not None:
            self.cli_config.merge(cli_config)
            self.update_config(cli_config)
        if self.config_file:
            if not os.path.isfile(self.config_file):
                raise ValueError(f"InferenceService.config_file: no such file {self.config_file!r}")
            self.load_config_file(self.config_file)
        logs.configure("json" if self.log_json else "text", self.log_level)

    def open_database(self, *, create_schema: bool) -> Database:
        """The service's database; only `serve` and `db upgrade` create or upgrade its schema."""
        db = Database(self.db_url, threads=self.db_threads)
        if create_schema:
            db.upgrade()
        else:
            db.check_schema()  # the admin commands never create a database: they say which one they could not find
        return db

    def make_components(self, db: Database) -> tuple[UserDirectory, KeyManager, PermissionPolicy]:
        """The components the admin commands share with `serve`, built with this application as parent."""
        permissions = PermissionPolicy(db, parent=self)
        permissions.load()
        return UserDirectory(db, parent=self), KeyManager(db, parent=self), permissions

    def make_resources(self, db: Database, models=None, quotas=None) -> tuple[PresetStore, KnowledgeBase]:
        """Presets and knowledge collections (`serve` meters their embeddings; the admin commands need neither
        models nor quotas)."""
        return PresetStore(db, parent=self), KnowledgeBase(db, models=models, quotas=quotas, parent=self)

    def make_services(self) -> Services:
        """Every component, built with this application as parent (so each reads its own config section)."""
        from .administration import UserAdmin
        from .audit import AuditLog
        from .services import Services
        from .users import HubUsers

        db = self.open_database(create_schema=True)
        users, keys, permissions = self.make_components(db)
        hub_auth = self._make_hub_auth() if self.identity.mode == "hub" else None
        self.identity.keys, self.identity.users, self.identity.permissions = keys, users, permissions
        self.identity.hub_auth = hub_auth
        hub_users = HubUsers(hub_auth.api_url, hub_auth.api_token) if hub_auth else None
        models = self._make_models()
        usage = UsageRecorder(db, parent=self)
        quotas = QuotaPolicy(db, parent=self)
        quotas.load()
        usage.flushed_callbacks.append(quotas.on_flushed)
        users.on_retired.append(quotas.forget_user)
        metrics = Metrics(parent=self)
        metrics.watch(models, usage)
        self.identity.on_failure = metrics.auth_failure
        presets, knowledge = self.make_resources(db, models, quotas)
        services = Services(
            db=db,
            keys=keys,
            users=users,
            audit=AuditLog(db),
            permissions=permissions,
            identity=self.identity,
            hub=hub_users,
            admin=UserAdmin(users, permissions, hub_users, UsageReports(db)),
            models=models,
            usage=usage,
            quotas=quotas,
            metrics=metrics,
            max_body_bytes=self.max_body_bytes,
            trusted_proxies=parse_networks(self.trusted_proxies),
            hub_public_url=self.hub_public_url,
            usage_sinks=[usage.record, metrics.record],
            presets=presets,
            knowledge=knowledge,
        )
        knowledge.usage_sink = services.record_usage  # embedding tokens are usage like /v1/embeddings'
        return services

    @property
    def identity(self) -> IdentityProvider:
        if getattr(self, "_identity", None) is None:
            self._identity = IdentityProvider(parent=self)
            for key in self._identity.static_keys:
                logs.add_secret(key)
        return self._identity

    def _make_hub_auth(self):
        """JupyterHub's own HubOAuth, configurable as `c.HubOAuth.*` (api_url, api_token, access_scopes...)."""
        from jupyterhub.services.auth import HubOAuth

        from .handlers.pages import configure_hub_auth

        hub_auth = HubOAuth(parent=self, cache_max_age=self.identity.hub_token_cache_seconds)
        configure_hub_auth(hub_auth)
        logs.add_secret(hub_auth.api_token)
        return hub_auth

    def _make_models(self):
        """The model manager for `models_config` (a bad entry stops the start, naming model and field)."""
        if not self.models_config:
            return None
        from .engine import ModelManager

        if self.torch_threads > 0:
            import torch

            torch.set_num_threads(self.torch_threads)
        return ModelManager.from_config(self.models_config)

    def cookie_secret(self) -> bytes:
        """$INFERENCE_COOKIE_SECRET (hex), else the secret in `cookie_secret_file`, made on first start."""
        if os.environ.get("INFERENCE_COOKIE_SECRET"):
            return bytes.fromhex(os.environ["INFERENCE_COOKIE_SECRET"])
        path = Path(self.cookie_secret_file).expanduser()
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise ValueError(f"InferenceService.cookie_secret_file {str(path)!r} must not be readable by others")
            return bytes.fromhex(path.read_text().strip())
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex())
        self.log.info("wrote a new cookie secret to %s", path)
        return secret

    def routes(self) -> list[tuple]:
        """The route table, paths relative to `base_url`. Every route not in PUBLIC_ROUTES needs credentials."""
        from .handlers import account, admin, metrics, openai, openapi, pages, quotas, resources, usage
        from .handlers import invites as invite_routes

        public_metrics = self.services.metrics.auth == "public"  # a deliberate setting (Metrics.auth)
        handlers = account.routes + admin.routes + openai.routes + usage.routes + quotas.routes + openapi.routes
        handlers += resources.routes
        handlers += invite_routes.routes
        handlers += metrics.public_routes if public_metrics else metrics.routes
        if self.identity.mode == "hub":
            handlers += pages.routes
        if self.identity.mode == "none":
            handlers = [(path, h) for path, h in handlers if path in ANONYMOUS_ROUTES or path.startswith("/v1/")]
        check_public_routes(handlers, (PUBLIC_ROUTES | {"/metrics"}) if public_metrics else PUBLIC_ROUTES)
        return handlers

    def make_app(self):
        from tornado import web

        from . import openapi
        from .handlers.base import NotFoundHandler

        if self.identity.mode == "none" and self.ip not in ("127.0.0.1", "localhost", "::1"):
            self.log.warning("!!! identity mode 'none' on %s: ANYONE who can reach it is an admin !!!", self.ip)
            if not self.allow_remote_none:
                raise ValueError("identity mode 'none' beyond loopback needs InferenceService.allow_remote_none")
        self.services = self.make_services()
        settings = {
            "services": self.services,
            "default_handler_class": NotFoundHandler,
            "log_function": _log_request,
            "compress_response": False,
            "template_path": str(Path(__file__).parent / "templates"),
            "service_base_url": self.base_url,
        }
        if self.identity.mode == "hub":
            from .handlers.pages import tornado_settings

            settings["hub_auth"] = self.services.identity.hub_auth
            settings["cookie_secret"] = self.cookie_secret()
            settings.update(tornado_settings())
        routes = self.routes()
        hub_auth = settings.get("hub_auth")
        settings["openapi_document"] = openapi.document(
            [path for path, _ in routes], base_url=self.base_url, cookie_name=hub_auth.cookie_name if hub_auth else None
        )
        prefix = self.base_url.rstrip("/")
        return web.Application([(prefix + path, handler) for path, handler in routes], **settings)

    async def _periodic(self, interval: float, fn) -> None:
        from tornado.httpclient import HTTPClientError

        from .errors import ApiError

        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except (OSError, HTTPClientError, ApiError) as e:
                self.log.warning("background task %s failed: %s", fn.__name__, e)
            except Exception as e:
                if unavailable(e):  # one line per try, not a traceback, while the database is away
                    self.log.warning("background task %s failed: the database is unavailable", fn.__name__)
                else:
                    self.log.exception("background task %s failed", fn.__name__)

    async def _load_models(self) -> None:
        try:
            await self.services.models.start()
            self.log.info("models ready: %s", ", ".join(self.services.models.names()))
        except Exception:
            self.log.exception("loading the startup models failed")

    async def flush(self) -> None:
        """Write buffered `last_used` / `last_seen` in one transaction each."""
        await self.services.keys.flush()
        await self.services.users.flush_last_seen()

    async def sync_with_hub(self) -> None:
        """Retire users the Hub deleted (their keys revoked), mark blocked ones, refresh admin flags and groups."""
        hub_users = await self.services.hub.list()
        changed, revoked = await self.services.users.sync(hub_users)
        if revoked:
            self.services.keys.forget(revoked)
        if changed:
            self.log.info("hub sync: %d user(s) changed: %s", len(changed), ", ".join(changed[:20]))

    async def serve(self) -> None:
        from tornado import httpserver

        self.app = self.make_app()
        self.server = httpserver.HTTPServer(self.app, xheaders=False, max_body_size=8 * self.max_body_bytes)
        self.server.listen(self.port, self.ip)
        self.log.info("jupyterhub-inference %s on http://%s:%d%s (identity: %s, database: %s)",
                      __version__, self.ip, self.port, self.base_url, self.identity.mode, self.services.db.backend)
        stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second signal: stop waiting for the requests in flight
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                self._hurry.set()
            stop.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
        self._loop, self._stop = loop, stop
        tasks = [asyncio.ensure_future(self._periodic(self.flush_interval, self.flush))]
        if self.services.models is not None:
            # Listen first (the Hub gives up on a service that does not answer), load models meanwhile;
            # a request for a model still loading waits for it.
            tasks.append(asyncio.ensure_future(self._load_models()))
        services = self.services
        for interval, job in (
            (services.permissions.reload_seconds, services.permissions.reload),
            (services.usage.flush_interval, services.usage.flush),
            (3600.0, services.usage.prune),
            (services.quotas.sync_seconds, services.quotas.sync),
        ):
            tasks.append(asyncio.ensure_future(self._periodic(interval, job)))
        if self.identity.mode == "hub":
            tasks.append(asyncio.ensure_future(self._periodic(self.services.users.sync_interval, self.sync_with_hub)))
        if services.db.backend == "postgresql":  # replicas tell each other of changes (SQLite: one process)
            from .notify import ChangeListener, dispatch_table, forget_everything

            self.listener = ChangeListener(
                services.db.url, dispatch_table(services), on_reconnect=lambda: forget_everything(services)
            )
            tasks.append(asyncio.ensure_future(self.listener.run()))
        self.ready.set()
        await stop.wait()
        self.log.info("stopping")
        await self.shutdown(tasks)

    async def shutdown(self, tasks=()) -> None:
        """Refuse new requests (503) while those in flight finish, up to `shutdown_grace_seconds`; then stop
        listening, end what is left (their clients get no answer: recorded as 499) and write everything buffered,
        usage last, so every request that got an answer is recorded."""
        await self.drain(self.shutdown_grace_seconds)
        self.server.stop()
        for task in tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.server.close_all_connections(), 10)
        except Exception:
            self.log.exception("closing connections failed")
        if self.services.models is not None:
            await self.services.models.close()
        try:
            await asyncio.wait_for(self.flush(), 5)
        except Exception:
            self.log.exception("final flush failed")
        try:
            await asyncio.wait_for(self.services.usage.close(), 30)
        except Exception:
            self.log.exception("final usage flush failed")
        self.services.db.close()

    async def drain(self, grace: float) -> None:
        """New requests get 503 from now on; wait up to `grace` seconds for the ones in flight."""
        self.services.stopping = True
        in_flight = self.services.in_flight
        if in_flight:
            self.log.info("waiting up to %.0fs for %d request(s) in flight", grace, len(in_flight))
        deadline = asyncio.get_running_loop().time() + grace
        hurry = getattr(self, "_hurry", None)
        while in_flight and asyncio.get_running_loop().time() < deadline and not (hurry and hurry.is_set()):
            await asyncio.sleep(0.05)
        if in_flight:
            self.log.warning("cutting off %d request(s) still in flight", len(in_flight))

    def start(self) -> None:
        if self.subapp is not None:
            return self.subapp.start()
        asyncio.run(self.serve())

    def stop(self) -> None:
        """Ask a serving instance (possibly on another thread's loop) to shut down gracefully."""
        self._loop.call_soon_threadsafe(self._stop.set)


def check_public_routes(handlers, public_routes: frozenset[str] = PUBLIC_ROUTES) -> None:
    """Refuse to start if a route is public without being on PUBLIC_ROUTES, or the other way round."""
    from .handlers import pages
    from .handlers.base import APIHandler, Auth

    for path, handler in handlers:
        public = handler is pages.OAuthCallbackHandler or (issubclass(handler, APIHandler) and handler.auth is Auth.PUBLIC)
        if public != (path in public_routes):
            raise RuntimeError(f"route {path}: public={public} disagrees with PUBLIC_ROUTES")


def _log_request(handler) -> None:
    """One line per request; never the query string or headers (they may hold credentials)."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if status < 400 and handler.request.path.endswith(("/health", "/metrics")):  # probes and scrapers
        level = logging.DEBUG
    who = getattr(getattr(handler, "identity", None), "name", "-")
    ms = 1000 * handler.request.request_time()
    client = getattr(handler, "client_ip", None) or handler.request.remote_ip
    logging.getLogger("hub_extension.access").log(
        level, "%d %s %s (%s@%s) %.1fms", status, handler.request.method, handler.request.path, who, client, ms,
        extra={"status": status, "method": handler.request.method, "path": handler.request.path, "user": who,
               "client_ip": client, "duration_ms": round(ms, 2)},
    )


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]  # serving is what the application does without a subcommand
    try:
        InferenceService.launch_instance(argv)
    except (ValueError, TraitError) as e:
        sys.exit(configuration_error(e))
    _exit_now_if_a_model_is_loading()


def configuration_error(e: Exception) -> int:
    """A bad setting (ConfigError is a ValueError): say which, no traceback; the exit code."""
    print(f"jupyterhub-inference: configuration error: {e}", file=sys.stderr)
    return 1


def _exit_now_if_a_model_is_loading() -> None:
    """After an orderly stop everything is written; a model still loading on its daemon thread would make the
    interpreter's teardown abort (SIGABRT, "terminate called without an active exception"), so leave without it."""
    manager = sys.modules.get("hub_extension.engine.manager")  # never imported: no model was ever loaded
    loading = manager.loads_in_progress() if manager is not None else []
    if not loading:
        return
    logging.getLogger("InferenceService").info("exiting while model(s) still load: %s", ", ".join(loading))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

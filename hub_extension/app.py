"""The service as a traitlets Application: `jupyterhub-inference serve` / `python -m hub_extension`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth
from tornado import httpserver, web
from tornado.httpclient import HTTPClientError
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application

from . import __version__, logs
from .administration import UserAdmin
from .api_keys import KeyManager
from .audit import AuditLog
from .db import Database
from .handlers import account, admin, openai, pages
from .handlers.base import APIHandler, Auth, NotFoundHandler
from .identity import Authenticator, StaticKeys
from .orm import UserStatus
from .permissions import FEATURES, PermissionPolicy
from .services import Services
from .users import HubUsers, UserDirectory

# The only routes that answer without credentials. A test checks the route table against this list.
PUBLIC_ROUTES = frozenset({"/health", "/oauth_callback"})
IDENTITY_MODES = ("none", "static", "hub")



class InferenceService(Application):
    name = "jupyterhub-inference"
    version = __version__
    description = "Serve language models to JupyterHub users with per-user API keys and permissions."
    examples = """
jupyterhub-inference serve --models=models.yaml     # usually started by the Hub (jupyterhub_config.py)
jupyterhub-inference serve --identity=static         # standalone; keys from $INFERENCE_API_KEYS
jupyterhub-inference db upgrade
jupyterhub-inference users list|disable|enable|approve|deny ...   (each with --help)
jupyterhub-inference keys list|create|revoke --user NAME ...
jupyterhub-inference grants show|set ...
jupyterhub-inference audit [--user NAME] [--action A] [--since ISO]
"""

    aliases = {
        "ip": "InferenceService.ip",
        "port": "InferenceService.port",
        "db-url": "InferenceService.db_url",
        "identity": "InferenceService.identity_mode",
        "models": "InferenceService.models_config",
        "config": "InferenceService.config_file",
        "log-level": "Application.log_level",
    }

    @default("log_level")
    def _log_level_default(self):
        return os.environ.get("INFERENCE_LOG_LEVEL", "INFO")

    config_file = Unicode("", help="A Python config file (c.InferenceService.... = ...) to load.").tag(config=True)

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

    # -- database ---------------------------------------------------------------------------------
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

    # -- identity ---------------------------------------------------------------------------------
    identity_mode = Unicode(
        help="""How callers are identified: `none`, `static` or `hub`.

        - `none`: no authentication at all (every caller is an anonymous admin). Loopback only, please.
        - `static`: only the configured `static_keys`; a holder acts as admin.
        - `hub`: JupyterHub users (OAuth cookie, Hub API token) and keys this service issued;
          configured static keys are still accepted.

        Defaults to $INFERENCE_IDENTITY, else `hub` when run by a Hub, else `static` when static keys are
        configured, else `none`."""
    ).tag(config=True)

    @default("identity_mode")
    def _identity_default(self):
        if os.environ.get("INFERENCE_IDENTITY"):
            return os.environ["INFERENCE_IDENTITY"]
        if os.environ.get("JUPYTERHUB_API_TOKEN"):
            return "hub"
        return "static" if self.static_keys else "none"

    @validate("identity_mode")
    def _validate_mode(self, proposal):
        if proposal.value not in IDENTITY_MODES:
            raise ValueError(f"InferenceService.identity_mode must be one of {IDENTITY_MODES}, not {proposal.value!r}")
        return proposal.value

    static_keys = List(
        Unicode(),
        help="""Keys accepted as an admin in `static` mode (and also in `hub` mode).
        Defaults to the comma-separated $INFERENCE_API_KEYS. Compared in constant time.""",
    ).tag(config=True)

    @default("static_keys")
    def _static_keys_default(self):
        return [k.strip() for k in os.environ.get("INFERENCE_API_KEYS", "").split(",") if k.strip()]

    static_keys_file = Unicode("", help="A file with one static key per line, added to `static_keys`.").tag(
        config=True
    )

    hub_token_cache_seconds = Integer(
        30,
        help="""How long a Hub token's (or cookie's) identity is cached. This bounds how long a revoked Hub
        token keeps working. Must be at least 1 (JupyterHub treats 0 as 'forever').""",
    ).tag(config=True)

    hub_sync_interval = Float(
        30.0,
        help="""Seconds between syncs with the Hub's user list. A user deleted or blocked in the Hub loses
        access, keys included, within this bound (plus one Hub round trip).""",
    ).tag(config=True)

    hub_blocked_group = Unicode(
        "inference-blocked", help="Members of this Hub group are refused, as if deleted from the Hub."
    ).tag(config=True)

    hub_roles = List(
        Dict(),
        help="""The Hub's `load_roles` (the same list given to `c.JupyterHub.load_roles`).

        The Hub cannot tell a service which scopes a role holds, so the service reads the `custom:inference:*`
        scopes of roles from here, and which roles and groups a user has from the Hub. Defaults to the JSON
        in $INFERENCE_HUB_ROLES (set by `hub_extension.hub_config`).""",
    ).tag(config=True)

    @default("hub_roles")
    def _hub_roles_default(self):
        raw = os.environ.get("INFERENCE_HUB_ROLES")
        return json.loads(raw) if raw else []

    user_cache_seconds = Float(
        5.0, help="How long a user's state is cached per process (other replicas see changes within this)."
    ).tag(config=True)

    new_user_status = Unicode(
        UserStatus.ACTIVE, help="Status of a user seen for the first time: `active` or `pending`."
    ).tag(config=True)

    # -- keys -------------------------------------------------------------------------------------
    key_default_lifetime_days = Integer(90, help="Lifetime of a new key when the request names none.").tag(
        config=True
    )
    key_max_lifetime_days = Integer(365, help="Longest lifetime a key may have; 0 allows keys that never expire.").tag(
        config=True
    )
    max_keys_per_user = Integer(25, help="Most live (unrevoked, unexpired) keys one user may hold; 0: no limit.").tag(
        config=True
    )
    key_cache_seconds = Float(
        10.0,
        help="""How long a checked key is cached in memory. A revocation in this process is immediate; other
        replicas honour it within this time.""",
    ).tag(config=True)

    @validate("key_default_lifetime_days")
    def _validate_default_lifetime(self, proposal):
        if proposal.value < 0:
            raise ValueError("InferenceService.key_default_lifetime_days must be >= 0")
        return proposal.value

    flush_interval = Float(5.0, help="Seconds between batched writes of `last_used` / `last_seen`.").tag(
        config=True
    )

    # -- permissions and models --------------------------------------------------------------------
    feature_defaults = Dict(
        help=f"""Feature -> bool: what every user may do unless a grant says otherwise.
        Features: {", ".join(FEATURES)}. Unlisted features default to allowed."""
    ).tag(config=True)

    @validate("feature_defaults")
    def _validate_features(self, proposal):
        unknown = set(proposal.value) - set(FEATURES)
        if unknown:
            raise ValueError(f"InferenceService.feature_defaults: unknown feature(s) {sorted(unknown)}")
        return proposal.value

    model_default_allow = Bool(
        True,
        help="""Whether a user may use a model nobody granted or denied them.

        True: every configured model, unless a grant denies it. False: an allow-list; a user may use only
        the models granted to them, their Hub groups (database grants) or their Hub roles
        (`custom:inference:model:<name>` or `custom:inference:model:*` scopes). See `permissions.py`
        for the precedence.""",
    ).tag(config=True)

    grants_reload_seconds = Float(
        5.0,
        help="""Seconds between reloads of the grants table into memory. A grant changed in this process
        applies at once; one changed by another replica or the CLI applies within this time.""",
    ).tag(config=True)

    models_config = Unicode(
        help="Path of the YAML model registry. Defaults to $INFERENCE_MODELS_CONFIG; empty: no models."
    ).tag(config=True)

    @default("models_config")
    def _models_config_default(self):
        return os.environ.get("INFERENCE_MODELS_CONFIG", "")

    allow_remote_none = Bool(
        False, help="Allow identity mode `none` on a non-loopback address (otherwise refused at start)."
    ).tag(config=True)

    # -- life cycle --------------------------------------------------------------------------------

    def initialize(self, argv=None):
        super().initialize(argv)
        self.ready = threading.Event()
        if self.config_file:
            self.load_config_file(self.config_file)
        if self.static_keys_file:
            with open(self.static_keys_file) as f:
                self.static_keys = self.static_keys + [line.strip() for line in f if line.strip()]
        if self.hub_token_cache_seconds < 1:
            raise ValueError("InferenceService.hub_token_cache_seconds must be >= 1 (0 means forever to HubAuth)")
        if self.identity_mode == "static" and not self.static_keys:
            raise ValueError("InferenceService.identity_mode is 'static' but no static_keys are configured")
        if self.identity_mode == "none" and self.ip not in ("127.0.0.1", "localhost", "::1"):
            self.log.warning("!!! identity mode 'none' on %s: ANYONE who can reach it is an admin !!!", self.ip)
            if not self.allow_remote_none:
                raise ValueError("identity mode 'none' beyond loopback needs InferenceService.allow_remote_none")
        logging.getLogger("hub_extension").setLevel(self.log_level)
        # traitlets' own handler on self.log gets the same redaction as the root handler.
        for handler in self.log.handlers:
            handler.addFilter(logs.RedactingFilter())

    def make_services(self) -> Services:
        db = Database(self.db_url, threads=self.db_threads)
        db.upgrade()
        users = UserDirectory(
            db,
            cache_seconds=self.user_cache_seconds,
            new_user_status=self.new_user_status,
            blocked_group=self.hub_blocked_group,
        )
        keys = KeyManager(
            db,
            default_lifetime_days=self.key_default_lifetime_days,
            max_lifetime_days=self.key_max_lifetime_days,
            max_keys_per_user=self.max_keys_per_user,
            cache_seconds=self.key_cache_seconds,
            known_features=frozenset(FEATURES),
        )
        authenticator = None
        self.hub_auth = self._make_hub_auth() if self.identity_mode == "hub" else None
        if self.identity_mode != "none":
            authenticator = Authenticator(
                mode=self.identity_mode,
                static_keys=StaticKeys(self.static_keys),
                keys=keys,
                users=users,
                hub_auth=self.hub_auth,
                hub_roles=self.hub_roles,
            )
        permissions = PermissionPolicy(
            self.feature_defaults,
            model_default_allow=self.model_default_allow,
            role_scopes=authenticator.scopes_from_roles if authenticator is not None else None,
            db=db,
            reload_seconds=self.grants_reload_seconds,
        )
        permissions.load()
        hub_users = HubUsers(self.hub_auth.api_url, self.hub_auth.api_token) if self.hub_auth else None
        return Services(
            db=db,
            keys=keys,
            users=users,
            audit=AuditLog(db),
            permissions=permissions,
            hub=hub_users,
            admin=UserAdmin(users, permissions, hub_users),
            authenticator=authenticator,
            models=self._make_models(),
            max_body_bytes=self.max_body_bytes,
        )

    def _make_hub_auth(self):
        """JupyterHub's own HubOAuth, configurable as `c.HubOAuth.*` (api_url, api_token, access_scopes...)."""
        return HubOAuth(parent=self, cache_max_age=self.hub_token_cache_seconds)

    def _make_models(self):
        """The model manager for `models_config` (a bad entry stops the start, naming model and field)."""
        if not self.models_config:
            return None
        from .engine import ModelManager

        return ModelManager.from_config(self.models_config)

    def routes(self) -> list[tuple]:
        """The route table, paths relative to `base_url`. Every route not in PUBLIC_ROUTES needs credentials."""
        handlers = account.routes + admin.routes + openai.routes
        if self.identity_mode == "hub":
            handlers += pages.routes
        check_public_routes(handlers)
        return handlers

    def make_app(self) -> web.Application:
        self.services = self.make_services()
        settings = {
            "services": self.services,
            "default_handler_class": NotFoundHandler,
            "log_function": _log_request,
            "compress_response": False,
            "template_path": str(Path(__file__).parent / "templates"),
            "service_base_url": self.base_url,
        }
        if self.identity_mode == "hub":
            settings["hub_auth"] = self.hub_auth
            settings["cookie_secret"] = os.urandom(32)
        prefix = self.base_url.rstrip("/")
        return web.Application([(prefix + path, handler) for path, handler in self.routes()], **settings)

    async def _periodic(self, interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except (OSError, HTTPClientError) as e:
                self.log.warning("background task %s failed: %s", fn.__name__, e)
            except Exception:
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
        await self.services.db.run(self.services.users.flush_last_seen)

    async def sync_with_hub(self) -> None:
        """Mark users the Hub deleted or blocked, refresh admin flags, groups and roles."""
        hub_users = await self.services.hub.list()
        changed = await self.services.users.sync(hub_users)
        if changed:
            self.log.info("hub sync: %d user(s) changed: %s", len(changed), ", ".join(changed[:20]))

    async def serve(self) -> None:
        self.app = self.make_app()
        self.server = httpserver.HTTPServer(self.app, xheaders=True, max_body_size=8 * self.max_body_bytes)
        self.server.listen(self.port, self.ip)
        self.log.info("jupyterhub-inference %s on http://%s:%d%s (identity: %s, database: %s)",
                      __version__, self.ip, self.port, self.base_url, self.identity_mode, self.services.db.backend)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        self._loop, self._stop = loop, stop
        tasks = [asyncio.ensure_future(self._periodic(self.flush_interval, self.flush))]
        if self.services.models is not None:
            # Listen first (the Hub gives up on a service that does not answer), load models meanwhile;
            # a request for a model still loading waits for it.
            tasks.append(asyncio.ensure_future(self._load_models()))
        tasks.append(asyncio.ensure_future(self._periodic(self.grants_reload_seconds, self.services.permissions.reload)))
        if self.identity_mode == "hub":
            tasks.append(asyncio.ensure_future(self._periodic(self.hub_sync_interval, self.sync_with_hub)))
        self.ready.set()
        await stop.wait()
        self.log.info("stopping")
        await self.shutdown(tasks)

    async def shutdown(self, tasks=()) -> None:
        self.server.stop()
        for task in tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.flush(), 5)
        except Exception:
            self.log.exception("final flush failed")
        if self.services.models is not None:
            await self.services.models.close()
        self.services.db.close()

    def start(self) -> None:
        asyncio.run(self.serve())

    def stop(self) -> None:
        """Ask a serving instance (possibly on another thread's loop) to shut down gracefully."""
        self._loop.call_soon_threadsafe(self._stop.set)


def check_public_routes(handlers) -> None:
    """Refuse to start if a route is public without being on PUBLIC_ROUTES, or the other way round."""
    for path, handler in handlers:
        public = handler is pages.OAuthCallbackHandler or (issubclass(handler, APIHandler) and handler.auth is Auth.PUBLIC)
        if public != (path in PUBLIC_ROUTES):
            raise RuntimeError(f"route {path}: public={public} disagrees with PUBLIC_ROUTES")



def _log_request(handler: web.RequestHandler) -> None:
    """One line per request; never the query string or headers (they may hold credentials)."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if status < 400 and handler.request.path.endswith("/health"):
        level = logging.DEBUG
    who = getattr(getattr(handler, "identity", None), "name", "-")
    ms = 1000 * handler.request.request_time()
    logging.getLogger("hub_extension.access").log(
        level, "%d %s %s (%s) %.1fms", status, handler.request.method, handler.request.path, who, ms,
        extra={"status": status, "method": handler.request.method, "path": handler.request.path, "user": who,
               "duration_ms": round(ms, 2)},
    )


CLI_COMMANDS = ("keys", "users", "db", "grants", "audit")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in CLI_COMMANDS or a == "serve"), None)
    if command in CLI_COMMANDS:
        from .cli import run_cli

        sys.exit(run_cli(argv))
    if command == "serve":
        argv.remove("serve")
    logs.configure(os.environ.get("INFERENCE_LOG_FORMAT", "text"))
    InferenceService.launch_instance(argv)

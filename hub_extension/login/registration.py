"""One registration policy for every login provider: `RegistrationMixin`, mixed into a JupyterHub Authenticator.

    class GitHubLogin(RegistrationMixin, GitHubOAuthenticator): provider = "github"

After the provider has authenticated someone (a password, GitHub, an OIDC provider), the mixin decides, the same
way for every provider, from the SERVICE's `users` table (the one status there is, which the service enforces too):

- admins: for GitHub / OIDC, only a configured admin e-mail that the provider verified (`verified_emails`); never
  a user name. For local accounts, only the configured admin names. An admin is let in in every mode.
- a known user: active -> in; pending -> the "waiting for approval" page; disabled (denied) -> a refusal page.
- an unknown user: `open` -> made active; `approval` -> made pending, "waiting for approval"; `invite` -> only with
  an invite carried from `/hub/invite/<code>` (a signed cookie), redeemed once, atomically; the invite's groups are
  added to whatever groups the provider gave.

It also limits login attempts per client address and per account (`ratelimit.py`), believing `X-Forwarded-For`
only from `trusted_proxies`.
"""

from __future__ import annotations

import os

from jupyterhub.handlers import BaseHandler
from jupyterhub.utils import maybe_future, url_path_join
from tornado import web
from traitlets import Enum, Float, Integer, List, Set, Unicode, default, validate
from traitlets.config import LoggingConfigurable, PyFileConfigLoader

from ..db import Database
from ..net import client_ip, parse_networks
from ..orm import UserStatus
from . import store
from .pages import render
from .ratelimit import LoginLimits, RateLimited

INVITE_COOKIE = "jupyterhub-inference-invite"
INVITE_COOKIE_DAYS = 1  # the browser carries an opened invite this long (the invite itself may expire sooner)
# The pages a refused login is sent to (`/hub/registration/<state>`), and what each says.
STATES = {
    "pending": ("Waiting for approval", "Your account is waiting for an administrator's approval. "
                "Sign in again once you have been approved."),
    "denied": ("Access refused", "Your account has been refused or disabled by an administrator."),
    "invite-required": ("An invitation is needed", "This hub is open by invitation only. Follow the invitation "
                        "link an administrator gave you, then sign in or sign up."),
    "invite-unknown": ("Invitation not valid", "This invitation link is not valid. Check that you copied all of it."),
    "invite-used": ("Invitation already used", "This invitation has already been used. Ask an administrator "
                    "for a new one."),
    "invite-expired": ("Invitation expired", "This invitation has expired. Ask an administrator for a new one."),
    "invite-revoked": ("Invitation withdrawn", "This invitation was withdrawn by an administrator."),
}


class RegistrationRefused(web.HTTPError):
    """A login the registration policy turned away: the handler is sent to the page for `state`."""

    def __init__(self, state: str):
        super().__init__(403, STATES[state][1])
        self.state = state


def peer_address(handler: web.RequestHandler) -> str:
    """The socket peer's address: the Hub's server rewrites `remote_ip` from `X-Forwarded-For` / `X-Real-Ip` for
    anyone (tornado's `xheaders`), so the real peer is read from the connection (tornado keeps it there)."""
    context = getattr(handler.request.connection, "context", None)
    return getattr(context, "_orig_remote_ip", None) or handler.request.remote_ip or ""


class RegistrationMixin(LoggingConfigurable):
    """The registration policy layer; list it BEFORE the Authenticator class it is mixed into.

    A configurable itself (so its traits are real traits in every class it is mixed into): settings go under the
    final class (`c.LocalAccountsAuthenticator.registration_mode`) or `c.RegistrationMixin` for every provider."""

    provider = "local"  # "local" | "github" | "oidc"

    registration_mode = Enum(
        ["open", "approval", "invite"], "open",
        help="""Who may register: `open` (anyone the provider authenticates), `approval` (they wait for an admin),
        `invite` (only with an invitation link). Applies to every provider the same way.""",
    ).tag(config=True)

    admin_emails = Set(
        Unicode(),
        help="""E-mail addresses that make a user an admin, only when the provider VERIFIED the address
        (GitHub's verified primary e-mail, OIDC's `email_verified`). Never used for local accounts.""",
    ).tag(config=True)

    trusted_proxies = List(
        Unicode(), ["127.0.0.1/32", "::1/128"],
        help="""Addresses or networks of proxies whose `X-Forwarded-For` is believed (the Hub's proxy on
        loopback); the rate limits count the right-most address that is not one of them.""",
    ).tag(config=True)

    login_limit_per_address = Integer(30, help="Failed sign-ins per client address per `rate_limit_window`.").tag(
        config=True
    )
    login_limit_per_account = Integer(10, help="Failed sign-ins per account per `rate_limit_window`.").tag(
        config=True
    )
    signup_limit_per_address = Integer(10, help="Sign-up attempts per client address per `rate_limit_window`.").tag(
        config=True
    )
    signup_limit_per_account = Integer(
        5, help="Sign-up attempts for one user name (from any address) per `rate_limit_window`."
    ).tag(config=True)
    invite_limit_per_address = Integer(
        30, help="Invitation links opened or redeemed per client address per `rate_limit_window`."
    ).tag(config=True)
    invite_limit_per_code = Integer(
        10, help="Times one invitation link may be opened or redeemed (from any address) per `rate_limit_window`."
    ).tag(config=True)
    rate_limit_window = Float(600.0, help="Seconds over which the login rate limits count attempts.").tag(
        config=True
    )

    service_config_file = Unicode(
        help="""The inference service's config file (`jupyterhub_inference_config.py`): its
        `c.InferenceService.db_url` is the database both the Hub's login and the service use."""
    ).tag(config=True)

    service_db_url = Unicode(
        help="""The service's database URL, when not read from `service_config_file`. Default: from the config file,
        else $INFERENCE_DB_URL, else the service's own default."""
    ).tag(config=True)

    @validate("trusted_proxies")
    def _validate_proxies(self, proposal):
        parse_networks(proposal.value)  # a bad entry stops the Hub's start, naming it
        return proposal.value

    @default("allow_all")
    def _allow_all_default(self):
        """Everyone the provider authenticates may register (the mode decides how), unless the provider's own
        restriction is configured (`allowed_users`, `allowed_organizations`, `allowed_groups`...)."""
        for name, trait in self.traits(config=True).items():
            if name in ("allow_all", "allow_existing_users", "any_allow_config"):
                continue
            if (trait.metadata.get("allow_config") or name.startswith("allow")) and getattr(self, name):
                return False
        return True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.provider != "local" and self.admin_users:
            raise ValueError(
                f"{type(self).__name__}.admin_users must be empty: under {self.provider} a user name never makes an "
                "admin (anyone may register any name there). Use admin_emails (verified e-mail addresses)."
            )
        self._proxies = parse_networks(self.trusted_proxies)
        self._login_db: Database | None = None
        if self.service_db_url or self.service_config_file:
            self.login_db  # noqa: B018 - opened (and migrated) at the Hub's start: a bad setting stops it there
        self.limits = LoginLimits(
            login_per_address=self.login_limit_per_address, login_per_account=self.login_limit_per_account,
            signup_per_address=self.signup_limit_per_address, signup_per_account=self.signup_limit_per_account,
            invite_per_address=self.invite_limit_per_address, invite_per_code=self.invite_limit_per_code,
            window=self.rate_limit_window,
        )

    # -- hooks for providers ----------------------------------------------------------------------------

    def verified_emails(self, auth_model: dict) -> set[str]:
        """E-mail addresses the provider verified for this login (GitHub / OIDC override this)."""
        return set()

    def registration_url(self, base_url: str) -> str:
        """Where an invited person continues: the provider's login (local accounts: the sign-up page)."""
        return self.login_url(base_url)

    # -- the service's database -------------------------------------------------------------------------

    def resolve_service_db_url(self) -> str:
        if self.service_db_url:
            return self.service_db_url
        if self.service_config_file:
            path = os.path.abspath(self.service_config_file)
            config = PyFileConfigLoader(os.path.basename(path), path=os.path.dirname(path)).load_config()
            url = config.InferenceService.get("db_url") if "InferenceService" in config else None
            if url:
                return url
        return os.environ.get("INFERENCE_DB_URL", "sqlite:///inference.sqlite")

    @property
    def login_db(self) -> Database:
        """The service's database, its schema brought up to date (migrations are idempotent): at the Hub's start
        when the database is configured, else on first use."""
        if self._login_db is None:
            db = Database(self.resolve_service_db_url(), threads=2)
            db.upgrade()
            self._login_db = db
        return self._login_db

    # -- addresses and limits ---------------------------------------------------------------------------

    def client_address(self, handler: web.RequestHandler) -> str:
        return client_ip(peer_address(handler), handler.request.headers.get("X-Forwarded-For"), self._proxies)

    def check_limit(self, check, *args) -> None:
        """Run a `LoginLimits.check_*`; too many attempts is a 429 page with `Retry-After`."""
        try:
            check(*args)
        except RateLimited as e:
            error = web.HTTPError(429, str(e))
            error.headers = {"Retry-After": str(e.retry_after)}
            error.jupyterhub_message = str(e)
            raise error from None

    # -- the admin rule ---------------------------------------------------------------------------------

    def admin_names(self) -> set[str]:
        """User names that are admins: local accounts only (`admin_users`)."""
        return set(self.admin_users) if self.provider == "local" else set()

    def is_admin(self, handler, authentication: dict) -> bool:
        if self.provider == "local":
            return authentication["name"] in self.admin_names()
        wanted = {e.strip().lower() for e in self.admin_emails}
        return bool(wanted & {e.strip().lower() for e in self.verified_emails(authentication) or ()})

    # -- the login ---------------------------------------------------------------------------------------

    async def get_authenticated_user(self, handler, data):
        """The provider's login, then the registration policy. Refusals are pages (see STATES), never a login."""
        address = self.client_address(handler)
        account = None
        if self.provider == "local" and data and isinstance(data.get("username"), str):
            account = self.normalize_username(data["username"].strip())[:255] or None
        self.check_limit(self.limits.check_login, address, account)
        model = await super().get_authenticated_user(handler, data)
        if model is None:
            self.limits.record_login_failure(address, account)
            return None
        model["admin"] = bool(await maybe_future(self.is_admin(handler, model)))
        try:
            await self.register(handler, model, address)
        except RegistrationRefused as e:
            self.log.info("login of %s refused: %s", model["name"], e.state)
            handler.redirect(url_path_join(handler.hub.base_url, "registration", e.state))
            raise web.Finish() from None
        return model

    async def register(self, handler, model: dict, address: str) -> None:
        """Apply the mode to this login: the user's row in the service, or RegistrationRefused."""
        name = model["name"]
        status = await self.login_db.run(store.user_status, name)
        audit = {"actor": name, "subject": name, "client_ip": address}
        if status == UserStatus.DISABLED:
            raise RegistrationRefused("denied")
        if model["admin"]:
            if status is None:
                self.hub_user(handler, name)
                await self.login_db.run(store.add_user, name, status=UserStatus.ACTIVE, audit=audit,
                                        details={"provider": self.provider, "admin": True})
            elif status == UserStatus.PENDING:
                await self.login_db.run(store.activate_admin, name, audit)
            return
        if status == UserStatus.ACTIVE:
            if self.manage_groups:  # the provider's groups replace the Hub's at every login: add the invite's back
                self.add_groups(handler, model, await self.login_db.run(store.invited_groups, name))
            return
        if status == UserStatus.PENDING:
            raise RegistrationRefused("pending")
        details = {"provider": self.provider, "mode": self.registration_mode}
        if self.registration_mode == "open":
            self.hub_user(handler, name)
            await self.login_db.run(store.add_user, name, status=UserStatus.ACTIVE, audit=audit, details=details)
        elif self.registration_mode == "approval":
            self.hub_user(handler, name)  # the Hub knows them too, so the service's Hub sync keeps the row
            await self.login_db.run(store.add_user, name, status=UserStatus.PENDING, audit=audit, details=details)
            raise RegistrationRefused("pending")
        else:
            groups = await self.redeem_invite(handler, name, address, details)
            self.add_groups(handler, model, groups)

    async def redeem_invite(self, handler, name: str, address: str, details: dict) -> list[str]:
        """Redeem the invite this browser carries and create the user, in one transaction; its groups."""
        code = self.invite_code(handler)
        if not code:
            raise RegistrationRefused("invite-required")
        self.check_limit(self.limits.check_invite, address, code)
        self.limits.record_invite(address, code)

        def redeem(session):
            # The user's row first, then the claim: the invite's `used_at` is never before the row's
            # `created_at`, which is how `store.invited_groups` tells this person from an earlier one of that name.
            store.add_user(session, name, status=UserStatus.ACTIVE,
                           audit={"actor": name, "subject": name, "client_ip": address}, details=details)
            groups = store.redeem_invite(session, code, name, client_ip=address)
            store.set_mirrored_groups(session, name, groups)
            return groups

        self.hub_user(handler, name)
        try:
            groups = await self.login_db.run(redeem)
        except store.InviteRefused as e:
            handler.clear_cookie(INVITE_COOKIE, path=handler.hub.base_url)
            raise RegistrationRefused(f"invite-{e.reason}") from None
        handler.clear_cookie(INVITE_COOKIE, path=handler.hub.base_url)
        return groups

    async def refresh_user(self, user, handler=None):
        """A user the service now has as pending or disabled must sign in again (and is refused there): checked
        every `auth_refresh_age` seconds of their Hub session."""
        status = await self.login_db.run(store.user_status, user.name)
        if status in (UserStatus.PENDING, UserStatus.DISABLED):
            return False
        return await maybe_future(super().refresh_user(user, handler))

    async def delete_user(self, user):
        """The Hub deletes `user`: so does the service, at once (`store.retire_user`)."""
        await self.login_db.run(store.retire_user, user.name)
        return await maybe_future(super().delete_user(user))

    # -- the Hub side ------------------------------------------------------------------------------------

    @staticmethod
    def hub_user(handler, name: str):
        """The Hub's user `name`, made now if new (so the Hub and the service agree on who exists)."""
        return handler.user_from_username(name)

    def add_groups(self, handler, model: dict, groups: list[str]) -> None:
        """Add an invite's groups to the user's Hub groups (and to the provider's, when it manages groups)."""
        if not groups:
            return
        if self.manage_groups:
            model["groups"] = sorted(set(model.get("groups") or ()) | set(groups))
            return
        user = self.hub_user(handler, model["name"])
        user.sync_groups(sorted({g.name for g in user.groups} | set(groups)))
        handler.db.commit()

    @staticmethod
    def invite_code(handler) -> str | None:
        value = handler.get_secure_cookie(INVITE_COOKIE, max_age_days=INVITE_COOKIE_DAYS)
        return value.decode("utf-8", "replace") if value else None

    def get_handlers(self, app):
        return [
            *super().get_handlers(app),
            (r"/invite/([^/]+)", InviteHandler),
            (r"/registration/([a-z-]+)", RegistrationStatusHandler),
        ]


class RegistrationStatusHandler(BaseHandler):
    """`/hub/registration/<state>`: what a refused login is told (waiting for approval, refused, invite needed)."""

    async def get(self, state: str) -> None:
        if state not in STATES:
            raise web.HTTPError(404)
        title, message = STATES[state]
        self.set_status(200 if state == "pending" else 403)
        self.finish(await render(self, "registration-status.html", state=state, title=title, message=message))


class InviteHandler(BaseHandler):
    """`/hub/invite/<code>`: checks the invite, keeps its code in a signed cookie and sends the person on to the
    provider's login or the local sign-up, where it is redeemed. Opening the link uses nothing up."""

    async def get(self, code: str) -> None:
        authenticator = self.authenticator
        address = authenticator.client_address(self)
        authenticator.check_limit(authenticator.limits.check_invite, address, code)
        authenticator.limits.record_invite(address, code)
        try:
            invite = await authenticator.login_db.run(store.check_invite, code)
        except store.InviteRefused as e:
            title, message = STATES[f"invite-{e.reason}"]
            self.set_status(404 if e.reason == "unknown" else 410)
            self.finish(await render(self, "registration-status.html", state=f"invite-{e.reason}", title=title,
                                     message=message))
            return
        self.set_secure_cookie(
            INVITE_COOKIE, code, expires_days=INVITE_COOKIE_DAYS, path=self.hub.base_url, httponly=True,
            samesite="Lax", secure=self.request.protocol == "https",
        )
        self.finish(await render(
            self, "invite.html", invite=invite, continue_url=authenticator.registration_url(self.hub.base_url),
            provider=authenticator.provider, login_service=authenticator.login_service,
        ))

"""Local accounts with no third party: `LocalAccountsAuthenticator`.

Sign-up, sign-in and change-password pages in the Hub (its own templates, extended: `templates/`); passwords
hashed with argon2id (`passwords.py`) and kept in the SERVICE's database (`local_accounts`), beside the `users`
row that holds the person's status. Registration (open / approval / invite), the admin rule and the rate limits
are the shared `RegistrationMixin`. An admin resets a password through the service (`POST
/api/users/{name}/password`, or `jupyterhub-inference users reset-password NAME`).

Written here rather than taken from jupyterhub-nativeauthenticator (1.3.0): that one hashes with bcrypt only,
compares hashes with `==`, and keeps its accounts and their approval in its own table in the Hub's database, where
the service (the one source of truth for a user's status) cannot see them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from jupyterhub.auth import Authenticator
from jupyterhub.handlers import BaseHandler
from jupyterhub.handlers.login import LoginHandler
from jupyterhub.utils import url_path_join
from tornado import web
from traitlets import Integer, Unicode, validate

from ..errors import Conflict
from ..orm import UserStatus
from . import store
from .pages import render
from .passwords import (
    MIN_LENGTH,
    PasswordRejected,
    check_policy,
    generate_password,
    hash_password,
    needs_rehash,
    verify_password,
)
from .registration import RegistrationMixin

# Names people may sign up with (after the Hub's lower-casing): short, and safe in URLs, paths and Hub groups.
# The Hub's page.html, extended with a link to the change-password page: for `c.JupyterHub.template_paths`.
NAV_TEMPLATES = str(Path(__file__).with_name("hub_templates"))
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


class LocalAccountsAuthenticator(RegistrationMixin, Authenticator):
    """User names and passwords kept by this Hub, hashed with argon2id."""

    provider = "local"

    bootstrap_admin = Unicode(
        "", help="""A first admin's user name, created at start when it has no account yet (an admin, like
        `admin_users`). Its password is `bootstrap_admin_password`, or one generated and printed ONCE in the log."""
    ).tag(config=True)

    bootstrap_admin_password = Unicode(
        "", help="The first admin's password (it must meet the password policy); empty: generate one."
    ).tag(config=True)

    min_password_length = Integer(MIN_LENGTH, help=f"Shortest password accepted (at least {MIN_LENGTH}).").tag(
        config=True
    )

    @validate("min_password_length")
    def _validate_min_length(self, proposal):
        if proposal.value < MIN_LENGTH:
            raise ValueError(f"min_password_length must be at least {MIN_LENGTH}")
        return proposal.value

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.bootstrap_admin:
            name = self.normalize_username(self.bootstrap_admin)
            self.admin_users = set(self.admin_users) | {name}  # the Hub makes its user an admin at start
            self.bootstrap(name)

    def bootstrap(self, name: str) -> None:
        """Create the first admin's account (and active user) if it has none; at start, before any request."""
        password = self.bootstrap_admin_password
        if password:
            check_policy(password, username=name, min_length=self.min_password_length)
        generated = generate_password() if not password else None

        def create(session) -> bool:
            if store.password_hash(session, name) is not None:
                return False
            audit = {"actor": "bootstrap", "subject": name, "client_ip": None}
            store.create_account(session, name, hash_password(password or generated), audit)
            if store.user_status(session, name) is None:
                store.add_user(session, name, status=UserStatus.ACTIVE, audit=audit, details={"provider": "local",
                                                                                              "admin": True})
            return True

        if self.login_db.call(create) and generated:
            # Printed once, as asked for (nothing else ever logs a password); only its hash is stored.
            self.log.warning("\n\n  First admin %r created with the password:  %s\n  (shown only this once; "
                             "change it at /hub/change-password)\n", name, generated)

    def admin_names(self) -> set[str]:
        return set(self.admin_users)

    def registration_url(self, base_url: str) -> str:
        return url_path_join(base_url, "signup")

    async def authenticate(self, handler, data):
        """The user's name if the password matches their argon2id hash; None otherwise (the same work either way)."""
        username, password = (data or {}).get("username"), (data or {}).get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username or len(username) > 255:
            return None
        name = self.normalize_username(username.strip())
        hashed = await self.login_db.run(store.password_hash, name)
        if not await asyncio.to_thread(verify_password, hashed, password):
            return None
        if needs_rehash(hashed):
            await self.login_db.run(store.rehash, name, hashed, await asyncio.to_thread(hash_password, password))
        return {"name": name}

    def get_handlers(self, app):
        ours = [("/login", LocalLoginHandler), ("/signup", SignUpHandler), ("/change-password", ChangePasswordHandler)]
        return ours + [h for h in super().get_handlers(app) if h[0] != "/login"]


class LocalLoginHandler(LoginHandler):
    """The Hub's sign-in page with a link to sign up."""

    def render_template(self, name, sync=False, **ns):
        if name != "login.html":
            return super().render_template(name, sync=sync, **ns)
        if self.authenticator.registration_mode != "invite":
            ns.setdefault("signup_url", url_path_join(self.hub.base_url, "signup"))
        return render(self, "local-login.html", sync=sync, **ns)


class SignUpHandler(BaseHandler):
    """`/hub/signup`: a new local account, then a sign-in through the registration policy (which makes the user
    active, pending or, with an invite, redeems it)."""

    async def page(self, *, error: str = "", username: str = "", status: int = 200) -> None:
        auth = self.authenticator
        invite = None
        code = auth.invite_code(self)
        if code:
            try:
                invite = await auth.login_db.run(store.check_invite, code)
            except store.InviteRefused:
                invite = None
        self.set_status(status)
        self.finish(await render(self, "signup.html", error=error, username=username, invite=invite,
                                 signup_url=url_path_join(self.hub.base_url, "signup"),
                                 min_length=auth.min_password_length))

    async def get(self) -> None:
        if self.current_user:
            self.redirect(self.get_next_url(self.current_user))
            return
        if self.authenticator.registration_mode == "invite" and not self.authenticator.invite_code(self):
            self.redirect(url_path_join(self.hub.base_url, "registration", "invite-required"))
            return
        await self.page()

    async def post(self) -> None:
        auth = self.authenticator
        address = auth.client_address(self)
        username = self.get_body_argument("username", "", strip=True)[:64]
        name = auth.normalize_username(username)
        try:
            auth.check_limit(auth.limits.check_signup, address, name)
        except web.HTTPError as e:
            for header, value in getattr(e, "headers", {}).items():
                self.set_header(header, value)
            await self.page(error=e.log_message, username=username, status=429)
            return
        auth.limits.record_signup(address, name)
        password = self.get_body_argument("password", "")
        try:
            await self.create(name, password, self.get_body_argument("password_confirm", ""), address)
        except (PasswordRejected, Conflict) as e:
            await self.page(error=getattr(e, "message", None) or str(e), username=username, status=400)
            return
        user = await self.login_user({"username": name, "password": password})  # refusals end in a page
        self.redirect(self.get_next_url(user) if user else self.settings["login_url"])

    async def create(self, name: str, password: str, confirm: str, address: str) -> None:
        """The account (and, in invite mode, the redeemed invite and the active user) in one transaction."""
        auth = self.authenticator
        if not USERNAME.match(name):
            raise PasswordRejected("Choose a user name of lowercase letters, digits, '.', '_' or '-' "
                                   "(at most 32, starting with a letter or a digit).")
        if password != confirm:
            raise PasswordRejected("The two passwords differ.")
        check_policy(password, username=name, min_length=auth.min_password_length)
        if name in auth.admin_names() or self.find_user(name) is not None:
            raise Conflict(f"The user name {name!r} is taken.")
        code = auth.invite_code(self) if auth.registration_mode == "invite" else None
        if auth.registration_mode == "invite" and not code:
            raise PasswordRejected("This hub is open by invitation only: follow your invitation link first.")
        hashed = await asyncio.to_thread(hash_password, password)
        audit = {"actor": name, "subject": name, "client_ip": address}

        def create(session) -> list[str]:
            if store.user_status(session, name) is not None:
                raise Conflict(f"The user name {name!r} is taken.")
            store.create_account(session, name, hashed, audit)
            if code is None:
                return []  # the sign-in that follows registers the user as the mode says
            groups = store.redeem_invite(session, code, name, client_ip=address)
            store.add_user(session, name, status=UserStatus.ACTIVE, groups=groups, audit=dict(audit),
                           details={"provider": "local", "mode": "invite"})
            return groups

        if code is None:
            await auth.login_db.run(create)
            return
        auth.check_limit(auth.limits.check_invite, address, code)
        auth.limits.record_invite(address, code)
        hub_user = auth.hub_user(self, name)  # first, so the service's Hub sync never sees the row alone
        try:
            groups = await auth.login_db.run(create)
        except (store.InviteRefused, Conflict) as e:
            self.users.delete(hub_user.name)  # made just now (the name was free): nothing else refers to it
            if isinstance(e, Conflict):
                raise
            self.clear_cookie("jupyterhub-inference-invite", path=self.hub.base_url)
            self.redirect(url_path_join(self.hub.base_url, "registration", f"invite-{e.reason}"))
            raise web.Finish() from None
        self.clear_cookie("jupyterhub-inference-invite", path=self.hub.base_url)
        if groups:
            hub_user.sync_groups(sorted({g.name for g in hub_user.groups} | set(groups)))
            self.db.commit()


class ChangePasswordHandler(BaseHandler):
    """`/hub/change-password`: a signed-in user changes their own password (the current one is asked for)."""

    async def page(self, *, error: str = "", done: bool = False, status: int = 200) -> None:
        self.set_status(status)
        self.finish(await render(self, "change-password.html", error=error, done=done,
                                 change_password_url=url_path_join(self.hub.base_url, "change-password"),
                                 min_length=self.authenticator.min_password_length))

    @web.authenticated
    async def get(self) -> None:
        await self.page()

    @web.authenticated
    async def post(self) -> None:
        auth = self.authenticator
        name = self.current_user.name
        address = auth.client_address(self)
        try:
            auth.check_limit(auth.limits.check_login, address, name)
        except web.HTTPError as e:
            await self.page(error=e.log_message, status=429)
            return
        current = self.get_body_argument("current_password", "")
        password = self.get_body_argument("password", "")
        hashed = await auth.login_db.run(store.password_hash, name)
        if not await asyncio.to_thread(verify_password, hashed, current):
            auth.limits.record_login_failure(address, name)
            await self.page(error="The current password is not right.", status=403)
            return
        try:
            if password != self.get_body_argument("password_confirm", ""):
                raise PasswordRejected("The two new passwords differ.")
            check_policy(password, username=name, min_length=auth.min_password_length)
        except PasswordRejected as e:
            await self.page(error=str(e), status=400)
            return
        new_hash = await asyncio.to_thread(hash_password, password)
        audit = {"actor": name, "subject": name, "client_ip": address}
        await auth.login_db.run(store.set_password, name, new_hash, audit, action="password.change")
        await self.page(done=True)

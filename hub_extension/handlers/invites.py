"""Admin routes for registration: invites and local passwords (`login/store.py` does the work, audited).

- `GET /api/invites[?status=active|used|expired|revoked]`, newest first (never a code: only its hash is kept).
- `POST /api/invites` `{"expires_in_days": 7, "note": "...", "groups": ["..."]}`: 201 with `code` and `url`
  (`/hub/invite/<code>` on `InferenceService.hub_public_url`, else on the Hub that was asked), shown once.
- `DELETE /api/invites/{id}`: revoke an unused invite (409 when it was used).
- `POST /api/users/{name}/password` `{"password": "..."}` (optional): an admin sets a user's local password; without
  one a random password is generated and answered once.
"""

from __future__ import annotations

import asyncio
import os

from ..errors import BadRequest, NotFound
from ..login import store
from ..login.passwords import PasswordRejected, check_policy, generate_password, hash_password
from ..net import _trusted
from .account import MAX_ROW_ID
from .admin import AdminHandler


def hub_invite_url(handler, code: str) -> str:
    """The invite's link: on the Hub's public address when configured, else on the Hub the admin reached us
    through (same host; the Hub's base URL)."""
    if handler.services.hub_public_url:
        return store.invite_link(handler.services.hub_public_url, code)
    request = handler.request
    proto = request.protocol
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip()
    if forwarded in ("http", "https") and _trusted(request.remote_ip, handler.services.trusted_proxies):
        proto = forwarded
    base = os.environ.get("JUPYTERHUB_BASE_URL", "/")
    return store.invite_link(f"{proto}://{request.host}{base}", code)


class InvitesHandler(AdminHandler):
    async def get(self) -> None:
        status = self.get_query_argument("status", None)
        self.write_json({"invites": await self.services.db.run(store.list_invites, status)})

    async def post(self) -> None:
        fields = store.parse_invite_request(await self.json_body())
        code, model = await self.services.db.run(
            lambda session: store.create_invite(session, audit=self.audit_context(None), **fields)
        )
        self.write_json({**model, "code": code, "url": hub_invite_url(self, code)}, status=201)


class InviteHandler(AdminHandler):
    async def delete(self, invite_id: str) -> None:
        if not (invite_id.isascii() and invite_id.isdigit() and len(invite_id) <= 12):
            raise BadRequest("An invite id is a number.", param="id")
        if int(invite_id) > MAX_ROW_ID:  # past the id column (PostgreSQL would fail): no such invite
            raise NotFound("No such invite.")
        model = await self.services.db.run(store.revoke_invite, int(invite_id), self.audit_context(None))
        self.write_json(model)


class UserPasswordHandler(AdminHandler):
    """An admin resets a user's local password (creating the account for a Hub user who has none)."""

    async def post(self, name: str) -> None:
        await self.admin.lookup(name)  # 404 for someone neither the service nor the Hub knows
        body = await self.json_body()
        if set(body) - {"password"}:
            raise BadRequest("Only 'password' may be given.", param=sorted(set(body) - {"password"})[0])
        password = body.get("password")
        generated = password is None
        if generated:
            password = generate_password()
        elif not isinstance(password, str):
            raise BadRequest("'password' must be a string.", param="password")
        try:
            check_policy(password, username=name)
        except PasswordRejected as e:
            raise BadRequest(str(e), param="password") from None
        hashed = await asyncio.to_thread(hash_password, password)
        await self.services.db.run(store.set_password, name, hashed, self.audit_context(name), action="password.reset",
                                   create=True)
        self.write_json({"name": name, **({"password": password} if generated else {})})


routes = [
    (r"/api/invites", InvitesHandler),
    (r"/api/invites/([^/]+)", InviteHandler),
    (r"/api/users/([^/]+)/password", UserPasswordHandler),
]

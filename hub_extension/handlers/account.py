"""`/api/me`, `/api/keys` (a user's own keys) and `/health`."""

from __future__ import annotations

from ..errors import BadRequest, Forbidden, NotFound
from .base import APIHandler, Auth


class HealthHandler(APIHandler):
    auth = Auth.PUBLIC

    def get(self) -> None:
        self.write_json({"status": "ok"})


class KeyOwnerMixin:
    """Resolves whose keys a request acts on and the audit context to record it with."""

    def audit_context(self, subject: str) -> dict:
        identity = self.identity
        actor = identity.acting_admin or identity.name
        return {
            "actor": actor,
            "acting_as": identity.name if identity.acting_admin else None,
            "subject": subject,
            "client_ip": self.client_ip,
        }

    def own_user_id(self) -> int:
        if self.identity.user_id is None:
            raise BadRequest("API keys belong to users; this service runs without user identities.")
        if not self.services.permissions.allowed(self.identity, "keys"):
            raise Forbidden("You may not manage API keys (feature 'keys').")
        return self.identity.user_id


class MeHandler(APIHandler):
    async def get(self) -> None:
        model = self.identity.model()
        # No row: no user identity (modes none/static), or a Hub user viewed-as before their first visit (id 0),
        # who is active or the view-as would have been refused.
        state = await self.services.users.by_id(self.identity.user_id) if self.identity.user_id else None
        model["status"] = state.status if state is not None else "active"
        self.write_json(model)


class MyPermissionsHandler(APIHandler):
    """What the caller may do now, each feature and model with its source (through a key: the key's share)."""

    def get(self) -> None:
        self.write_json(self.services.permissions.effective(self.identity, registry_names(self.services)))


def registry_names(services) -> list[str]:
    """The configured model names (permissions know nothing of models; handlers hand them the names)."""
    return [info.name for info in services.models.list_models()] if services.models is not None else []


class KeysHandler(KeyOwnerMixin, APIHandler):
    async def get(self) -> None:
        user_id = self.own_user_id()
        self.write_json({"keys": await self.services.keys.list(user_id, include_revoked(self))})

    async def post(self) -> None:
        user_id = self.own_user_id()
        if self.identity.acting_admin:
            raise Forbidden("Keys cannot be created while viewing as another user; issue one explicitly instead.")
        fields = self.services.keys.validate_request(await self.json_body())
        self.services.permissions.check_key_narrowing(self.identity, fields)
        secret, model = await self.services.keys.create(
            user_id, audit=self.audit_context(self.identity.name), **fields
        )
        self.write_json({**model, "key": secret}, status=201)

    async def delete(self) -> None:
        user_id = self.own_user_id()
        revoked = await self.services.keys.revoke(user_id, None, audit=self.audit_context(self.identity.name))
        self.write_json({"revoked": len(revoked)})


class KeyHandler(KeyOwnerMixin, APIHandler):
    async def delete(self, key_id: str) -> None:
        user_id = self.own_user_id()
        await self.services.keys.revoke(user_id, _key_id(key_id), audit=self.audit_context(self.identity.name))
        self.set_status(204)
        self.finish()


MAX_ROW_ID = 2**31 - 1  # id columns are 32-bit INTEGERs: PostgreSQL refuses larger numbers (a 500 otherwise)


def include_revoked(handler) -> bool:
    """`?include_revoked=true|false` (empty: false); anything else is a 400, not a silent false."""
    value = handler.get_query_argument("include_revoked", "") or "false"
    if value not in ("true", "false"):
        raise BadRequest("'include_revoked' must be true or false.", param="include_revoked")
    return value == "true"


def _key_id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_ROW_ID:
        raise NotFound("No such key.")
    return int(raw)


routes = [
    (r"/health", HealthHandler),
    (r"/api/me", MeHandler),
    (r"/api/me/permissions", MyPermissionsHandler),
    (r"/api/keys", KeysHandler),
    (r"/api/keys/([^/]+)", KeyHandler),
]

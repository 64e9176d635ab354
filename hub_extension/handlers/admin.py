"""Admin routes: users and anyone's keys."""

from __future__ import annotations

from .account import KeyOwnerMixin, _key_id
from .base import APIHandler, Auth


class UsersHandler(APIHandler):
    auth = Auth.ADMIN

    async def get(self) -> None:
        self.write_json({"users": await self.services.users.list()})


class UserKeysHandler(KeyOwnerMixin, APIHandler):
    auth = Auth.ADMIN

    async def get(self, name: str) -> None:
        state = await self.services.users.by_name(name)
        include_revoked = self.get_query_argument("include_revoked", "false") == "true"
        self.write_json({"keys": await self.services.keys.list(state.id, include_revoked)})

    async def post(self, name: str) -> None:
        """An admin issues a key for a user explicitly (audited with both names)."""
        state = await self.services.users.by_name(name)
        fields = self.services.keys.validate_request(self.get_json_body())
        secret, model = await self.services.keys.create(
            state.id, created_by=self.identity.name, audit=self.audit_context(name), **fields
        )
        self.write_json({**model, "key": secret}, status=201)

    async def delete(self, name: str) -> None:
        state = await self.services.users.by_name(name)
        revoked = await self.services.keys.revoke(state.id, None, audit=self.audit_context(name))
        self.write_json({"revoked": len(revoked)})


class UserKeyHandler(KeyOwnerMixin, APIHandler):
    auth = Auth.ADMIN

    async def delete(self, name: str, key_id: str) -> None:
        state = await self.services.users.by_name(name)
        await self.services.keys.revoke(state.id, _key_id(key_id), audit=self.audit_context(name))
        self.set_status(204)
        self.finish()


routes = [
    (r"/api/users", UsersHandler),
    (r"/api/users/([^/]+)/keys", UserKeysHandler),
    (r"/api/users/([^/]+)/keys/([^/]+)", UserKeyHandler),
]

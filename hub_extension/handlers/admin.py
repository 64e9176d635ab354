"""Admin routes: users (merged with the Hub's), their status, grants per user and per group, keys, audit.

Every route is `Auth.ADMIN` (never while acting as another user). Handlers only parse, call the components
(`administration.UserAdmin`, `permissions.PermissionPolicy`, `api_keys.KeyManager`, `audit.AuditLog`) and
write JSON; every change is audited by the component in the same transaction as the change.
"""

from __future__ import annotations

from ..administration import parse_audit_query
from .account import KeyOwnerMixin, _key_id, include_revoked, registry_names
from .base import APIHandler, Auth


class AdminHandler(KeyOwnerMixin, APIHandler):
    """Admin routes. A narrowed key is never an admin's credential (identity.py), so it is refused here too."""

    auth = Auth.ADMIN

    @property
    def admin(self):
        return self.services.admin


class UsersHandler(AdminHandler):
    async def get(self) -> None:
        status = self.get_query_argument("status", None)
        self.write_json({"users": await self.admin.list(status)})


class UserHandler(AdminHandler):
    async def get(self, name: str) -> None:
        self.write_json(await self.admin.detail(name, registry_names(self.services)))


class UserStatusHandler(AdminHandler):
    """`POST /api/users/{name}/approve|deny|disable|enable`: 409 when the user's status does not allow it."""

    async def post(self, name: str, action: str) -> None:
        model = await self.admin.set_status(name, action, audit=self.audit_context(name), actor_name=self.identity.name)
        self.write_json(model)


class UserPermissionsHandler(AdminHandler):
    async def get(self, name: str) -> None:
        state = await self.admin.lookup(name)
        self.write_json(self.services.permissions.effective(state, registry_names(self.services)))


class GrantsHandler(AdminHandler):
    """`GET` the grants; `PUT` replaces them all; `PATCH` merges (null removes one); `DELETE` removes all.

    Body: `{"features": {"embeddings": true, "chat": false}, "models": {"tiny-chat": true, "*": false}}`.
    """

    subject_kind = "user"

    async def subject(self, name: str, writing: bool) -> str:
        """The audit subject; 404 for an unknown user (or, when writing, a group the Hub does not know)."""
        if self.subject_kind == "user":
            await self.admin.lookup(name)  # grants are kept by name: no row needed
            return name
        if writing:
            await self.admin.group_grants_target(name)
        return f"group:{name}"

    async def get(self, name: str) -> None:
        await self.subject(name, writing=False)
        self.write_json(self.services.permissions.grants(self.subject_kind, name))

    async def _change(self, name: str, body, *, partial: bool, replace: bool) -> None:
        policy = self.services.permissions
        changes = policy.parse_grants(body, partial=partial)
        subject = await self.subject(name, writing=bool(changes))
        grants = await policy.set_grants(
            self.subject_kind, name, changes, replace=replace, audit=self.audit_context(subject)
        )
        self.write_json(grants)

    async def put(self, name: str) -> None:
        await self._change(name, await self.json_body(), partial=False, replace=True)

    async def patch(self, name: str) -> None:
        await self._change(name, await self.json_body(), partial=True, replace=False)

    async def delete(self, name: str) -> None:
        await self._change(name, {}, partial=False, replace=True)


class GroupGrantsHandler(GrantsHandler):
    subject_kind = "group"


class AuditHandler(AdminHandler):
    """`GET /api/audit?user=&action=&since=&until=&limit=`, newest first."""

    async def get(self) -> None:
        args = {k: self.get_query_argument(k, None) for k in ("user", "action", "since", "until", "limit")}
        self.write_json({"events": await self.services.audit.query(**parse_audit_query(args))})


class UserKeysHandler(AdminHandler):
    async def get(self, name: str) -> None:
        state = await self.admin.lookup(name)  # a read makes no row: an unseen user (id 0) simply has no keys
        self.write_json({"keys": await self.services.keys.list(state.id, include_revoked(self))})

    async def post(self, name: str) -> None:
        """An admin issues a key for a user explicitly (audited with both names)."""
        state = await self.admin.state(name)
        fields = self.services.keys.validate_request(await self.json_body())
        secret, model = await self.services.keys.create(
            state.id, created_by=self.identity.name, audit=self.audit_context(name), **fields
        )
        self.write_json({**model, "key": secret}, status=201)

    async def delete(self, name: str) -> None:
        state = await self.admin.state(name)
        revoked = await self.services.keys.revoke(state.id, None, audit=self.audit_context(name))
        self.write_json({"revoked": len(revoked)})


class UserKeyHandler(AdminHandler):
    async def delete(self, name: str, key_id: str) -> None:
        state = await self.admin.state(name)
        await self.services.keys.revoke(state.id, _key_id(key_id), audit=self.audit_context(name))
        self.set_status(204)
        self.finish()


routes = [
    (r"/api/users", UsersHandler),
    (r"/api/users/([^/]+)", UserHandler),
    (r"/api/users/([^/]+)/(approve|deny|disable|enable)", UserStatusHandler),
    (r"/api/users/([^/]+)/permissions", UserPermissionsHandler),
    (r"/api/users/([^/]+)/grants", GrantsHandler),
    (r"/api/groups/([^/]+)/grants", GroupGrantsHandler),
    (r"/api/users/([^/]+)/keys", UserKeysHandler),
    (r"/api/users/([^/]+)/keys/([^/]+)", UserKeyHandler),
    (r"/api/audit", AuditHandler),
]

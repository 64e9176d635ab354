"""Quotas over HTTP: `GET /api/me/quota` for everyone; for admins, the limits of a user, a group or everyone.

`PUT` replaces a subject's limits (`{"tokens_per_day": int|null, "tokens_per_month": int|null,
"requests_per_minute": int|null, "weight": number|null}`, 0: unlimited, null: nothing at this level), `DELETE`
removes them. Changes are audited in the same transaction by `quotas.QuotaPolicy` and apply at once here.
"""

from __future__ import annotations

from .admin import AdminHandler
from .base import APIHandler


class MyQuotaHandler(APIHandler):
    """What the caller (through a key: its owner) may still spend, per window, and where each limit came from."""

    async def get(self) -> None:
        self.write_json(await self.services.quotas.remaining(self.identity))


class UserQuotaHandler(AdminHandler):
    """`/api/users/{name}/quota`; the group and default routes differ only in whom the row is for."""

    subject_kind = "user"

    async def subject(self, name: str, writing: bool) -> str:
        """The audit subject; 404 for an unknown user (or, when writing, a group the Hub does not know)."""
        self.state = await self.admin.lookup(name)  # quotas are kept by name: no row needed
        return name

    async def answer(self, name: str, quota: dict) -> None:
        quota["effective"] = await self.services.quotas.remaining(self.state)
        self.write_json(quota)

    async def get(self, name: str = "") -> None:
        await self.subject(name, writing=False)
        await self.answer(name, self.services.quotas.quota(self.subject_kind, name))

    async def _change(self, name: str, body) -> None:
        quotas = self.services.quotas
        changes = quotas.parse_quota(body)
        subject = await self.subject(name, writing=any(v is not None for v in changes.values()))
        quota = await quotas.set_quota(self.subject_kind, name, changes, audit=self.audit_context(subject))
        await self.answer(name, quota)

    async def put(self, name: str = "") -> None:
        await self._change(name, await self.json_body())

    async def delete(self, name: str = "") -> None:
        await self._change(name, {})


class GroupQuotaHandler(UserQuotaHandler):
    subject_kind = "group"

    async def subject(self, name: str, writing: bool) -> str:
        if writing:
            await self.admin.group_grants_target(name)
        return f"group:{name}"

    async def answer(self, name: str, quota: dict) -> None:
        self.write_json(quota)


class DefaultQuotaHandler(GroupQuotaHandler):
    subject_kind = "default"

    async def subject(self, name: str, writing: bool) -> str:
        return "quotas:default"


routes = [
    (r"/api/me/quota", MyQuotaHandler),
    (r"/api/users/([^/]+)/quota", UserQuotaHandler),
    (r"/api/groups/([^/]+)/quota", GroupQuotaHandler),
    (r"/api/quotas/default", DefaultQuotaHandler),
]

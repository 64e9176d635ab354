"""What an administrator does to users, without Tornado: the merged user list, status, grants, view-as.

The handlers in `handlers/admin.py` (and the view-as hook in `handlers/base.py`) only parse and call this;
the CLI uses the same components directly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import replace

from .errors import BadRequest, Forbidden, NotFound, ServiceUnavailable
from .identity import Identity, check_state
from .orm import UserStatus
from .permissions import PermissionPolicy
from .usage import UsageReports, parse_time
from .users import HubUsers, UserDirectory, UserState

log = logging.getLogger("hub_extension.admin")

# The header an admin sends to act as (view the service as) another user.
ACT_AS_HEADER = "X-Inference-Act-As"
AUDIT_LIMIT_MAX = 500
# A view-as session: an admin's reads as one user are audited once per this many seconds, not on every GET
# (every change made while acting is audited by the component that makes it).
VIEW_AS_SESSION_SECONDS = 30 * 60


class UserAdmin:
    """Users as an admin sees them: the Hub's users merged with ours, and the changes an admin may make.

    `hub` is None outside `hub` mode (and in the CLI): then only users this service has seen exist. `usage`
    (`usage.UsageReports`) adds each user's requests and tokens of the last 30 days.
    """

    def __init__(self, users: UserDirectory, permissions: PermissionPolicy, hub: HubUsers | None = None,
                 usage: UsageReports | None = None):
        self.users = users
        self.permissions = permissions
        self.hub = hub
        self.usage = usage
        self._view_sessions: OrderedDict[tuple[str, str], float] = OrderedDict()  # (admin, user) -> audited at

    def _merge(self, ours: dict | None, hub: dict | None, usage: dict | None = None) -> dict:
        """One user's admin model. `status` is null for a Hub user who has not used the service yet; `usage` is
        the user's row of `UsageReports.per_user` (`usage_30d` is zeros without one, absent without metering)."""
        name = (ours or hub)["name"]
        if hub is not None:
            groups, roles, hub_admin = sorted(hub.get("groups") or ()), sorted(hub.get("roles") or ()), bool(
                hub.get("admin")
            )
        else:
            groups, roles, hub_admin = ours["groups"], ours["roles"], ours["hub_admin"]
        probe = UserState(0, name, "", hub_admin, tuple(groups), tuple(roles), True)
        model = {
            "name": name,
            "role": "admin" if self.permissions.is_admin(probe) else "user",
            "status": ours["status"] if ours else None,
            "groups": groups,
            "roles": roles,
            "in_hub": hub is not None if self.hub is not None and not (ours or {}).get("hub_unreachable")
            else ours["in_hub"],
            "created_at": ours["created_at"] if ours else None,
            "last_seen": ours["last_seen"] if ours else None,
            "hub_last_activity": hub.get("last_activity") if hub else None,
        }
        if usage is not None:
            model["usage_30d"] = usage.get(name) or {"requests": 0, "total_tokens": 0}
        return model

    async def _usage(self, users: list[str] | None = None) -> dict | None:
        return await self.usage.per_user(users) if self.usage is not None else None

    async def list(self, status: str | None = None) -> list[dict]:
        if status is not None and status not in UserStatus.ALL:
            raise BadRequest(f"Unknown status {status!r}; one of {', '.join(UserStatus.ALL)}.", param="status")
        ours = {u["name"]: u for u in await self.users.list()}
        hub = {u["name"]: u for u in await self.hub.list()} if self.hub is not None else {}
        usage = await self._usage()
        merged = [self._merge(ours.get(n), hub.get(n), usage) for n in sorted(set(ours) | set(hub))]
        return [u for u in merged if status is None or u["status"] == status]

    async def detail(self, name: str, models=()) -> dict:
        ours = await self.users.get_model(name)
        try:
            hub = await self.hub.get(name) if self.hub is not None else None
        except ServiceUnavailable:
            if ours is None:
                raise
            # The Hub is unreachable: describe the user from our mirror (a status change was saved all the same).
            hub, ours = None, {**ours, "hub_unreachable": True}
        if ours is None and hub is None:
            raise NotFound(f"No such user: {name}")
        model = self._merge(ours, hub, await self._usage([name]))
        model["grants"] = self.permissions.grants("user", name)
        model["permissions"] = self.permissions.effective(await self.lookup(name), models)
        return model

    async def _find(self, name: str) -> tuple[UserState | None, dict | None]:
        """(our state, None) for a user we know, (None, the Hub's model) for a Hub-only user; else 404."""
        try:
            state = await self.users.by_name(name)
        except NotFound:
            hub = await self.hub.get(name) if self.hub is not None else None
            if hub is None:
                raise
            return None, hub
        if not state.in_hub:
            raise NotFound(f"No such user: {name}")
        return state, None

    async def lookup(self, name: str) -> UserState:
        """A user for reading (permissions, grants): ours, or the Hub's if we have not seen them; else 404.

        Unlike `state`, it makes no row: a Hub-only user is described from the Hub's model (id 0, the status a
        new user gets).
        """
        state, hub = await self._find(name)
        if state is not None:
            return state
        return UserState(0, name, self.users.new_user_status, bool(hub.get("admin")),
                         tuple(sorted(hub.get("groups") or ())), tuple(sorted(hub.get("roles") or ())), True)

    async def state(self, name: str) -> UserState:
        """Our state of a user, for changes: a Hub user we have not seen gets their row now; else 404."""
        state, hub = await self._find(name)
        return state if state is not None else await self.users.seen_from_hub(hub)

    async def set_status(self, name: str, action: str, *, audit: dict, actor_name: str | None = None) -> dict:
        """`approve|deny|disable|enable`; an admin cannot disable or deny themselves (a lock-out)."""
        if actor_name == name and action in ("disable", "deny"):
            raise BadRequest("You cannot disable yourself.")
        await self.state(name)
        await self.users.apply_action(name, action, audit=audit)
        return await self.detail(name)

    async def group_grants_target(self, name: str) -> None:
        """404 for a group the Hub does not know (when there is a Hub to ask)."""
        if self.hub is not None and not await self.hub.group_exists(name):
            raise NotFound(f"No such group: {name}")

    async def act_as(
        self, identity: Identity, name: str, *, audit_log, client_ip: str | None, method: str, path: str
    ) -> Identity:
        """The identity for an admin's request made as user `name`: exactly their rights, never more.

        Refused: callers who are not admins (a narrowed key never is), acting as an admin, acting while already
        acting. A read creates nothing (no user row); the start of a view-as session is audited (`impersonate`,
        with both names), as is every refused attempt by an admin.
        """
        if not identity.is_admin or identity.acting_admin:
            raise Forbidden("Only administrators may act as another user.")
        if not name:
            raise BadRequest(f"{ACT_AS_HEADER} must name a user.")
        state = await self.lookup(name)
        entry = {"actor": identity.name, "subject": name, "client_ip": client_ip, "details": {"method": method, "path": path}}
        if self.permissions.is_admin(state):
            await audit_log.record(action="impersonate.refused", **entry)
            raise Forbidden("Administrators cannot act as another administrator.")
        check_state(state)  # a disabled or pending user can do nothing, so neither can we as them
        if self._starts_view_session(identity.name, name):
            await audit_log.record(action="impersonate", acting_as=name, **entry)
        acting = identity.as_user(state, is_admin=False)
        return replace(acting, key_id=identity.key_id)

    def _starts_view_session(self, admin: str, user: str) -> bool:
        now = time.monotonic()
        started = self._view_sessions.get((admin, user))
        if started is not None and now - started < VIEW_AS_SESSION_SECONDS:
            return False
        self._view_sessions[(admin, user)] = now
        self._view_sessions.move_to_end((admin, user))
        while len(self._view_sessions) > 10_000:
            self._view_sessions.popitem(last=False)
        return True


def parse_audit_query(args: dict[str, str | None]) -> dict:
    """`user`, `action`, `since`, `until` (ISO 8601) and `limit` (1..AUDIT_LIMIT_MAX) from query arguments; 400 when off."""
    out: dict = {"user": args.get("user") or None, "action": args.get("action") or None}
    for name in ("since", "until"):
        out[name] = parse_time(name, args.get(name))
    raw = args.get("limit") or "100"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= AUDIT_LIMIT_MAX:
        raise BadRequest(f"'limit' must be an integer from 1 to {AUDIT_LIMIT_MAX}.", param="limit")
    out["limit"] = int(raw)
    return out

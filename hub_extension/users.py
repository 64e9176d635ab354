"""The service's view of users: mirrored from the Hub, with a status only we keep.

The Hub is the source of truth for who exists, who is admin and which groups and roles they have. We
create a row on first sight, keep a small in-process cache of each user's state so a request costs no
database round trip, and a periodic sync with the Hub marks users the Hub deleted or blocked, so their
keys stop working within the sync interval.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .audit import AuditLog
from .db import Database
from .errors import BadRequest, Conflict, NotFound
from .orm import User, UserStatus, utcnow

log = logging.getLogger("hub_extension.users")

# Admin status actions: action -> (statuses it may start from, status it leads to). `approve` and `deny`
# decide on pending users only; `disable` and `enable` are idempotent (no change, no audit entry).
STATUS_ACTIONS = {
    "approve": (frozenset({UserStatus.PENDING}), UserStatus.ACTIVE),
    "deny": (frozenset({UserStatus.PENDING}), UserStatus.DISABLED),
    "disable": (frozenset(UserStatus.ALL), UserStatus.DISABLED),
    "enable": (frozenset({UserStatus.DISABLED, UserStatus.ACTIVE}), UserStatus.ACTIVE),
}


@dataclass(frozen=True)
class UserState:
    id: int
    name: str
    status: str
    hub_admin: bool
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    in_hub: bool

    @classmethod
    def from_row(cls, row: User) -> UserState:
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            hub_admin=row.hub_admin,
            groups=tuple(sorted(row.hub_groups or ())),
            roles=tuple(sorted(row.hub_roles or ())),
            in_hub=row.in_hub,
        )


def user_model(row: User) -> dict:
    return {
        "name": row.name,
        "status": row.status,
        "hub_admin": row.hub_admin,
        "groups": sorted(row.hub_groups or ()),
        "roles": sorted(row.hub_roles or ()),
        "in_hub": row.in_hub,
        "created_at": row.created_at.isoformat() + "Z",
        "last_seen": row.last_seen.isoformat() + "Z" if row.last_seen else None,
    }


class UserDirectory:
    def __init__(
        self,
        db: Database,
        *,
        cache_seconds: float = 10.0,
        new_user_status: str = UserStatus.ACTIVE,
        blocked_group: str = "inference-blocked",
    ):
        self.blocked_group = blocked_group  # members are refused as if the Hub had deleted them
        self.db = db
        self.cache_seconds = cache_seconds
        self.new_user_status = new_user_status
        self._by_id: dict[int, tuple[float, UserState]] = {}
        self._by_name: dict[str, tuple[float, UserState]] = {}
        self._last_seen: dict[int, dt.datetime] = {}
        self.on_change: list = []  # callbacks(UserState) run when a state changes here

    # -- cache --------------------------------------------------------------------------------------

    def _remember(self, state: UserState) -> UserState:
        now = time.monotonic()
        old = self._by_id.get(state.id)
        self._by_id[state.id] = (now, state)
        self._by_name[state.name] = (now, state)
        if old is not None and old[1] != state:
            for callback in self.on_change:
                callback(state)
        return state

    def _fresh(self, entry: tuple[float, UserState] | None) -> UserState | None:
        if entry is not None and time.monotonic() - entry[0] < self.cache_seconds:
            return entry[1]
        return None

    def note_seen(self, user_id: int) -> None:
        self._last_seen[user_id] = utcnow()

    # -- look-ups -----------------------------------------------------------------------------------

    async def by_id(self, user_id: int) -> UserState | None:
        state = self._fresh(self._by_id.get(user_id))
        if state is None:
            state = await self.db.run(self._load_id, user_id)
            if state is not None:
                self._remember(state)
        return state

    @staticmethod
    def _load_id(session: Session, user_id: int) -> UserState | None:
        row = session.get(User, user_id)
        return UserState.from_row(row) if row else None

    async def by_name(self, name: str) -> UserState:
        state = self._fresh(self._by_name.get(name))
        if state is None:
            state = await self.db.run(self._load_name, name)
            self._remember(state)
        return state

    @staticmethod
    def _load_name(session: Session, name: str) -> UserState:
        row = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"No such user: {name}")
        return UserState.from_row(row)

    async def seen_from_hub(self, hub_user: dict) -> UserState:
        """The state of a user the Hub just vouched for; a row on first sight, refreshed when it changed."""
        name = hub_user["name"]
        groups = tuple(sorted(hub_user.get("groups") or ()))
        admin = bool(hub_user.get("admin"))
        state = self._fresh(self._by_name.get(name))
        if state is not None and state.groups == groups and state.hub_admin == admin:
            return state
        roles = hub_user.get("roles")
        state = await self.db.run(self._upsert, name, admin, groups, tuple(roles) if roles is not None else None)
        return self._remember(state)

    def _upsert(
        self, session: Session, name: str, admin: bool, groups: tuple, roles: tuple | None
    ) -> UserState:
        row = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if row is None:
            row = User(name=name, status=self.new_user_status, hub_groups=list(groups), hub_roles=list(roles or ()))
            session.add(row)
            log.info("new user %s (%s)", name, self.new_user_status)
        row.hub_admin = admin
        row.hub_groups = list(groups)
        if roles is not None:
            row.hub_roles = list(roles)
        # The Hub vouched for this user just now, so they exist; membership of the blocked group still counts.
        row.in_hub = self.blocked_group not in groups
        session.flush()
        return UserState.from_row(row)

    # -- changes ------------------------------------------------------------------------------------

    async def set_status(self, name: str, status: str) -> UserState:
        if status not in UserStatus.ALL:
            raise BadRequest(f"Unknown status {status!r}; one of {', '.join(UserStatus.ALL)}.", param="status")
        state = await self.db.run(self._set_status, name, status)
        return self._remember(state)

    @staticmethod
    def _set_status(session: Session, name: str, status: str) -> UserState:
        row = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"No such user: {name}")
        row.status = status
        session.flush()
        return UserState.from_row(row)

    async def apply_action(self, name: str, action: str, *, audit: dict) -> UserState:
        """An admin's `approve|deny|disable|enable`, audited in the same transaction (one entry per change).

        The cache is updated before returning, so every credential of the user (keys included) sees the new
        status on its very next request in this process; other replicas within `cache_seconds`.
        """
        if action not in STATUS_ACTIONS:
            raise NotFound(f"No such action: {action}")
        state = await self.db.run(self._apply_action, name, action, audit)
        return self._remember(state)

    @staticmethod
    def _apply_action(session: Session, name: str, action: str, audit: dict) -> UserState:
        row = session.execute(select(User).where(User.name == name).with_for_update()).scalar_one_or_none()
        if row is None:
            raise NotFound(f"No such user: {name}")
        sources, target = STATUS_ACTIONS[action]
        if row.status not in sources:
            raise Conflict(f"Cannot {action} user {name}: their status is {row.status}.")
        if row.status != target:
            AuditLog.add(session, action=f"user.{action}", details={"from": row.status, "to": target}, **audit)
            row.status = target
            session.flush()
        return UserState.from_row(row)

    async def list(self) -> list[dict]:
        return await self.db.run(self._list)

    @staticmethod
    def _list(session: Session) -> list[dict]:
        return [user_model(row) for row in session.execute(select(User).order_by(User.name)).scalars()]

    async def get_model(self, name: str) -> dict | None:
        return await self.db.run(self._get_model, name)

    @staticmethod
    def _get_model(session: Session, name: str) -> dict | None:
        row = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
        return user_model(row) if row is not None else None

    async def get_or_create(self, name: str) -> UserState:
        """For admin tools that act on a user before their first request (a name the Hub knows)."""
        try:
            return await self.by_name(name)
        except NotFound:
            state = await self.db.run(self._upsert, name, False, (), None)
            return self._remember(state)

    # -- Hub sync -----------------------------------------------------------------------------------

    def apply_hub_listing(self, session: Session, hub_users: list[dict]) -> list[str]:
        """Bring every known user in line with a complete Hub listing; returns names whose state changed."""
        by_name = {u["name"]: u for u in hub_users}
        changed = []
        for row in session.execute(select(User)).scalars():
            hub = by_name.get(row.name)
            in_hub = hub is not None and self.blocked_group not in (hub.get("groups") or ())
            if hub is not None:
                groups = sorted(hub.get("groups") or ())
                roles = sorted(hub.get("roles") or ())
                if (row.hub_admin, sorted(row.hub_groups or ()), sorted(row.hub_roles or ())) != (
                    bool(hub.get("admin")), groups, roles,
                ):
                    row.hub_admin, row.hub_groups, row.hub_roles = bool(hub.get("admin")), groups, roles
                    changed.append(row.name)
            if row.in_hub != in_hub:
                row.in_hub = in_hub
                changed.append(row.name)
                log.warning("user %s %s in the Hub", row.name, "restored" if in_hub else "deleted or blocked")
        session.flush()
        return changed

    async def sync(self, hub_users: list[dict]) -> list[str]:
        changed = await self.db.run(self.apply_hub_listing, hub_users)
        if changed:
            self._by_id.clear()
            self._by_name.clear()
        return changed

    def flush_last_seen(self, session: Session) -> int:
        pending, self._last_seen = self._last_seen, {}
        if pending:
            session.execute(update(User), [{"id": uid, "last_seen": when} for uid, when in pending.items()])
        return len(pending)


# -- the Hub's user list --------------------------------------------------------------------------------


class HubUsers:
    """The Hub's REST API for users (with the service's token), for admin views of users not seen yet."""

    def __init__(self, api_url: str, token: str):
        self.api_url = api_url.rstrip("/")
        self.token = token

    async def list(self) -> list[dict]:
        return await fetch_hub_users(self.api_url, self.token)

    async def get(self, name: str) -> dict | None:
        """The Hub's model of `name`, or None when the Hub has no such user."""
        request = HTTPRequest(
            f"{self.api_url}/users/{quote(name, safe='')}",
            headers={"Authorization": f"token {self.token}"},
            request_timeout=20,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as e:
            if e.code == 404:
                return None
            raise
        return json.loads(response.body)

    async def group_exists(self, name: str) -> bool:
        request = HTTPRequest(
            f"{self.api_url}/groups/{quote(name, safe='')}",
            headers={"Authorization": f"token {self.token}"},
            request_timeout=20,
        )
        try:
            await AsyncHTTPClient().fetch(request)
        except HTTPClientError as e:
            if e.code == 404:
                return False
            raise
        return True


async def fetch_hub_users(api_url: str, token: str) -> list[dict]:
    """Every Hub user (all pages), or an exception: a partial listing must never mark users deleted."""
    client = AsyncHTTPClient()
    users: list[dict] = []
    offset = 0
    while True:
        request = HTTPRequest(
            f"{api_url.rstrip('/')}/users?offset={offset}&limit=200&include_stopped_servers=0",
            headers={"Authorization": f"token {token}", "Accept": "application/jupyterhub-pagination+json"},
            request_timeout=20,
        )
        response = await client.fetch(request)
        page = json.loads(response.body)
        items = page["items"] if isinstance(page, dict) else page
        users.extend(items)
        pagination = page.get("_pagination") if isinstance(page, dict) else None
        if not pagination or not pagination.get("next"):
            return users
        offset = pagination["next"]["offset"]

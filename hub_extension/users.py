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

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Enum, Float, Unicode, validate
from traitlets.config import LoggingConfigurable

from . import notify
from .api_keys import revoke_keys
from .audit import AuditLog
from .db import Database
from .errors import Conflict, NotFound, ServiceUnavailable
from .orm import Grant, Quota, UsageEvent, UsageRollup, User, UserStatus, utcnow

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


class UserDirectory(LoggingConfigurable):
    """Users as this service knows them, with a per-process cache of each user's state.

    The cache has a generation guard, like the key cache: a look-up that started before a change (a disable, a
    Hub sync) never writes its older answer back after the change.
    """

    cache_seconds = Float(
        5.0,
        help="""How long a user's state is cached per process. On PostgreSQL other replicas hear of a change at
        once (`notify.py`); this bounds it when they cannot.""",
    ).tag(config=True)

    new_user_status = Enum(
        list(UserStatus.ALL), UserStatus.ACTIVE, help="Status of a user seen for the first time: active or pending."
    ).tag(config=True)

    blocked_group = Unicode(
        "inference-blocked", help="Members of this Hub group are refused, as if deleted from the Hub."
    ).tag(config=True)

    sync_interval = Float(
        30.0,
        help="""Seconds between syncs with the Hub's user list. A user deleted or blocked in the Hub loses
        access, keys included, within this bound (plus one Hub round trip); a deleted user's keys are revoked.""",
    ).tag(config=True)

    @validate("cache_seconds", "sync_interval")
    def _validate_positive(self, proposal):
        if proposal.value < 0:
            raise ValueError(f"UserDirectory.{proposal.trait.name} must be >= 0")
        return proposal.value

    def __init__(self, db: Database | None = None, **kwargs):
        super().__init__(**kwargs)
        self.db = db
        self._by_id: dict[int, tuple[float, UserState]] = {}
        self._by_name: dict[str, tuple[float, UserState]] = {}
        self._generation = 0  # bumped on every change; a load that began under an older one is not cached
        self._last_seen: dict[int, dt.datetime] = {}
        # Called with each name the Hub deleted, once the change is committed (the quotas forget its limit and
        # spending).
        self.on_retired: list = []
        self._retired: list[str] = []  # names retired by a transaction not yet announced

    # -- cache --------------------------------------------------------------------------------------

    def _remember(self, state: UserState, generation: int | None = None) -> UserState:
        """Cache `state`, unless it was read under `generation` and something changed since."""
        if generation is not None and generation != self._generation:
            return state
        now = time.monotonic()
        self._by_id[state.id] = (now, state)
        self._by_name[state.name] = (now, state)
        return state

    def _changed(self) -> None:
        self._generation += 1

    def forget(self, user_id: int) -> None:
        """Drop one user's cached state (another replica changed it: `notify.py`)."""
        self._changed()
        entry = self._by_id.pop(user_id, None)
        if entry is not None:
            self._by_name.pop(entry[1].name, None)

    def forget_all(self) -> None:
        self._changed()
        self._by_id.clear()
        self._by_name.clear()

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
            generation = self._generation
            state = await self.db.run(self._load_id, user_id)
            if state is not None:
                self._remember(state, generation)
        return state

    @staticmethod
    def _load_id(session: Session, user_id: int) -> UserState | None:
        row = session.get(User, user_id)
        return UserState.from_row(row) if row else None

    async def by_name(self, name: str) -> UserState:
        state = self._fresh(self._by_name.get(name))
        if state is None:
            generation = self._generation
            state = self._remember(await self.db.run(self._load_name, name), generation)
        return state

    @staticmethod
    def _load_name(session: Session, name: str) -> UserState:
        row = _find(session, name)
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
        generation = self._generation
        state = await self.db.run(self._upsert, hub_user)
        self._announce_retired()
        return self._remember(state, generation)

    def _upsert(self, session: Session, hub_user: dict) -> UserState:
        name = hub_user["name"]
        roles = hub_user.get("roles")
        created = hub_user.get("created")
        row = _find(session, name)
        if row is not None and created and row.hub_created and row.hub_created != created:
            retire(session, row)  # the Hub deleted that person and someone new took the name
            self._retired.append(name)
            row = None
        if row is None:
            row = User(name=name, status=self.new_user_status, hub_groups=[], hub_roles=[])
            session.add(row)
            log.info("new user %s (%s)", name, self.new_user_status)
        row.hub_admin = bool(hub_user.get("admin"))
        row.hub_groups = sorted(hub_user.get("groups") or ())
        if roles is not None:
            row.hub_roles = sorted(roles)
        if created:
            row.hub_created = created
        # The Hub vouched for this user just now, so they exist; membership of the blocked group still counts.
        row.in_hub = self.blocked_group not in row.hub_groups
        session.flush()
        return UserState.from_row(row)

    def _announce_retired(self) -> None:
        names, self._retired = self._retired, []
        for name in names:
            for callback in self.on_retired:
                callback(name)

    # -- changes ------------------------------------------------------------------------------------

    async def apply_action(self, name: str, action: str, *, audit: dict) -> UserState:
        """An admin's `approve|deny|disable|enable`, audited in the same transaction (one entry per change).

        The cache is updated before returning, so every credential of the user (keys included) sees the new
        status on its very next request in this process; other replicas when notified (`notify.py`), at the latest
        within `cache_seconds`.
        """
        if action not in STATUS_ACTIONS:
            raise NotFound(f"No such action: {action}")
        self._changed()  # before the write: a look-up already in flight must not cache the old status after it
        state = await self.db.run(self._apply_action, name, action, audit)
        self._changed()
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
            notify.publish(session, "user", row.id)
        return UserState.from_row(row)

    async def list(self) -> list[dict]:
        return await self.db.run(self._list)

    @staticmethod
    def _list(session: Session) -> list[dict]:
        query = select(User).where(~User.name.contains("/")).order_by(User.name)  # not the retired rows
        return [user_model(row) for row in session.execute(query).scalars()]

    async def get_model(self, name: str) -> dict | None:
        return await self.db.run(self._get_model, name)

    @staticmethod
    def _get_model(session: Session, name: str) -> dict | None:
        row = _find(session, name)
        return user_model(row) if row is not None else None

    # -- Hub sync -----------------------------------------------------------------------------------

    def apply_hub_listing(self, session: Session, hub_users: list[dict]) -> tuple[list[str], list[str]]:
        """Bring every known user in line with a complete Hub listing.

        Returns (names whose state changed, hashes of keys revoked because their owner was deleted).
        """
        by_name = {u["name"]: u for u in hub_users}
        changed: list[str] = []
        revoked: list[str] = []
        for row in session.execute(select(User).where(~User.name.contains("/"))).scalars():
            hub = by_name.get(row.name)
            if hub is None and not by_name:
                log.warning("the Hub listed no users at all; not treating %s as deleted", row.name)
                continue
            created = hub.get("created") if hub is not None else None
            if hub is None or (created and row.hub_created and created != row.hub_created):
                changed.append(row.name)
                self._retired.append(row.name)
                revoked += retire(session, row)
                continue
            in_hub = self.blocked_group not in (hub.get("groups") or ())
            groups = sorted(hub.get("groups") or ())
            roles = sorted(hub.get("roles") or ())
            if (row.hub_admin, sorted(row.hub_groups or ()), sorted(row.hub_roles or ())) != (
                bool(hub.get("admin")), groups, roles,
            ):
                row.hub_admin, row.hub_groups, row.hub_roles = bool(hub.get("admin")), groups, roles
                changed.append(row.name)
                notify.publish(session, "user", row.id)
            if created and not row.hub_created:
                row.hub_created = created
            if row.in_hub != in_hub:
                row.in_hub = in_hub
                changed.append(row.name)
                notify.publish(session, "user", row.id)
                log.warning("user %s %s in the Hub", row.name, "restored" if in_hub else "blocked")
        session.flush()
        return changed, revoked

    async def sync(self, hub_users: list[dict]) -> tuple[list[str], list[str]]:
        self._changed()
        changed, revoked = await self.db.run(self.apply_hub_listing, hub_users)
        self._announce_retired()
        if changed:
            self._changed()
            self._by_id.clear()
            self._by_name.clear()
        return changed, revoked

    async def flush_last_seen(self) -> int:
        """Write the buffered `last_seen` times in one statement; the buffer is swapped here, on the loop."""
        pending, self._last_seen = self._last_seen, {}
        if pending:
            await self.db.run(_write_last_seen, pending)
        return len(pending)


def _write_last_seen(session: Session, pending: dict[int, dt.datetime]) -> None:
    session.execute(update(User), [{"id": uid, "last_seen": when} for uid, when in pending.items()])


def _find(session: Session, name: str) -> User | None:
    return session.execute(select(User).where(User.name == name)).scalar_one_or_none()


# -- the Hub's user list --------------------------------------------------------------------------------


class HubUsers:
    """The Hub's REST API for users (with the service's token): the Hub sync and admin views of users not seen yet.

    A Hub that cannot be reached or answers an error is a 503 for the caller (never a 500), and a user or group
    the Hub does not have is None / False.
    """

    def __init__(self, api_url: str, token: str):
        self.api_url = api_url.rstrip("/")
        self.token = token

    async def _get(self, path: str, *, missing_ok: bool = False) -> dict | list | None:
        request = HTTPRequest(
            f"{self.api_url}{path}",
            headers={"Authorization": f"token {self.token}", "Accept": "application/jupyterhub-pagination+json"},
            request_timeout=20,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as e:
            if e.code == 404 and missing_ok:
                return None
            raise ServiceUnavailable(f"The Hub answered {e.code}; try again shortly.", retry_after=5) from None
        except OSError as e:
            raise ServiceUnavailable(f"The Hub cannot be reached ({e}); try again shortly.", retry_after=5) from None
        return json.loads(response.body)

    async def list(self) -> list[dict]:
        """Every Hub user (all pages), or an exception: a partial listing must never retire users."""
        users: list[dict] = []
        offset = 0
        while True:
            page = await self._get(f"/users?offset={offset}&limit=200&include_stopped_servers=0")
            items = page["items"] if isinstance(page, dict) else page
            users.extend(items)
            pagination = page.get("_pagination") if isinstance(page, dict) else None
            if not pagination or not pagination.get("next"):
                return users
            offset = pagination["next"]["offset"]

    async def get(self, name: str) -> dict | None:
        """The Hub's model of `name`, or None when the Hub has no such user."""
        return await self._get(f"/users/{quote(name, safe='')}", missing_ok=True)

    async def group_exists(self, name: str) -> bool:
        return await self._get(f"/groups/{quote(name, safe='')}", missing_ok=True) is not None


def retire(session: Session, row: User, actor: str = "hub-sync") -> list[str]:
    """A user the Hub deleted (seen by the Hub sync, or told by the Hub's authenticator: `actor`): revoke their
    keys, drop their grants, quota, presets and collections (audited), and free the name.

    The row stays under a name the Hub can never give anyone ('/' is not allowed in Hub user names), and
    their usage moves to that name with it: admins still see what they used, and a person who later gets the
    same name starts with nothing of theirs (no history, no spending against their quota).
    Returns the revoked keys' hashes.
    """
    from .knowledge import KnowledgeBase
    from .presets import PresetStore

    audit = {"actor": actor, "subject": row.name, "client_ip": None}
    hashes, _ = revoke_keys(session, row.id, None, audit)
    removed = session.execute(
        delete(Grant).where(Grant.subject_kind == "user", Grant.subject == row.name)
    ).rowcount
    if removed:
        notify.publish(session, "grants")
    presets = PresetStore._delete(session, row.id, None, None)
    collections = len(KnowledgeBase._delete(session, row.id, None, None))
    quotas = session.execute(delete(Quota).where(Quota.subject_kind == "user", Quota.subject == row.name)).rowcount
    retired_name = f"{row.name[:200]}/deleted-{row.id}"
    for table in (UsageEvent, UsageRollup):
        session.execute(update(table).where(table.user == row.name).values(user=retired_name))
    AuditLog.add(session, action="user.deleted", details={
        "revoked_keys": len(hashes), "grants_removed": removed, "quota_removed": bool(quotas),
        "presets_removed": presets, "collections_removed": collections, "usage_kept_as": retired_name,
    }, **audit)
    log.warning("user %s was deleted in the Hub: %d key(s) revoked", row.name, len(hashes))
    row.name = retired_name
    row.in_hub = False
    session.flush()
    notify.publish(session, "user", row.id)
    notify.publish(session, "quotas")  # the name's limit and spending changed: every replica re-reads them
    return hashes

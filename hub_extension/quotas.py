"""Quotas: tokens per day and month and requests per minute, per user, Hub group and default; fair-share weights.

**Which limit applies.** Each limit (and the weight) is resolved on its own: the user's row in the `quotas` table,
else the most generous of their Hub groups' rows (a group grants an allowance: joining one never lowers
yours), else the database default row, else the `QuotaPolicy.default_*` settings. A null field says nothing at its
level; 0 means unlimited. Identities with no user (modes `none` and `static`) are never limited. A key, narrowed
or not, counts against its owner, and a request an admin makes as a user counts against that user.

**Enforcement, with no I/O on the request path.** `reserve` holds the request's worst case (max_tokens x choices
+ an estimate of the prompt) against the UTC day and the UTC calendar month, and one request against a sliding
minute; `Reservation.settle` replaces the hold with the real count, `release` gives it back (the request never
ran). Requests refused with 429, or released, do not count against the minute. A prompt is estimated at 4 characters a token
before it is tokenised, so one that tokenises longer can take a window past its limit by that difference.

**Several replicas.** What a replica counts as spent = the database (every replica's written usage: the hourly
rollups for the day and month, raw `usage_events` for the last minute, re-read every `sync_seconds`) + what it
settled itself and has not written yet + its open reservations (both updated at once, and moved to "written"
by `on_flushed` when the usage recorder commits them). What it cannot see are other replicas' open reservations
and their usage not yet written and re-read. So with R replicas a window's total can pass its limit by at most
(R - 1) x what one replica admits for that user during one such lag (the request's duration +
`UsageRecorder.flush_interval` + `sync_seconds`), and never by more than (R - 1) x the limit; one replica alone
never overshoots (beyond the prompt estimate above).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from traitlets import Float, Integer, validate
from traitlets.config import LoggingConfigurable

from . import notify
from .audit import AuditLog
from .db import Database
from .errors import BadRequest, Conflict, RateLimited
from .orm import Quota, UsageEvent, UsageRollup, utcnow
from .permissions import UNRESTRICTED_VIA

log = logging.getLogger("hub_extension.quotas")

LIMITS = ("tokens_per_day", "tokens_per_month", "requests_per_minute")
FIELDS = (*LIMITS, "weight")
SUBJECT_KINDS = ("user", "group", "default")
PRECEDENCE = "user > the most generous of the user's groups > default (database) > config; 0 is unlimited"
MAX_TOKENS_LIMIT = 10**12
MAX_REQUESTS_PER_MINUTE = 10**6
WEIGHT_RANGE = (0.01, 100.0)
CHARS_PER_TOKEN = 4  # the prompt estimate before tokenising (and for embeddings)
MINUTE = 60.0
BASE_REFRESH_SECONDS = 300.0  # how often the month's earlier days are re-read (they rarely change)


def estimate_tokens(prompts: Iterable[str | list[int]]) -> int:
    """Tokens in texts (or token id arrays) before tokenising: characters / 4, rounded up, per text."""
    return sum(len(p) if isinstance(p, list) else -(-len(p) // CHARS_PER_TOKEN) for p in prompts)


def _iso(posix: float) -> str:
    return dt.datetime.fromtimestamp(posix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _posix(naive_utc: dt.datetime) -> float:
    return naive_utc.replace(tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True)
class Windows:
    """The UTC day and calendar month `now` falls in, and when each ends."""

    day: str  # "2026-11-29", as usage_rollups.day
    month: str  # "2026-11"
    day_ends: float
    month_ends: float

    @classmethod
    def at(cls, now: float) -> Windows:
        t = dt.datetime.fromtimestamp(now, dt.UTC)
        midnight = t.replace(hour=0, minute=0, second=0, microsecond=0)
        first = midnight.replace(day=1)
        next_month = (first + dt.timedelta(days=32)).replace(day=1)
        return cls(t.strftime("%Y-%m-%d"), t.strftime("%Y-%m"),
                   (midnight + dt.timedelta(days=1)).timestamp(), next_month.timestamp())


def quota_model(row: Quota | None) -> dict:
    """One subject's limits as JSON (every field null when there is no row)."""
    out: dict[str, Any] = {f: getattr(row, f) if row is not None else None for f in FIELDS}
    out["updated_at"] = row.updated_at.isoformat() + "Z" if row is not None else None
    out["updated_by"] = row.updated_by if row is not None else None
    return out


@dataclass(frozen=True)
class QuotaSnapshot:
    """The quotas table in memory: user and group name -> row model, and the default row's model."""

    users: Mapping[str, dict] = field(default_factory=dict)
    groups: Mapping[str, dict] = field(default_factory=dict)
    default: dict = field(default_factory=lambda: quota_model(None))

    @classmethod
    def load(cls, session: Session) -> QuotaSnapshot:
        users: dict[str, dict] = {}
        groups: dict[str, dict] = {}
        default = quota_model(None)
        for row in session.execute(select(Quota)).scalars():
            if row.subject_kind == "default":
                default = quota_model(row)
            else:
                (users if row.subject_kind == "user" else groups)[row.subject] = quota_model(row)
        return cls(users, groups, default)

    def row(self, kind: str, subject: str) -> dict:
        if kind == "default":
            return self.default
        return (self.users if kind == "user" else self.groups).get(subject) or quota_model(None)


@dataclass
class _Read:
    """One read of the database for `sync`: limits, tokens per user today and earlier this month, the minute."""

    windows: Windows
    snapshot: QuotaSnapshot
    day: dict[str, int]
    month_base: dict[str, int] | None  # None: not re-read this time
    minute: dict[str, list[float]]  # user -> times of their counted requests in the last minute


def _read(session: Session, windows: Windows, cutoff: float, rate_users: list[str], with_base: bool) -> _Read:
    tokens = func.sum(UsageRollup.prompt_tokens + UsageRollup.completion_tokens)
    by_user = select(UsageRollup.user, tokens).group_by(UsageRollup.user)
    day = {u: int(t) for u, t in session.execute(by_user.where(UsageRollup.day == windows.day))}
    base = None
    if with_base:
        earlier = by_user.where(UsageRollup.month == windows.month, UsageRollup.day < windows.day)
        base = {u: int(t) for u, t in session.execute(earlier)}
    minute: dict[str, list[float]] = {}
    if rate_users:
        since = dt.datetime.fromtimestamp(cutoff, dt.UTC).replace(tzinfo=None)
        rows = session.execute(
            select(UsageEvent.user, UsageEvent.time).where(
                UsageEvent.time > since, UsageEvent.user.in_(rate_users), UsageEvent.model != "",
                UsageEvent.status != 429,
            )
        )
        for user, when in rows:
            minute.setdefault(user, []).append(_posix(when))
    return _Read(windows, QuotaSnapshot.load(session), day, base, minute)


def _counts_against_rate(event: dict) -> bool:
    """Whether a usage event is a request the minute window counts (as the database read does)."""
    return bool(event.get("model")) and event.get("status") != 429


class Reservation:
    """An admitted request's hold on its user's quota, until `settle` (it ran) or `release` (it never did)."""

    def __init__(self, policy: QuotaPolicy | None, user: str = "", day: str = "", tokens: int = 0,
                 admitted_at: float | None = None):
        self._policy = policy
        self.user, self.day, self.tokens, self.admitted_at = user, day, tokens, admitted_at

    def settle(self, tokens_used: int) -> None:
        """Replace the hold with what the request really used (prompt + completion tokens)."""
        if self._policy is not None:
            self._policy._end(self, tokens_used)
            self._policy = None

    def release(self) -> None:
        """Give the hold back: the request never ran."""
        if self._policy is not None:
            self._policy._end(self, None)
            self._policy = None


def _add(table: dict[str, Counter], user: str, day: str, tokens: int) -> None:
    """Add (or, negative, take) tokens to one user's day in `table`, dropping what reaches zero."""
    counter = table.setdefault(user, Counter())
    counter[day] += tokens
    if counter[day] <= 0:
        del counter[day]
    if not counter:
        del table[user]


class QuotaPolicy(LoggingConfigurable):
    """Resolves limits and weights for a user and admits requests against them, from memory (see the module)."""

    default_tokens_per_day = Integer(
        0, help="Tokens (prompt + completion) a user may use per UTC day when no quota row says otherwise; 0: no limit."
    ).tag(config=True)
    default_tokens_per_month = Integer(
        0, help="Tokens a user may use per UTC calendar month when no quota row says otherwise; 0: no limit."
    ).tag(config=True)
    default_requests_per_minute = Integer(
        0, help="Requests a user may make in any 60 seconds when no quota row says otherwise; 0: no limit."
    ).tag(config=True)
    default_weight = Float(
        1.0, help="A user's share of a contended model when no quota row sets a weight (fair share)."
    ).tag(config=True)
    sync_seconds = Float(
        1.0,
        help="""Seconds between reloads of the quotas table and of what every replica has spent. With several
        replicas, a limit can be passed by what the others admit within about this time (see `quotas.py`).""",
    ).tag(config=True)

    @validate("default_tokens_per_day", "default_tokens_per_month", "default_requests_per_minute")
    def _validate_limit(self, proposal):
        if proposal.value < 0:
            raise ValueError(f"QuotaPolicy.{proposal.trait.name} must be >= 0 (0: no limit)")
        return proposal.value

    @validate("default_weight")
    def _validate_weight(self, proposal):
        if not WEIGHT_RANGE[0] <= proposal.value <= WEIGHT_RANGE[1]:
            raise ValueError(f"QuotaPolicy.default_weight must be from {WEIGHT_RANGE[0]} to {WEIGHT_RANGE[1]}")
        return proposal.value

    @validate("sync_seconds")
    def _validate_sync(self, proposal):
        if proposal.value <= 0:
            raise ValueError("QuotaPolicy.sync_seconds must be > 0")
        return proposal.value

    def __init__(self, db: Database | None = None, clock: Callable[[], float] = time.time, **kwargs):
        super().__init__(**kwargs)
        self.db = db
        self.clock = clock  # POSIX seconds; tests move it instead of sleeping
        self.snapshot = QuotaSnapshot()
        self._tickets = itertools.count(1)
        self._applied = 0
        self._windows = Windows.at(clock())
        self._day: dict[str, int] = {}  # user -> tokens the database has for today
        self._month_base: dict[str, int] = {}  # user -> tokens the database has for this month before today
        self._base_read_at = -math.inf
        self._forgotten = 0  # bumped when spending moved away from a name: a read that began before is not applied
        self._unflushed: dict[str, Counter] = {}  # user -> day -> tokens settled here, not yet written
        self._reserved: dict[str, Counter] = {}  # user -> day -> tokens held by open reservations
        self._flushed_during_read: dict[str, Counter] | None = None
        self._admitted: dict[str, deque] = {}  # user -> times this replica admitted their requests (last minute)
        self._own_written: dict[str, deque] = {}  # user -> times of our requests written (to tell others' apart)
        self._others: dict[str, list[float]] = {}  # user -> other replicas' request times in the last minute
        self._rate_users: dict[str, float] = {}  # users with a minute limit seen here -> when

    # -- limits ------------------------------------------------------------------------------------------

    def resolve(self, who, name: str) -> tuple[Any, str]:
        """One limit (or the weight) for `who` and where it came from: "user", "group:<name>", "default" or
        "config". Among groups the most generous wins (0, unlimited, beats any number)."""
        snap = self.snapshot
        own = snap.users.get(who.name)
        if own is not None and own[name] is not None:
            return own[name], "user"
        found = [(snap.groups[g][name], g) for g in who.groups if g in snap.groups and snap.groups[g][name] is not None]
        if found:
            value, group = max(found, key=lambda vg: (vg[0] == 0 and name != "weight", vg[0]))
            return value, f"group:{group}"
        if snap.default[name] is not None:
            return snap.default[name], "default"
        return getattr(self, f"default_{name}"), "config"

    def weight(self, identity) -> float:
        """The caller's share when a model's queue is contended (fair share)."""
        if getattr(identity, "via", None) in UNRESTRICTED_VIA:
            return self.default_weight
        return float(self.resolve(identity, "weight")[0])

    # -- admission (hot path: memory only) ------------------------------------------------------------------

    def reserve(self, identity, tokens: int) -> Reservation:
        """Admit a request that may use up to `tokens`, or raise RateLimited (429 with Retry-After)."""
        if getattr(identity, "via", None) in UNRESTRICTED_VIA:
            return Reservation(None)
        now = self.clock()
        windows = self._roll(now)
        user = identity.name
        rpm, source = self.resolve(identity, "requests_per_minute")
        if rpm:
            self._rate_users[user] = now
            recent = self._recent(user, now)
            if len(recent) >= rpm:
                retry = recent[len(recent) - rpm] + MINUTE - now
                raise RateLimited(
                    f"Rate limit reached for {user}: {rpm} requests per minute ({source}). "
                    f"Retry in {math.ceil(retry)} s.",
                    retry_after=retry,
                    code="rate_limit_exceeded",
                )
        for name, ends in (("tokens_per_day", windows.day_ends), ("tokens_per_month", windows.month_ends)):
            limit, source = self.resolve(identity, name)
            if not limit:
                continue
            spent, held = self._spent(user, name, windows)
            if spent + held + tokens > limit:
                # Only the requests in flight stand in the way: they may settle for less, so retry soon.
                retry = 1.0 if spent + tokens <= limit else ends - now
                raise RateLimited(
                    f"Quota exceeded for {user}: this request may use up to {tokens} tokens (max_tokens x choices "
                    f"+ the prompt), and {max(0, limit - spent - held)} of the {name} limit of {limit} ({source}) "
                    f"remain{' with the requests in flight' if held else ''}. Lower max_tokens, or retry after "
                    f"{_iso(now + retry)}.",
                    retry_after=retry,
                    type="insufficient_quota",
                    code="insufficient_quota",
                )
        _add(self._reserved, user, windows.day, tokens)
        if rpm:
            self._admitted.setdefault(user, deque()).append(now)
        return Reservation(self, user, windows.day, tokens, now if rpm else None)

    def _end(self, reservation: Reservation, tokens_used: int | None) -> None:
        user, day = reservation.user, reservation.day
        _add(self._reserved, user, day, -reservation.tokens)
        if tokens_used is not None:
            _add(self._unflushed, user, day, tokens_used)
        elif reservation.admitted_at is not None:  # never ran: not a request against the minute either
            admitted = self._admitted.get(user)
            if admitted and reservation.admitted_at in admitted:
                admitted.remove(reservation.admitted_at)

    def _spent(self, user: str, name: str, windows: Windows) -> tuple[int, int]:
        """(tokens spent, tokens held by open reservations) by `user` in the day or month window."""
        spent = self._day.get(user, 0)
        unflushed, reserved = self._unflushed.get(user, {}), self._reserved.get(user, {})
        if name == "tokens_per_day":
            return spent + unflushed.get(windows.day, 0), reserved.get(windows.day, 0)
        in_month = windows.month
        spent += self._month_base.get(user, 0) + sum(t for d, t in unflushed.items() if d.startswith(in_month))
        return spent, sum(t for d, t in reserved.items() if d.startswith(in_month))

    def _recent(self, user: str, now: float) -> list[float]:
        """Times of `user`'s requests in the last minute, oldest first: ours and other replicas'."""
        admitted = self._admitted.get(user)
        while admitted and admitted[0] <= now - MINUTE:
            admitted.popleft()
        others = [t for t in self._others.get(user, ()) if t > now - MINUTE]
        return sorted([*(admitted or ()), *others])

    def _roll(self, now: float) -> Windows:
        """The current windows; at midnight today's database count joins the month's earlier days."""
        windows = self._windows
        if now < windows.day_ends:
            return windows
        new = self._windows = Windows.at(now)
        if new.month == windows.month:
            for user, tokens in self._day.items():
                self._month_base[user] = self._month_base.get(user, 0) + tokens
        else:
            self._month_base = {}
        self._day = {}
        self._base_read_at = -math.inf
        for table in (self._unflushed, self._reserved):
            for user, counter in list(table.items()):
                for day in [d for d in counter if not d.startswith(new.month)]:
                    _add(table, user, day, -counter[day])
        return new

    # -- what every replica spent ------------------------------------------------------------------------------

    def on_flushed(self, events: list[dict]) -> None:
        """The usage recorder committed `events`: what they used moves from "settled here" to "in the database"."""
        windows = self._roll(self.clock())
        for event in events:
            user = event.get("user")
            if not user or event.get("credential") in UNRESTRICTED_VIA:
                continue
            tokens = event.get("prompt_tokens", 0) + event.get("completion_tokens", 0)
            day = Windows.at(event["time"]).day
            _add(self._unflushed, user, day, -min(tokens, self._unflushed.get(user, {}).get(day, 0)))
            if self._flushed_during_read is not None:
                self._flushed_during_read.setdefault(user, Counter())[day] += tokens
            if day == windows.day:
                self._day[user] = self._day.get(user, 0) + tokens
            elif day.startswith(windows.month):
                self._month_base[user] = self._month_base.get(user, 0) + tokens
            if user in self._rate_users and _counts_against_rate(event):
                self._own_written.setdefault(user, deque()).append(event["time"])

    def load(self) -> None:
        """Read limits and spending now (blocking: at start, or from the CLI)."""
        if self.db is not None:
            now, ticket, forgotten = self.clock(), next(self._tickets), self._forgotten
            self._apply(now, ticket, self.db.call(_read, *self._read_args(now)), forgotten)

    async def sync(self) -> None:
        """Re-read limits and what every replica spent (off the event loop); run every `sync_seconds`."""
        if self.db is not None:
            now, ticket, forgotten = self.clock(), next(self._tickets), self._forgotten
            self._flushed_during_read = {}  # flushes committed from now on may be missing from this read
            try:
                read = await self.db.run(_read, *self._read_args(now))
                self._apply(now, ticket, read, forgotten)
            finally:
                self._flushed_during_read = None

    def _read_args(self, now: float) -> tuple:
        windows = self._roll(now)
        for user in [u for u, seen in self._rate_users.items() if seen < now - 2 * MINUTE]:
            del self._rate_users[user]
        with_base = now - self._base_read_at > BASE_REFRESH_SECONDS
        return windows, now - MINUTE, sorted(self._rate_users), with_base

    def _apply(self, now: float, ticket: int, read: _Read, forgotten: int) -> None:
        self._apply_snapshot(ticket, read.snapshot)
        if read.windows != self._windows or forgotten != self._forgotten:
            return  # the day changed, or spending moved, during the read: the next sync reads it anew
        late = self._flushed_during_read or {}
        day = read.windows.day
        self._day = {u: read.day.get(u, 0) + late.get(u, {}).get(day, 0) for u in read.day.keys() | late.keys()}
        if read.month_base is not None:
            self._month_base, self._base_read_at = read.month_base, now
        for user in self._others.keys() | read.minute.keys() | self._own_written.keys():
            own = self._own_written.get(user, deque())
            while own and own[0] <= now - MINUTE:
                own.popleft()
            if not own:
                self._own_written.pop(user, None)
            mine = Counter(round(t, 3) for t in own)
            others = []
            for t in read.minute.get(user, ()):
                if mine[round(t, 3)] > 0:
                    mine[round(t, 3)] -= 1
                else:
                    others.append(t)
            if others:
                self._others[user] = others
            else:
                self._others.pop(user, None)

    def _apply_snapshot(self, ticket: int, snapshot: QuotaSnapshot) -> None:
        if ticket > self._applied:  # an older read finishing late never replaces a newer one
            self._applied, self.snapshot = ticket, snapshot

    async def reload_limits(self) -> None:
        """Re-read the quotas table now (after a change made here: it applies at once; or on another replica:
        `notify.py`), and what was spent at the next sync: a user deleted in the Hub takes their spending along."""
        self._forget_base()
        ticket = next(self._tickets)
        self._apply_snapshot(ticket, await self.db.run(QuotaSnapshot.load))

    def forget_user(self, user: str) -> None:
        """`user` was deleted in the Hub; their own quota row is gone and their usage moved away from the name
        (`users.py`): whoever gets the name next starts from nothing, at once; the next sync re-reads the rest."""
        snap = self.snapshot
        others = {u: q for u, q in snap.users.items() if u != user}
        self._apply_snapshot(next(self._tickets), replace(snap, users=others))
        for table in (self._day, self._month_base, self._unflushed):
            table.pop(user, None)
        self._forget_base()

    def _forget_base(self) -> None:
        self._base_read_at = -math.inf
        self._forgotten += 1

    # -- what is left -----------------------------------------------------------------------------------------

    async def remaining(self, who) -> dict:
        """Limits, use, what is left and when each window resets, for `who` (an Identity or a UserState)."""
        now = self.clock()
        windows = self._roll(now)
        unrestricted = getattr(who, "via", None) in UNRESTRICTED_VIA
        out: dict[str, Any] = {"user": who.name, "precedence": PRECEDENCE, "limits": {}}
        for name, ends in (("tokens_per_day", windows.day_ends), ("tokens_per_month", windows.month_ends)):
            limit, source = (0, "unrestricted") if unrestricted else self.resolve(who, name)
            spent, held = (0, 0) if unrestricted else self._spent(who.name, name, windows)
            out["limits"][name] = self._window_model(limit, spent, held, _iso(ends), source)
        limit, source = (0, "unrestricted") if unrestricted else self.resolve(who, "requests_per_minute")
        recent = [] if unrestricted else self._recent(who.name, now)
        oldest_leaves = _iso(recent[0] + MINUTE) if recent else None  # when the count next drops
        out["limits"]["requests_per_minute"] = self._window_model(limit, len(recent), 0, oldest_leaves, source)
        weight, source = (self.default_weight, "unrestricted") if unrestricted else self.resolve(who, "weight")
        out["weight"] = {"value": weight, "source": source}
        return out

    @staticmethod
    def _window_model(limit: int, used: int, held: int, resets_at: str | None, source: str) -> dict:
        return {
            "limit": limit or None,  # null: unlimited
            "used": used,
            "reserved": held,
            "remaining": max(0, limit - used - held) if limit else None,
            "resets_at": resets_at,
            "source": source,
        }

    # -- changing quotas (admins) ---------------------------------------------------------------------------

    def quota(self, kind: str, subject: str) -> dict:
        """One user's, group's or the default's row (every field null when none), from the snapshot."""
        return {"subject_kind": kind, "subject": subject, **self.snapshot.row(kind, subject)}

    @staticmethod
    def parse_quota(body: Any) -> dict[str, Any]:
        """A quota body (`{"tokens_per_day": int|null, ...}`) with every field; 400 for anything off."""
        if not isinstance(body, dict):
            raise BadRequest(f"A quota must be a JSON object with some of: {', '.join(FIELDS)}.")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(unknown)}; use {', '.join(FIELDS)}.", param=unknown[0])
        out = {name: body.get(name) for name in FIELDS}
        bounds = {"tokens_per_day": MAX_TOKENS_LIMIT, "tokens_per_month": MAX_TOKENS_LIMIT,
                  "requests_per_minute": MAX_REQUESTS_PER_MINUTE}
        for name, top in bounds.items():
            value = out[name]
            if value is not None and (type(value) is not int or not 0 <= value <= top):
                raise BadRequest(f"'{name}' must be an integer from 0 (no limit) to {top}, or null.", param=name)
        weight = out["weight"]
        if weight is not None:
            low, high = WEIGHT_RANGE
            if type(weight) not in (int, float) or not low <= weight <= high:
                raise BadRequest(f"'weight' must be a number from {low} to {high}, or null.", param="weight")
            out["weight"] = float(weight)
        return out

    async def set_quota(self, kind: str, subject: str, values: Mapping[str, Any], *, audit: dict) -> dict:
        """Replace one subject's row (fields missing from `values` become null) in one transaction with its audit
        entry; this process sees it at once. A row left with every field null is deleted (DELETE sends `{}`).
        No audit entry when nothing changed."""
        if kind not in SUBJECT_KINDS:
            raise ValueError(kind)
        try:
            await self.db.run(self._set_quota, kind, subject, dict(values), audit)
        except IntegrityError:
            raise Conflict("The quota changed concurrently; try again.") from None
        await self.reload_limits()
        return self.quota(kind, subject)

    @staticmethod
    def _set_quota(session: Session, kind: str, subject: str, values: dict, audit: dict) -> None:
        query = select(Quota).where(Quota.subject_kind == kind, Quota.subject == subject).with_for_update()
        row = session.execute(query).scalar_one_or_none()
        old = {f: getattr(row, f) if row is not None else None for f in FIELDS}
        new = {f: values.get(f) for f in FIELDS}
        diff = {f: {"from": old[f], "to": new[f]} for f in FIELDS if old[f] != new[f]}
        if not diff:
            return
        deleting = all(v is None for v in new.values())
        if deleting:
            session.delete(row)
        else:
            if row is None:
                row = Quota(subject_kind=kind, subject=subject)
                session.add(row)
            for name, value in new.items():
                setattr(row, name, value)
            row.updated_at, row.updated_by = utcnow(), audit["actor"]
        action = "quota.delete" if deleting else "quota.set"
        AuditLog.add(session, action=action, details={"subject_kind": kind, "changes": diff}, **audit)
        notify.publish(session, "quotas")

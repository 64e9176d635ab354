"""Issuing, listing, revoking and checking the API keys users hold.

Checking a key is the hot path: format and checksum first (no database), then one SHA-256 and a dict
look-up; only a cache miss costs one indexed query, off the event loop. A revocation in this process clears
the cache entry before it returns; other processes hear of it at once (`notify.py`), or at the latest when their
entry ages out (`cache_seconds`).
`last_used` is kept in memory and written in one batch per flush, never per request.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session
from traitlets import Float, Integer, validate
from traitlets.config import LoggingConfigurable

from . import key_format, notify
from .audit import AuditLog
from .db import Database
from .errors import BadRequest, Conflict, NotFound, Unauthorized
from .orm import ApiKey, User, utcnow
from .scopes import FEATURES

log = logging.getLogger("hub_extension.keys")


@dataclass(frozen=True)
class KeyRecord:
    """What the cache keeps about one key: enough to authorise a request without the database."""

    id: int
    user_id: int
    name: str
    expires: float | None  # POSIX time: the hot path compares floats, not datetimes
    revoked: bool
    features: tuple[str, ...] | None
    models: tuple[str, ...] | None

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


_UNKNOWN = None  # a well-formed key we never issued (negative cache entry)
MAX_NAME_LENGTH = 128  # a key's name, and each model name a key is narrowed to
MAX_KEY_MODELS = 64  # model names one key may be narrowed to
KEEP_ENDED_KEYS = 100  # revoked or expired keys kept per user (for their lists); older ones are pruned


def key_model(row: ApiKey) -> dict:
    """The JSON shape of a key in lists: never the secret, only its display prefix."""
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": _iso(row.created_at),
        "expires_at": _iso(row.expires_at),
        "last_used": _iso(row.last_used),
        "revoked_at": _iso(row.revoked_at),
        "features": row.features,
        "models": row.models,
        "created_by": row.created_by,
    }


def _naive_utc(posix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(posix, dt.UTC).replace(tzinfo=None)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


class KeyManager(LoggingConfigurable):
    """Issues, lists, revokes and checks keys; the check is cached in process."""

    default_lifetime_days = Integer(90, help="Lifetime of a new key when the request names none.").tag(config=True)
    max_lifetime_days = Integer(
        365, help="Longest lifetime a key may have; 0 allows keys that never expire."
    ).tag(config=True)
    max_keys_per_user = Integer(
        25, help="Most live (unrevoked, unexpired) keys one user may hold; 0: no limit."
    ).tag(config=True)
    cache_seconds = Float(
        10.0,
        help="""How long a checked key is cached in memory. A revocation in this process is immediate; other
        replicas on PostgreSQL hear of it at once (`notify.py`), and honour it within this time in any case.""",
    ).tag(config=True)

    @validate("default_lifetime_days", "max_lifetime_days", "max_keys_per_user", "cache_seconds")
    def _validate_not_negative(self, proposal):
        if proposal.value < 0:
            raise ValueError(f"KeyManager.{proposal.trait.name} must be >= 0")
        return proposal.value

    def __init__(self, db: Database | None = None, *, known_features=frozenset(FEATURES), cache_size=100_000, **kw):
        super().__init__(**kw)
        self.db = db
        self.known_features = frozenset(known_features)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._generation = 0  # bumped on every invalidation so an in-flight miss cannot re-cache a revoked key
        self._last_used: dict[int, float] = {}  # key id -> POSIX time, written in batches

    # -- checking (hot path) -----------------------------------------------------------------------

    async def check(self, secret: str) -> KeyRecord:
        """The live record for `secret`, or Unauthorized. No database access for malformed keys."""
        if not key_format.is_well_formed(secret):
            raise Unauthorized("Invalid API key.")
        hashed = key_format.hash_key(secret)
        now = time.monotonic()
        hit = self._cache.get(hashed)
        if hit is not None and now - hit[0] < self.cache_seconds:
            record = hit[1]
        else:
            generation = self._generation
            record = await self.db.run(self._find, hashed)
            if generation == self._generation:
                self._remember(hashed, record, now)
        if record is None or record.revoked:
            raise Unauthorized("Invalid API key.")
        wall = time.time()
        if record.expired(wall):
            raise Unauthorized("This API key has expired.")
        self._last_used[record.id] = wall
        return record

    @staticmethod
    def _find(session: Session, hashed: str) -> KeyRecord | None:
        row = session.execute(select(ApiKey).where(ApiKey.hashed == hashed)).scalar_one_or_none()
        if row is None:
            return _UNKNOWN
        return KeyRecord(
            id=row.id,
            user_id=row.user_id,
            name=row.name,
            expires=row.expires_at.replace(tzinfo=dt.UTC).timestamp() if row.expires_at else None,
            revoked=row.revoked_at is not None,
            features=tuple(row.features) if row.features is not None else None,
            models=tuple(row.models) if row.models is not None else None,
        )

    def _remember(self, hashed: str, record: KeyRecord | None, now: float) -> None:
        self._cache[hashed] = (now, record)
        self._cache.move_to_end(hashed)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def forget(self, hashes: list[str]) -> None:
        self._generation += 1
        for hashed in hashes:
            self._cache.pop(hashed, None)

    def forget_user(self, user_id: int) -> None:
        """Drop the cached keys of one user (another replica revoked some: `notify.py`)."""
        self._generation += 1
        for hashed in [h for h, (_, record) in self._cache.items() if record is not None and record.user_id == user_id]:
            self._cache.pop(hashed, None)

    def forget_all(self) -> None:
        """Drop every cached key (used when a user's state changes in a way keys must see at once)."""
        self._generation += 1
        self._cache.clear()

    # -- last_used, batched -----------------------------------------------------------------------

    async def flush(self) -> int:
        """Write the buffered `last_used` times in one statement; the buffer is swapped here, on the loop."""
        pending, self._last_used = self._last_used, {}
        if pending:
            await self.db.run(_write_last_used, pending)
        return len(pending)

    # -- management ---------------------------------------------------------------------------------

    def validate_request(self, body: dict) -> dict:
        """Clean a create-key request body into keyword arguments for `create`; 400 on anything off."""
        allowed = {"name", "expires_in_days", "features", "models"}
        unknown = set(body) - allowed
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.", param=sorted(unknown)[0])
        name = body.get("name", "")
        if (
            not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH
            or not name.isprintable()
        ):
            raise BadRequest(
                f"'name' must be a non-empty printable string of at most {MAX_NAME_LENGTH} characters.", param="name"
            )
        days = body.get("expires_in_days", self.default_lifetime_days or None)
        if days is not None and (isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500):
            raise BadRequest(
                "'expires_in_days' must be an integer from 1 to 36500, or null.", param="expires_in_days"
            )
        if self.max_lifetime_days:
            if days is None:
                raise BadRequest(
                    f"Keys must expire: at most {self.max_lifetime_days} days.", param="expires_in_days"
                )
            if days > self.max_lifetime_days:
                raise BadRequest(
                    f"'expires_in_days' may be at most {self.max_lifetime_days}.", param="expires_in_days"
                )
        features = _string_list(body.get("features"), "features", len(self.known_features))
        if features is not None:
            bad = sorted(set(features) - self.known_features)
            if bad:
                raise BadRequest(f"Unknown feature(s): {', '.join(bad)}.", param="features")
        models = _string_list(body.get("models"), "models", MAX_KEY_MODELS)
        return {"name": name.strip(), "expires_in_days": days, "features": features, "models": models}

    def _create(
        self,
        session: Session,
        user_id: int,
        *,
        name: str,
        expires_in_days: int | None,
        features: list[str] | None,
        models: list[str] | None,
        created_by: str | None,
        audit: dict | None,
    ) -> tuple[str, dict]:
        # Take the user's row lock first so concurrent creations cannot overshoot the limit.
        session.execute(update(User).where(User.id == user_id).values(name=User.name))
        now = utcnow()
        live = session.execute(
            select(func.count(ApiKey.id)).where(
                ApiKey.user_id == user_id,
                ApiKey.revoked_at.is_(None),
                (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
            )
        ).scalar_one()
        if self.max_keys_per_user and live >= self.max_keys_per_user:
            raise Conflict(f"You already have {live} live keys, the most allowed; revoke one first.")
        _prune_ended_keys(session, user_id, now)
        secret = key_format.generate()
        row = ApiKey(
            user_id=user_id,
            name=name,
            hashed=key_format.hash_key(secret),
            prefix=key_format.display_prefix(secret),
            created_at=now,
            expires_at=now + dt.timedelta(days=expires_in_days) if expires_in_days else None,
            features=features,
            models=models,
            created_by=created_by,
        )
        session.add(row)
        session.flush()
        model = key_model(row)
        if audit is not None:
            details = {k: model[k] for k in ("id", "name", "prefix", "expires_at", "features", "models")}
            AuditLog.add(session, action="key.create", details=details, **audit)
        return secret, model

    async def create(
        self, user_id: int, *, created_by: str | None = None, audit: dict | None = None, **fields
    ) -> tuple[str, dict]:
        """Issue a key; returns (secret, model). The secret exists only in this return value.

        `audit` (actor, subject, client_ip, acting_as) records the creation in the same transaction.
        """
        return await self.db.run(self._create, user_id, created_by=created_by, audit=audit, **fields)

    @staticmethod
    def _list(session: Session, user_id: int, include_revoked: bool) -> list[dict]:
        query = select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return [key_model(row) for row in session.execute(query).scalars()]

    async def list(self, user_id: int, include_revoked: bool = False) -> list[dict]:
        return await self.db.run(self._list, user_id, include_revoked)

    async def revoke(self, user_id: int, key_id: int | None = None, *, audit: dict | None = None) -> list[dict]:
        """Revoke one key (or all of the user's with key_id=None); refused from the very next request."""
        try:
            hashes, models = await self.db.run(revoke_keys, user_id, key_id, audit)
        finally:
            # Even if the commit failed, dropping cache entries is harmless.
            self._generation += 1
        self.forget(hashes)
        return models


def _string_list(value, param: str, most: int) -> list[str] | None:
    """A narrowing list: null, or at most `most` distinct names of at most MAX_NAME_LENGTH characters."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > most
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_LENGTH for v in value)
    ):
        raise BadRequest(
            f"'{param}' must be null or a list of at most {most} names of 1 to {MAX_NAME_LENGTH} characters.",
            param=param,
        )
    return sorted(set(value))


def _write_last_used(session: Session, pending: dict[int, float]) -> None:
    session.execute(update(ApiKey), [{"id": key_id, "last_used": _naive_utc(when)} for key_id, when in pending.items()])


def _prune_ended_keys(session: Session, user_id: int, now: dt.datetime) -> None:
    """Keep a user's revoked and expired keys to KEEP_ENDED_KEYS rows (their story stays in the audit log), so
    creating and revoking keys in a loop cannot grow the database without bound."""
    ended = (ApiKey.user_id == user_id) & (ApiKey.revoked_at.is_not(None) | (ApiKey.expires_at <= now))
    keep = select(ApiKey.id).where(ended).order_by(ApiKey.id.desc()).limit(KEEP_ENDED_KEYS - 1)
    session.execute(delete(ApiKey).where(ended, ApiKey.id.not_in(keep)).execution_options(synchronize_session=False))


def revoke_keys(
    session: Session, user_id: int, key_id: int | None, audit: dict | None
) -> tuple[list[str], list[dict]]:
    """Revoke one of a user's keys, or all of them (key_id=None), audited; returns (hashes, key models)."""
    query = select(ApiKey).where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
    if key_id is not None:
        query = query.where(ApiKey.id == key_id)
    rows = list(session.execute(query).scalars())
    if key_id is not None and not rows:
        raise NotFound("No such key.")  # unknown, already revoked and someone else's answer the same
    now = utcnow()
    for row in rows:
        row.revoked_at = now
        if audit is not None:
            details = {"id": row.id, "name": row.name, "prefix": row.prefix}
            AuditLog.add(session, action="key.revoke", details=details, **audit)
    session.flush()
    if rows:
        notify.publish(session, "keys", user_id)
    return [row.hashed for row in rows], [key_model(row) for row in rows]

"""Issuing, listing, revoking and checking the API keys users hold.

Checking a key is the hot path: format and checksum first (no database), then one SHA-256 and a dict
look-up; only a cache miss costs one indexed query, off the event loop. A revocation in this process clears
the cache entry before it returns; other processes see it when their entry ages out (`cache_seconds`).
`last_used` is kept in memory and written in one batch per flush, never per request.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from . import key_format
from .audit import AuditLog
from .db import Database
from .errors import BadRequest, Conflict, NotFound, Unauthorized
from .orm import ApiKey, User, utcnow

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


class KeyManager:
    def __init__(
        self,
        db: Database,
        *,
        default_lifetime_days: int = 90,
        max_lifetime_days: int = 365,
        max_keys_per_user: int = 25,
        cache_seconds: float = 10.0,
        cache_size: int = 100_000,
        known_features: frozenset[str] = frozenset(),
    ):
        self.db = db
        self.default_lifetime_days = default_lifetime_days
        self.max_lifetime_days = max_lifetime_days
        self.max_keys_per_user = max_keys_per_user
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self.known_features = known_features
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

    def forget_all(self) -> None:
        """Drop every cached key (used when a user's state changes in a way keys must see at once)."""
        self._generation += 1
        self._cache.clear()

    # -- last_used, batched -----------------------------------------------------------------------

    def flush_last_used(self, session: Session) -> int:
        pending, self._last_used = self._last_used, {}
        if pending:
            session.execute(
                update(ApiKey),
                [{"id": key_id, "last_used": _naive_utc(when)} for key_id, when in pending.items()],
            )
        return len(pending)

    async def flush(self) -> int:
        return await self.db.run(self.flush_last_used)

    # -- management ---------------------------------------------------------------------------------

    def validate_request(self, body: dict) -> dict:
        """Clean a create-key request body into keyword arguments for `create`; 400 on anything off."""
        allowed = {"name", "expires_in_days", "features", "models"}
        unknown = set(body) - allowed
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.", param=sorted(unknown)[0])
        name = body.get("name", "")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise BadRequest("'name' must be a non-empty string of at most 255 characters.", param="name")
        days = body.get("expires_in_days", self.default_lifetime_days or None)
        if days is not None and (isinstance(days, bool) or not isinstance(days, int) or days < 1):
            raise BadRequest("'expires_in_days' must be a positive integer or null.", param="expires_in_days")
        if self.max_lifetime_days:
            if days is None:
                raise BadRequest(
                    f"Keys must expire: at most {self.max_lifetime_days} days.", param="expires_in_days"
                )
            if days > self.max_lifetime_days:
                raise BadRequest(
                    f"'expires_in_days' may be at most {self.max_lifetime_days}.", param="expires_in_days"
                )
        features = _string_list(body.get("features"), "features")
        if features is not None and self.known_features:
            bad = sorted(set(features) - self.known_features)
            if bad:
                raise BadRequest(f"Unknown feature(s): {', '.join(bad)}.", param="features")
        models = _string_list(body.get("models"), "models")
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
        secret = key_format.generate()
        row = ApiKey(
            user_id=user_id,
            name=name,
            hashed=key_format.hash_key(secret),
            prefix=key_format.display_prefix(secret),
            created_at=now,
            expires_at=now + dt.timedelta(days=expires_in_days) if expires_in_days else None,
            features=sorted(set(features)) if features is not None else None,
            models=sorted(set(models)) if models is not None else None,
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

    @staticmethod
    def _revoke(
        session: Session, user_id: int, key_id: int | None, audit: dict | None
    ) -> tuple[list[str], list[dict]]:
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
        return [row.hashed for row in rows], [key_model(row) for row in rows]

    async def revoke(self, user_id: int, key_id: int | None = None, *, audit: dict | None = None) -> list[dict]:
        """Revoke one key (or all of the user's with key_id=None); refused from the very next request."""
        try:
            hashes, models = await self.db.run(self._revoke, user_id, key_id, audit)
        finally:
            # Even if the commit failed, dropping cache entries is harmless.
            self._generation += 1
        self.forget(hashes)
        return models


def _string_list(value, param: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"'{param}' must be a list of strings or null.", param=param)
    return value

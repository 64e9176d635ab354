"""Keys and users as components (no Tornado), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from hub_extension import key_format
from hub_extension.api_keys import KeyManager
from hub_extension.db import Database
from hub_extension.errors import BadRequest, Conflict, NotFound, Unauthorized
from hub_extension.orm import ApiKey, utcnow
from hub_extension.users import UserDirectory


@pytest.fixture
async def parts(db_url):
    db = Database(db_url)
    db.upgrade()
    users = UserDirectory(db, cache_seconds=60)
    keys = KeyManager(db, max_keys_per_user=5, cache_seconds=60, known_features=frozenset({"chat", "keys"}))
    yield db, users, keys
    db.close()


def test_key_format():
    key = key_format.generate()
    assert key.startswith("jhi_") and len(key) == key_format.KEY_LENGTH
    assert key_format.is_well_formed(key)
    assert len({key_format.generate() for _ in range(1000)}) == 1000
    # Every single-character typo breaks the checksum.
    body = key[len(key_format.PREFIX):]
    for i in range(len(body)):
        c = body[i]
        typo = key_format.PREFIX + body[:i] + ("a" if c != "a" else "b") + body[i + 1:]
        assert not key_format.is_well_formed(typo)
    assert not key_format.is_well_formed(key + "x") and not key_format.is_well_formed("jhi_" + "!" * 49)
    assert key_format.display_prefix(key) == key[:12]


async def test_create_check_revoke(parts):
    db, users, keys = parts
    alice = await users.get_or_create("alice")
    secret, model = await keys.create(alice.id, **keys.validate_request({"name": "k1"}))
    assert "key" not in model and model["prefix"] == key_format.display_prefix(secret)
    stored = db.call(lambda s: s.query(ApiKey).one())
    assert stored.hashed == key_format.hash_key(secret) and secret not in repr(stored.__dict__)
    record = await keys.check(secret)
    assert record.user_id == alice.id
    # A cache hit costs no statement.
    before = db.statements
    for _ in range(50):
        await keys.check(secret)
    assert db.statements == before
    await keys.revoke(alice.id, model["id"])
    with pytest.raises(Unauthorized):
        await keys.check(secret)


async def test_unknown_and_malformed_keys(parts):
    db, users, keys = parts
    before = db.statements
    for bad in ("", "jhi_", "sk-foo", key_format.generate()[:-1] + "0"):
        with pytest.raises(Unauthorized):
            await keys.check(bad)
    assert db.statements == before  # no database read for anything malformed
    with pytest.raises(Unauthorized):
        await keys.check(key_format.generate())  # well formed, never issued: one look-up


async def test_revoking_someone_elses_key_is_not_found(parts):
    _, users, keys = parts
    alice, bob = await users.get_or_create("alice"), await users.get_or_create("bob")
    _, model = await keys.create(alice.id, **keys.validate_request({"name": "k"}))
    with pytest.raises(NotFound):
        await keys.revoke(bob.id, model["id"])
    with pytest.raises(NotFound):
        await keys.revoke(alice.id, 10**9)


async def test_expiry_and_validation(parts):
    db, users, keys = parts
    alice = await users.get_or_create("alice")
    secret, model = await keys.create(alice.id, **keys.validate_request({"name": "k", "expires_in_days": 1}))
    expires = dt.datetime.fromisoformat(model["expires_at"].rstrip("Z"))
    assert dt.timedelta(hours=23) < expires - utcnow() <= dt.timedelta(days=1)
    db.call(lambda s: s.query(ApiKey).update({ApiKey.expires_at: utcnow() - dt.timedelta(seconds=1)}))
    keys.forget_all()
    with pytest.raises(Unauthorized, match="expired"):
        await keys.check(secret)
    for body in ({"name": "k", "features": ["nope"]}, {"name": "k", "expires_in_days": 400}, {"name": " "}):
        with pytest.raises(BadRequest):
            keys.validate_request(body)


async def test_live_key_limit_holds_under_concurrency(parts):
    _, users, keys = parts
    alice = await users.get_or_create("alice")
    fields = keys.validate_request({"name": "k"})
    results = await asyncio.gather(*(keys.create(alice.id, **fields) for _ in range(12)), return_exceptions=True)
    made = [r for r in results if not isinstance(r, Exception)]
    assert len(made) == 5
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, Exception))


async def test_last_used_is_batched(parts):
    db, users, keys = parts
    alice = await users.get_or_create("alice")
    secret, model = await keys.create(alice.id, **keys.validate_request({"name": "k"}))
    await keys.check(secret)
    before = db.statements
    for _ in range(100):
        await keys.check(secret)
    assert db.statements == before  # no write per request
    assert await keys.flush() == 1
    listed = await keys.list(alice.id)
    assert listed[0]["last_used"] is not None


async def test_status_is_seen_at_once(parts):
    _, users, keys = parts
    alice = await users.get_or_create("alice")
    await users.set_status("alice", "disabled")
    assert (await users.by_id(alice.id)).status == "disabled"
    with pytest.raises(BadRequest):
        await users.set_status("alice", "sleeping")
    with pytest.raises(NotFound):
        await users.set_status("nobody", "active")


async def test_hub_sync_marks_deleted_and_blocked_users(parts):
    _, users, _ = parts
    for name in ("alice", "bob", "carol"):
        await users.seen_from_hub({"name": name, "admin": False, "groups": []})
    listing = [
        {"name": "alice", "admin": True, "groups": ["ml"], "roles": ["user"]},
        {"name": "carol", "admin": False, "groups": ["inference-blocked"], "roles": []},
    ]
    changed = await users.sync(listing)
    assert set(changed) >= {"alice", "bob", "carol"}
    by = {u["name"]: u for u in await users.list()}
    assert by["alice"]["hub_admin"] and by["alice"]["groups"] == ["ml"] and by["alice"]["in_hub"]
    assert not by["bob"]["in_hub"] and not by["carol"]["in_hub"]

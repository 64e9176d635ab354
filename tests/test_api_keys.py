"""Keys and users as components (no Tornado), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from hub_extension import api_keys, key_format
from hub_extension.api_keys import KeyManager
from hub_extension.audit import AuditLog
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
    alice = await users.seen_from_hub({"name": "alice"})
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
    alice, bob = await users.seen_from_hub({"name": "alice"}), await users.seen_from_hub({"name": "bob"})
    _, model = await keys.create(alice.id, **keys.validate_request({"name": "k"}))
    with pytest.raises(NotFound):
        await keys.revoke(bob.id, model["id"])
    with pytest.raises(NotFound):
        await keys.revoke(alice.id, 10**9)


async def test_expiry_and_validation(parts):
    db, users, keys = parts
    alice = await users.seen_from_hub({"name": "alice"})
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
    alice = await users.seen_from_hub({"name": "alice"})
    fields = keys.validate_request({"name": "k"})
    results = await asyncio.gather(*(keys.create(alice.id, **fields) for _ in range(12)), return_exceptions=True)
    made = [r for r in results if not isinstance(r, Exception)]
    assert len(made) == 5
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, Exception))


async def test_last_used_is_batched(parts):
    db, users, keys = parts
    alice = await users.seen_from_hub({"name": "alice"})
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
    alice = await users.seen_from_hub({"name": "alice"})
    await users.apply_action("alice", "disable", audit={"actor": "t", "subject": "alice", "client_ip": None})
    assert (await users.by_id(alice.id)).status == "disabled"
    with pytest.raises(NotFound):
        await users.apply_action("alice", "sleep", audit={})
    with pytest.raises(NotFound):
        await users.apply_action("nobody", "enable", audit={})


async def test_hub_sync_retires_deleted_and_marks_blocked_users(parts):
    db, users, keys = parts
    for name in ("alice", "bob", "carol"):
        await users.seen_from_hub({"name": name, "admin": False, "groups": []})
    bob = await users.by_name("bob")
    secret, _ = await keys.create(bob.id, **keys.validate_request({"name": "k"}))
    listing = [
        {"name": "alice", "admin": True, "groups": ["ml"], "roles": ["user"]},
        {"name": "carol", "admin": False, "groups": ["inference-blocked"], "roles": []},
    ]
    changed, revoked = await users.sync(listing)
    assert set(changed) >= {"alice", "bob", "carol"} and len(revoked) == 1
    keys.forget(revoked)
    by = {u["name"]: u for u in await users.list()}
    assert by["alice"]["hub_admin"] and by["alice"]["groups"] == ["ml"] and by["alice"]["in_hub"]
    assert not by["carol"]["in_hub"] and "bob" not in by  # bob's row is retired under a name no one can get
    with pytest.raises(Unauthorized):
        await keys.check(secret)
    actions = [e["action"] for e in await AuditLog(db).query(user="bob")]
    assert actions[:2] == ["user.deleted", "key.revoke"]
    # A new person given the name starts with nothing of the old one's.
    new_bob = await users.seen_from_hub({"name": "bob"})
    assert new_bob.id != bob.id and await keys.list(new_bob.id, include_revoked=True) == []


async def test_a_deleted_hub_users_presets_and_collections_are_deleted(parts):
    """Their private data goes with them (audited); nobody else's is touched."""
    from sqlalchemy import select

    from hub_extension.orm import Collection, CollectionChunk, CollectionDocument, Preset

    db, users, _ = parts
    owners = {name: await users.seen_from_hub({"name": name}) for name in ("erin", "finn")}

    def give(session, user_id):
        session.add(Preset(user_id=user_id, name="p", model="tiny-chat"))
        collection = Collection(user_id=user_id, name="c", embedding_model="minilm", documents=1, chunks=1)
        session.add(collection)
        session.flush()
        document = CollectionDocument(collection_id=collection.id, characters=4, chunks=1)
        session.add(document)
        session.flush()
        session.add(CollectionChunk(collection_id=collection.id, document_id=document.id, position=0, text="text",
                                    embedding=b"\0" * 8))

    for state in owners.values():
        db.call(give, state.id)
    await users.sync([{"name": "finn"}])

    finn_only = [owners["finn"].id]
    assert db.call(lambda s: sorted(s.execute(select(Preset.user_id)).scalars())) == finn_only
    assert db.call(lambda s: sorted(s.execute(select(Collection.user_id)).scalars())) == finn_only
    finn_collection = db.call(lambda s: s.execute(select(Collection.id)).scalar_one())
    for model in (CollectionDocument, CollectionChunk):
        assert db.call(lambda s, m=model: set(s.execute(select(m.collection_id)).scalars())) == {finn_collection}
    deleted = [e for e in await AuditLog(db).query(user="erin") if e["action"] == "user.deleted"]
    assert deleted and deleted[0]["details"]["presets_removed"] == 1 and deleted[0]["details"]["collections_removed"] == 1


async def test_a_recreated_hub_user_is_a_new_person(parts):
    """Deleted and re-created between two syncs: the Hub's `created` time tells them apart."""
    db, users, keys = parts
    old = await users.seen_from_hub({"name": "dora", "created": "2026-01-01T00:00:00Z"})
    secret, _ = await keys.create(old.id, **keys.validate_request({"name": "k"}))
    users.cache_seconds = 0
    new = await users.seen_from_hub({"name": "dora", "created": "2026-06-01T00:00:00Z"})
    assert new.id != old.id
    assert await keys.list(new.id) == [] and (await users.by_id(old.id)).in_hub is False
    keys.cache_seconds = 0
    with pytest.raises(Unauthorized):
        await keys.check(secret)
    changed, _ = await users.sync([{"name": "dora", "created": "2026-06-01T00:00:00Z"}])
    assert changed == []


async def test_a_lookup_begun_before_a_disable_never_caches_the_old_state(parts):
    """The user cache's generation guard: a fill that read 'active' before `disable` must not write it back."""
    db, users, _ = parts
    alice = await users.seen_from_hub({"name": "alice"})
    generation = users._generation
    stale = await db.run(users._load_id, alice.id)  # a look-up in flight, read before the change
    await users.apply_action("alice", "disable", audit={"actor": "t", "subject": "alice", "client_ip": None})
    users._remember(stale, generation)  # ...finishing after it
    assert (await users.by_id(alice.id)).status == "disabled"
    assert (await users.by_name("alice")).status == "disabled"


async def test_buffers_are_swapped_on_the_event_loop(parts):
    """`last_seen`/`last_used` buffers change hands before the flush leaves the loop: nothing noted meanwhile is
    lost or touched from the database thread."""
    _, users, keys = parts
    alice = await users.seen_from_hub({"name": "alice"})
    secret, _ = await keys.create(alice.id, **keys.validate_request({"name": "k"}))
    await keys.check(secret)
    users.note_seen(alice.id)
    flushes = [asyncio.ensure_future(users.flush_last_seen()), asyncio.ensure_future(keys.flush())]
    await asyncio.sleep(0)  # each flush has started and is waiting on the database thread
    assert users._last_seen == {} and keys._last_used == {}
    users.note_seen(alice.id)
    assert await asyncio.gather(*flushes) == [1, 1]
    assert alice.id in users._last_seen  # noted during the flush: kept for the next one
    assert (await keys.list(alice.id))[0]["last_used"] is not None


async def test_key_requests_are_bounded(parts, monkeypatch):
    db, users, keys = parts
    monkeypatch.setattr(api_keys, "KEEP_ENDED_KEYS", 10)  # the bound itself, smaller: fewer rounds to cross it
    for body in ({"name": "k", "models": [f"m{i}" for i in range(65)]}, {"name": "k", "models": ["m" * 129]},
                 {"name": "x" * 129}, {"name": "tab\there"}, {"name": "k", "features": ["chat"] * 3}):
        with pytest.raises(BadRequest):
            keys.validate_request(body)
    assert keys.validate_request({"name": "k", "models": ["b", "a", "b"]})["models"] == ["a", "b"]
    alice = await users.seen_from_hub({"name": "alice"})
    for i in range(api_keys.KEEP_ENDED_KEYS + 20):  # make and revoke in a loop: ended keys are pruned
        await keys.create(alice.id, **keys.validate_request({"name": f"k{i}"}))
        await keys.revoke(alice.id)
    stored = await keys.list(alice.id, include_revoked=True)
    assert len(stored) <= api_keys.KEEP_ENDED_KEYS
    assert stored[-1]["name"] == f"k{api_keys.KEEP_ENDED_KEYS + 19}"  # the newest are kept


async def test_an_unreachable_hub_is_a_503_not_a_500():
    from conftest import free_port

    from hub_extension.errors import ServiceUnavailable
    from hub_extension.users import HubUsers

    hub = HubUsers(f"http://127.0.0.1:{free_port()}/hub/api", "token")
    for call in (hub.get("alice"), hub.group_exists("staff"), hub.list()):
        with pytest.raises(ServiceUnavailable):
            await call

"""The permission components without Tornado: the precedence table, narrowed keys, the snapshot, grants, audit.

The precedence table runs twice: against an in-memory snapshot (one parametrised case each, so a failure
names the rule) and through the database on SQLite and PostgreSQL (grants written with `set_grants`, read
back by `load`).
"""

from __future__ import annotations

import asyncio

import pytest

from hub_extension.audit import AuditLog
from hub_extension.db import Database
from hub_extension.errors import BadRequest, Conflict, NotFound
from hub_extension.identity import Identity
from hub_extension.permissions import FEATURES, MAX_GRANTS_PER_SUBJECT, GrantSnapshot, PermissionPolicy
from hub_extension.users import UserDirectory

ROLES = [
    {"name": "lab-embed", "groups": ["lab"], "scopes": ["custom:inference:embeddings"]},
    {"name": "lab-minilm", "groups": ["lab"], "scopes": ["custom:inference:model:minilm"]},
    {"name": "all-models", "groups": ["everything"], "scopes": ["custom:inference:model:*"]},
    {"name": "ops", "scopes": ["custom:inference:usage"]},  # held directly by users with the role
]
ANN = Identity(name="ann", via="api_key", is_admin=False, user_id=1, groups=("lab", "staff"))
AUDIT = {"actor": "root", "subject": "x", "client_ip": None}


def policy(defaults=None, model_default=True, db=None) -> PermissionPolicy:
    return PermissionPolicy(db, feature_defaults=defaults or {}, model_default_allow=model_default, hub_roles=ROLES)


# Each case: config (feature defaults, model default), the user's groups, grants (subject -> {target: allow},
# "user" or "group:<name>"; model targets as "model:<name>"), what is asked, and the expected answer/source.
CASES = [
    # id, defaults, model_default, groups, grants, ask, allowed, source
    ("default-on", {}, True, ("staff",), {}, "chat", True, "default"),
    ("default-off", {"embeddings": False}, True, ("staff",), {}, "embeddings", False, "default"),
    ("scope-beats-default", {"embeddings": False}, True, ("lab",), {}, "embeddings", True, "hub_scope"),
    ("role-not-held", {"usage": False}, True, (), {}, "usage", False, "default"),
    ("group-deny-beats-scope", {}, True, ("lab",), {"group:lab": {"embeddings": False}}, "embeddings",
     False, "group_grant"),
    ("deny-wins-among-groups", {}, True, ("lab", "staff"),
     {"group:staff": {"chat": True}, "group:lab": {"chat": False}}, "chat", False, "group_grant"),
    ("user-allow-beats-group-deny", {}, True, ("lab",),
     {"group:lab": {"chat": False}, "user": {"chat": True}}, "chat", True, "user_grant"),
    ("user-deny-beats-default", {}, True, (), {"user": {"keys": False}}, "keys", False, "user_grant"),
    ("other-groups-grant-nothing", {"chat": False}, True, ("staff",), {"group:lab": {"chat": True}}, "chat",
     False, "default"),
    ("unknown-feature", {}, True, (), {}, "teleport", False, "default"),
    ("model-default-allow", {}, True, (), {}, "model:tiny-chat", True, "default"),
    ("model-allow-list", {}, False, (), {}, "model:tiny-chat", False, "default"),
    ("model-scope", {}, False, ("lab",), {}, "model:minilm", True, "hub_scope"),
    ("model-scope-other-model", {}, False, ("lab",), {}, "model:tiny-chat", False, "default"),
    ("model-scope-star", {}, False, ("everything",), {}, "model:tiny-chat", True, "hub_scope"),
    ("exact-beats-star-same-level", {}, True, ("lab", "staff"),
     {"group:staff": {"model:*": False}, "group:lab": {"model:minilm": True}}, "model:minilm", True, "group_grant"),
    ("star-at-user-level-beats-group-exact", {}, True, ("lab",),
     {"user": {"model:*": False}, "group:lab": {"model:minilm": True}}, "model:minilm", False, "user_grant"),
    ("user-exact-beats-user-star", {}, True, (),
     {"user": {"model:*": False, "model:minilm": True}}, "model:minilm", True, "user_grant"),
    ("group-model-deny", {}, True, ("staff",), {"group:staff": {"model:tiny-chat": False}}, "model:tiny-chat",
     False, "group_grant"),
]


def _snapshot(grants: dict) -> GrantSnapshot:
    users: dict = {}
    groups: dict = {}
    for subject, entries in grants.items():
        table = users.setdefault("ann", {}) if subject == "user" else groups.setdefault(subject[6:], {})
        for target, allow in entries.items():
            kind, _, name = target.rpartition(":") if target.startswith("model:") else ("feature", "", target)
            table[(kind, name)] = allow
    return GrantSnapshot(users=users, groups=groups)


def _ask(p: PermissionPolicy, who, ask: str):
    return p.model(who, ask[6:]) if ask.startswith("model:") else p.feature(who, ask)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_precedence(case):
    _, defaults, model_default, groups, grants, ask, allowed, source = case
    p = policy(defaults, model_default)
    p.snapshot = _snapshot(grants)
    who = Identity(name="ann", via="api_key", is_admin=False, user_id=1, groups=groups)
    decision = _ask(p, who, ask)
    assert (decision.allowed, decision.source) == (allowed, source)
    if not ask.startswith("model:"):
        assert p.allowed(who, ask) is allowed


def test_precedence_table_through_the_database(db_url):
    """Every case again, with the grants written by `set_grants` and read back by `load` (both databases)."""
    db = Database(db_url, threads=2)
    db.upgrade()
    try:
        for case in CASES:
            name, defaults, model_default, groups, grants, ask, allowed, source = case
            p = policy(defaults, model_default, db=db)
            for kind, subject in [("user", "ann"), *[("group", g) for g in ("lab", "staff", "everything")]]:
                asyncio.run(p.set_grants(kind, subject, {}, replace=True, audit=AUDIT))
            for subject, entries in grants.items():
                kind, who = ("user", "ann") if subject == "user" else ("group", subject[6:])
                body = {"features": {}, "models": {}}
                for target, allow in entries.items():
                    if target.startswith("model:"):
                        body["models"][target[6:]] = allow
                    else:
                        body["features"][target] = allow
                changes = PermissionPolicy.parse_grants(body, partial=False)
                asyncio.run(p.set_grants(kind, who, changes, replace=True, audit=AUDIT))
            fresh = policy(defaults, model_default, db=db)
            fresh.load()
            who = Identity(name="ann", via="api_key", is_admin=False, user_id=1, groups=groups)
            decision = _ask(fresh, who, ask)
            assert (decision.allowed, decision.source) == (allowed, source), name
    finally:
        db.close()


def test_hub_token_scopes_are_used_instead_of_roles():
    """A Hub token carries its own scopes (possibly fewer than the roles give): those count, not the roles'."""
    p = policy({"embeddings": False})
    via_token = Identity(name="ann", via="hub_token", is_admin=False, groups=("lab",), hub_scopes=frozenset())
    via_key = Identity(name="ann", via="api_key", is_admin=False, groups=("lab",))
    assert not p.allowed(via_token, "embeddings")
    assert p.allowed(via_key, "embeddings")
    scoped = Identity(name="bob", via="hub_cookie", is_admin=False, hub_scopes=frozenset({"custom:inference:embeddings"}))
    assert p.feature(scoped, "embeddings").source == "hub_scope"


def test_narrowed_key_is_the_intersection_with_the_owner_now():
    p = policy()
    key = Identity(name="ann", via="api_key", is_admin=False, groups=("lab",), key_id=7,
                   key_features=("chat", "embeddings"), key_models=("tiny-chat",))
    assert p.allowed(key, "chat", "tiny-chat")
    assert not p.allowed(key, "completions")  # not in the key
    assert not p.allowed(key, "chat", "minilm")  # model not in the key
    assert p.visible_models(key, ["tiny-chat", "minilm"]) == ["tiny-chat"]
    p.snapshot = _snapshot({"user": {"chat": False}})  # the owner loses chat: so does the key, at once
    assert not p.allowed(key, "chat", "tiny-chat")
    assert p.feature(key, "chat").source == "user_grant"
    assert p.feature(key, "completions").source == "key"
    eff = p.effective(key, ["tiny-chat", "minilm"])
    assert eff["features"]["chat"] == {"allowed": False, "source": "user_grant", "via": "user:ann"}
    assert eff["models"]["minilm"] == {"allowed": False, "source": "key"}
    assert eff["key"] == {"id": 7, "features": ["chat", "embeddings"], "models": ["tiny-chat"]}


def test_unrestricted_identities():
    p = policy({f: False for f in FEATURES}, model_default=False)
    for identity in (Identity.anonymous(), Identity(name="static", via="static_key", is_admin=True)):
        assert all(p.allowed(identity, f, "m") for f in FEATURES)
        assert p.visible_models(identity, ["a", "b"]) == ["a", "b"]
        assert p.effective(identity)["features"]["chat"]["source"] == "unrestricted"


def test_effective_lists_sources_and_granted_models():
    p = policy({"embeddings": False}, model_default=False)
    p.snapshot = _snapshot({"group:staff": {"model:big": True}})
    eff = p.effective(ANN, ["tiny-chat"])
    assert eff["features"]["embeddings"] == {"allowed": True, "source": "hub_scope", "via": "custom:inference:embeddings"}
    assert eff["features"]["chat"] == {"allowed": True, "source": "default"}
    assert set(eff["models"]) == {"tiny-chat", "minilm", "big"}
    assert eff["models"]["big"] == {"allowed": True, "source": "group_grant", "via": "group:staff"}
    assert eff["other_models"] == {"allowed": False, "source": "default"}
    assert "user grant > group grant > Hub scope > default" in eff["precedence"]


def test_key_narrowing_never_widens():
    p = policy({"usage": False})
    user = Identity(name="ann", via="hub_token", is_admin=False, hub_scopes=frozenset())
    with pytest.raises(BadRequest, match="usage"):
        p.check_key_narrowing(user, {"features": ["chat", "usage"], "models": None})
    p.snapshot = _snapshot({"user": {"model:secret": False}})
    with pytest.raises(BadRequest, match="secret"):
        p.check_key_narrowing(user, {"features": None, "models": ["secret"]})
    ok = {"features": ["chat"], "models": ["tiny-chat"]}
    p.check_key_narrowing(user, ok)
    # A key made with a narrowed key inherits its narrowing instead of getting everything.
    narrowed = Identity(name="ann", via="api_key", is_admin=False, key_id=1, key_features=("chat", "keys"),
                        key_models=("tiny-chat",))
    fields = {"features": None, "models": None}
    p.check_key_narrowing(narrowed, fields)
    assert fields == {"features": ["chat", "keys"], "models": ["tiny-chat"]}
    with pytest.raises(BadRequest):
        p.check_key_narrowing(narrowed, {"features": ["embeddings"], "models": None})


@pytest.mark.parametrize(
    "body, partial",
    [
        ([], False),
        ({"features": {"teleport": True}}, False),
        ({"features": {"chat": "yes"}}, False),
        ({"features": {"chat": None}}, False),  # null only in a partial update
        ({"models": ["a"]}, False),
        ({"models": {"": True}}, True),
        ({"feature": {}}, True),
    ],
)
def test_bad_grant_bodies_are_400(body, partial):
    with pytest.raises(BadRequest):
        PermissionPolicy.parse_grants(body, partial=partial)


def test_grants_audit_snapshot_and_replicas(db_url):
    """One audit entry per change (none for a no-op); this process sees a change at once, a replica on reload;
    checks never touch the database."""
    db = Database(db_url, threads=2)
    db.upgrade()
    try:
        here, replica = policy(db=db), policy(db=db)
        here.load()
        replica.load()
        who = Identity(name="ann", via="api_key", is_admin=False, groups=("staff",))
        audit = {"actor": "root", "subject": "group:staff", "client_ip": "10.0.0.1"}
        changes = PermissionPolicy.parse_grants({"features": {"embeddings": True, "chat": False},
                                                 "models": {"a": True, "b": True}}, partial=False)
        result = asyncio.run(here.set_grants("group", "staff", changes, replace=True, audit=audit))
        assert result == {"features": {"chat": False, "embeddings": True}, "models": {"a": True, "b": True}}
        assert not here.allowed(who, "chat")  # at once, here
        assert replica.allowed(who, "chat")  # the replica still has its old snapshot...
        asyncio.run(replica.reload())
        assert not replica.allowed(who, "chat")  # ...until its reload
        # A no-op writes nothing; a merge changes only what it names; null removes.
        asyncio.run(here.set_grants("group", "staff", changes, replace=True, audit=audit))
        patch = PermissionPolicy.parse_grants({"features": {"chat": None}, "models": {"b": False}}, partial=True)
        result = asyncio.run(here.set_grants("group", "staff", patch, replace=False, audit=audit))
        assert result == {"features": {"embeddings": True}, "models": {"a": True, "b": False}}
        asyncio.run(here.set_grants("group", "staff", {}, replace=True, audit=audit))
        assert here.grants("group", "staff") == {"features": {}, "models": {}}
        events = asyncio.run(AuditLog(db).query(user="group:staff"))
        assert [e["action"] for e in events] == ["grants.delete", "grants.set", "grants.set"]
        assert events[1]["details"]["changes"] == {
            "feature:chat": {"from": False, "to": None}, "model:b": {"from": True, "to": False},
        }
        assert events[2]["client_ip"] == "10.0.0.1" and events[2]["actor"] == "root"
        before = db.statements
        for _ in range(100):
            here.allowed(who, "embeddings", "a")
            here.visible_models(who, ["a", "b"])
            here.effective(who, ["a"])
        assert db.statements == before
    finally:
        db.close()


def test_status_actions(db_url):
    db = Database(db_url, threads=2)
    db.upgrade()
    try:
        users = UserDirectory(db, cache_seconds=60, new_user_status="pending")
        state = asyncio.run(users.seen_from_hub({"name": "carl"}))
        assert state.status == "pending"
        audit = {"actor": "root", "subject": "carl", "client_ip": None}
        with pytest.raises(Conflict):
            asyncio.run(users.apply_action("carl", "enable", audit=audit))  # pending users are approved, not enabled
        assert asyncio.run(users.apply_action("carl", "approve", audit=audit)).status == "active"
        with pytest.raises(Conflict):
            asyncio.run(users.apply_action("carl", "approve", audit=audit))
        assert asyncio.run(users.apply_action("carl", "disable", audit=audit)).status == "disabled"
        assert asyncio.run(users.apply_action("carl", "disable", audit=audit)).status == "disabled"  # no-op
        # The cache used by every credential check has the new state already.
        assert asyncio.run(users.by_name("carl")).status == "disabled"
        assert asyncio.run(users.apply_action("carl", "enable", audit=audit)).status == "active"
        with pytest.raises(NotFound):
            asyncio.run(users.apply_action("nobody", "disable", audit=audit))
        events = asyncio.run(AuditLog(db).query(user="carl"))
        assert [(e["action"], e["details"]) for e in reversed(events)] == [
            ("user.approve", {"from": "pending", "to": "active"}),
            ("user.disable", {"from": "active", "to": "disabled"}),
            ("user.enable", {"from": "disabled", "to": "active"}),
        ]
    finally:
        db.close()


def test_grants_per_subject_are_bounded(db_url):
    db = Database(db_url, threads=2)
    db.upgrade()
    try:
        here = policy(db=db)
        audit = {"actor": "root", "subject": "group:many", "client_ip": None}
        too_many = {"models": {f"m{i}": True for i in range(MAX_GRANTS_PER_SUBJECT + 1)}}
        with pytest.raises(BadRequest):
            PermissionPolicy.parse_grants(too_many, partial=True)
        with pytest.raises(BadRequest):
            PermissionPolicy.parse_grants({"models": {"m" * 129: True}}, partial=True)
        half = MAX_GRANTS_PER_SUBJECT // 2 + 1
        for start in (0, half):  # two merges that each fit, together too many: refused, nothing written
            changes = PermissionPolicy.parse_grants({"models": {f"m{i}": True for i in range(start, start + half)}},
                                                    partial=True)
            if start:
                with pytest.raises(BadRequest):
                    asyncio.run(here.set_grants("group", "many", changes, replace=False, audit=audit))
            else:
                asyncio.run(here.set_grants("group", "many", changes, replace=False, audit=audit))
        assert len(here.grants("group", "many")["models"]) == half
    finally:
        db.close()

"""Invites and local accounts in the service's database (`login/store.py`), on SQLite and PostgreSQL; the single-use
race on PostgreSQL; the admin commands. No Hub: the pages are driven in test_login_local_e2e.py."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading

import pytest
from conftest import run_command
from sqlalchemy import func, select, update

from hub_extension.db import Database
from hub_extension.errors import BadRequest, Conflict, NotFound
from hub_extension.login import store
from hub_extension.orm import AuditEvent, Invite, User, UserStatus

ADMIN = {"actor": "root", "subject": None, "client_ip": "10.0.0.1"}



def new_invite(db: Database, **fields) -> tuple[str, dict]:
    request = store.parse_invite_request(fields)
    return db.call(lambda s: store.create_invite(s, audit=dict(ADMIN), **request))


def actions(db: Database) -> list[str]:
    return db.call(lambda s: [e.action for e in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()])


def test_invite_is_stored_hashed_and_used_once(db):
    code, model = new_invite(db, note="for Ada", groups=["students", "embedders"])
    assert code.startswith(store.INVITE_CODE_PREFIX) and len(code) > 30
    assert model["status"] == "active" and model["groups"] == ["embedders", "students"] and model["note"] == "for Ada"
    expires = dt.datetime.fromisoformat(model["expires_at"].rstrip("Z"))
    assert dt.timedelta(days=6, hours=23) < expires - dt.datetime.now(dt.UTC).replace(tzinfo=None) <= dt.timedelta(days=7)
    stored = db.call(lambda s: s.execute(select(Invite)).scalar_one())
    assert stored.hashed == store.code_hash(code) and code not in json.dumps(store.invite_model(stored))
    assert db.call(store.check_invite, code)["id"] == model["id"]  # checking uses nothing up

    def redeem(session, name):
        groups = store.redeem_invite(session, code, name, client_ip="10.0.0.2")
        store.add_user(session, name, status=UserStatus.ACTIVE, groups=groups, audit={"actor": name, "subject": name,
                                                                                     "client_ip": "10.0.0.2"})
        return groups

    assert db.call(redeem, "ada") == ["embedders", "students"]
    with pytest.raises(store.InviteRefused) as refused:
        db.call(redeem, "eve")
    assert refused.value.reason == "used"
    with pytest.raises(store.InviteRefused, match="used"):
        db.call(store.check_invite, code)
    rows = db.call(lambda s: [(u.name, u.status, u.hub_groups) for u in s.execute(select(User)).scalars()])
    assert rows == [("ada", "active", ["embedders", "students"])]
    [listed] = db.call(store.list_invites)
    assert listed["status"] == "used" and listed["used_by"] == "ada"
    with pytest.raises(Conflict):
        db.call(store.revoke_invite, model["id"], dict(ADMIN))
    assert actions(db) == ["invite.create", "invite.redeem", "user.register"]


def test_revoked_expired_and_unknown_invites_are_refused(db):
    revoked_code, revoked = new_invite(db)
    assert db.call(store.revoke_invite, revoked["id"], dict(ADMIN))["status"] == "revoked"
    assert db.call(store.revoke_invite, revoked["id"], dict(ADMIN))["status"] == "revoked"  # again: no change
    expired_code, expired = new_invite(db, expires_in_days=1)
    db.call(lambda s: s.execute(update(Invite).where(Invite.id == expired["id"])
                                .values(expires_at=dt.datetime(2020, 1, 1))))
    for code, reason in ((revoked_code, "revoked"), (expired_code, "expired"), ("inv_nope", "unknown"),
                         ("", "unknown"), ("x" * 10_000, "unknown")):
        with pytest.raises(store.InviteRefused) as refused:
            db.call(store.redeem_invite, code, "mallory")
        assert refused.value.reason == reason
    assert [m["status"] for m in db.call(store.list_invites)] == ["expired", "revoked"]
    assert [m["id"] for m in db.call(store.list_invites, "revoked")] == [revoked["id"]]
    with pytest.raises(NotFound):
        db.call(store.revoke_invite, 999, dict(ADMIN))
    assert actions(db) == ["invite.create", "invite.revoke", "invite.create"]  # one revoke entry, no redemption


@pytest.mark.parametrize("body, param", [
    ({"expires_in_days": 0}, "expires_in_days"),
    ({"expires_in_days": 366}, "expires_in_days"),
    ({"expires_in_days": True}, "expires_in_days"),
    ({"expires_in_days": "7"}, "expires_in_days"),
    ({"note": "x" * 501}, "note"),
    ({"note": "line\nbreak"}, "note"),
    ({"groups": "students"}, "groups"),
    ({"groups": ["ok", "no spaces"]}, "groups"),
    ({"groups": ["g"] * 33}, "groups"),
    ({"code": "mine"}, "code"),
])
def test_bad_invite_requests_are_400s(body, param):
    with pytest.raises(BadRequest) as error:
        store.parse_invite_request(body)
    assert error.value.param == param


def test_local_accounts_and_passwords(db):
    audit = {"actor": "ada", "subject": "ada", "client_ip": None}
    db.call(store.create_account, "ada", "hash-1", audit)
    with pytest.raises(Conflict):
        db.call(store.create_account, "ada", "hash-2", audit)
    assert db.call(store.password_hash, "ada") == "hash-1"
    db.call(store.set_password, "ada", "hash-3", audit, action="password.change")
    db.call(store.rehash, "ada", "hash-1", "stale")  # changed meanwhile: the rehash of the old one is dropped
    assert db.call(store.password_hash, "ada") == "hash-3"
    with pytest.raises(NotFound):
        db.call(store.set_password, "bob", "hash", audit, action="password.reset")
    db.call(store.set_password, "bob", "hash-b", audit, action="password.reset", create=True)
    assert db.call(store.password_hash, "bob") == "hash-b"
    assert db.call(store.password_hash, "nobody") is None
    db.call(store.add_user, "carol", status=UserStatus.PENDING)
    with pytest.raises(Conflict):
        db.call(store.add_user, "carol", status=UserStatus.ACTIVE)
    db.call(store.activate_admin, "carol", dict(audit))
    assert db.call(store.user_status, "carol") == "active"
    assert actions(db) == ["account.create", "password.change", "password.reset", "user.approve"]


def race(db: Database, code: str, names: list[str]) -> dict[str, str]:
    """Each name redeems `code` in its own transaction, all at the same moment: name -> "ok" or why refused."""
    barrier = threading.Barrier(len(names))
    outcomes: dict[str, str] = {}

    def redeem(name: str) -> None:
        def work(session):
            barrier.wait(10)  # every transaction is open before any of them claims the invite
            groups = store.redeem_invite(session, code, name)
            store.add_user(session, name, status=UserStatus.ACTIVE, groups=groups,
                           audit={"actor": name, "subject": name, "client_ip": None})
        try:
            db.call(work)
            outcomes[name] = "ok"
        except store.InviteRefused as e:
            outcomes[name] = e.reason

    threads = [threading.Thread(target=redeem, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_concurrent_redemptions_make_exactly_one_account(pg_unit_url):
    """Eight people redeem one invite at the same moment on PostgreSQL: one account, every other one refused."""
    from sqlalchemy import create_engine, text

    from hub_extension.orm import Base

    engine = create_engine(pg_unit_url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(t.name for t in Base.metadata.sorted_tables)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    db = Database(pg_unit_url, threads=8)
    try:
        for round_ in range(5):
            code, _ = new_invite(db, groups=["cohort"])
            names = [f"p{round_}-{i}" for i in range(8)]
            outcomes = race(db, code, names)
            assert sorted(outcomes.values()) == ["ok"] + ["used"] * 7, outcomes
            made = db.call(lambda s, names=names: s.execute(
                select(func.count()).select_from(User).where(User.name.in_(names))).scalar_one())
            assert made == 1
    finally:
        db.close()


def test_cli_invites_and_password_reset(db_url, capsys):
    database = Database(db_url, threads=1)
    database.upgrade()
    database.call(store.add_user, "ada", status=UserStatus.ACTIVE)
    database.close()
    code, out = run_command(capsys, "invites", "create", "--note", "for Bo", "--groups", "students,tas",
                            "--expires-in-days", "2", "--db-url", db_url)
    assert code == 0, out
    invite_code = out.strip()
    assert invite_code.startswith("inv_")
    code, out = run_command(capsys, "invites", "list", "--json", "--db-url", db_url)
    assert code == 0, out
    [listed] = json.loads(out)
    assert listed["groups"] == ["students", "tas"] and listed["status"] == "active" and invite_code not in out
    code, out = run_command(capsys, "invites", "revoke", str(listed["id"]), "--db-url", db_url)
    assert (code, out.strip()) == (0, f"invite {listed['id']}: revoked")
    code, out = run_command(capsys, "invites", "create", "--groups", "bad group", "--db-url", db_url)
    assert code == 1 and "groups" in out
    # With the Hub's public address known, the link itself is printed (what the admin hands on).
    code, out = run_command(capsys, "invites", "create", "--db-url", db_url,
                            "--InferenceService.hub_public_url=https://hub.example.org/jhub")
    assert code == 0, out
    assert re.fullmatch(r"https://hub\.example\.org/jhub/hub/invite/inv_\S+\n", out), out
    code, out = run_command(capsys, "invites", "create", "--db-url", db_url,
                            "--InferenceService.hub_public_url=ftp://hub")
    assert code == 1 and "hub_public_url" in out
    code, out = run_command(capsys, "users", "reset-password", "ada", "--db-url", db_url)
    assert code == 0, out
    password = out.strip()
    assert len(password) == 20
    database = Database(db_url, threads=1)
    from hub_extension.login.passwords import verify_password

    assert verify_password(database.call(store.password_hash, "ada"), password)
    assert actions(database)[-1] == "password.reset"
    database.close()
    code, out = run_command(capsys, "users", "reset-password", "nobody", "--db-url", db_url)
    assert code == 1 and "nobody" in out


def test_the_hubs_public_address_reaches_the_service_for_invitation_links():
    from traitlets.config import Config

    from hub_extension.hub_config import configure

    c = Config()
    c.JupyterHub.bind_url = "http://127.0.0.1:8000"
    assert configure(c)["environment"]["INFERENCE_HUB_PUBLIC_URL"] == "http://127.0.0.1:8000"
    c.JupyterHub.public_url = "https://hub.example.org/jhub/"  # what people reach, when a proxy sits in front
    assert configure(c)["environment"]["INFERENCE_HUB_PUBLIC_URL"] == "https://hub.example.org/jhub/"
    assert "INFERENCE_HUB_PUBLIC_URL" not in configure(Config())["environment"]
    assert store.invite_link("https://hub.example.org/jhub/", "inv_x") == "https://hub.example.org/jhub/hub/invite/inv_x"

"""Administration end to end: Hub roles and groups, grants, status, view-as, the audit log and the CLI.

Through the real Hub (and its proxy for the two standard instances); every test makes its own users.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import re

import conftest
import pytest
import requests
from conftest import (
    CACHE_SECONDS,
    HUB_SYNC_SECONDS,
    bearer,
    direct_instance,
    run_command,
    wait_for,
)
from sqlalchemy import update

from hub_extension import key_format
from hub_extension.administration import AUDIT_LIMIT_MAX
from hub_extension.db import Database
from hub_extension.orm import UsageRollup, User, utcnow
from hub_extension.users import UserDirectory

BOUND = 30 + 10 * max(CACHE_SECONDS, HUB_SYNC_SECONDS)  # generous: tests prove it happens, not how fast
ISSUED: list[str] = []  # every secret this module sees issued: the audit log must hold none of them
EMBED = {"model": "minilm", "input": "hello"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def new_key(url: str, token: str, **fields) -> str:
    secret = conftest.new_key(url, token, **fields)
    ISSUED.append(secret)
    return secret


def status(url: str, method: str, path: str, credential: str, body=None) -> int:
    return requests.request(method, url + path, headers=bearer(credential), json=body, timeout=60).status_code


@pytest.fixture(scope="module")
def strict(hub, model_config_file, tmp_path_factory):
    """A third instance on SQLite where `embeddings` is off by default and models are an allow-list.

    It authenticates against the test Hub with the test's Hub client token and is reached directly on loopback:
    what it proves is that a role in the Hub's `load_roles` (config as code) grants features and models.
    """
    def allow_list(cfg) -> None:
        cfg.PermissionPolicy.feature_defaults = {"embeddings": False}
        cfg.PermissionPolicy.model_default_allow = False

    tmp = tmp_path_factory.mktemp("strict")
    with direct_instance(hub, model_config_file, f"sqlite:///{tmp / 'strict.sqlite'}", tmp, "strict",
                         allow_list) as url:
        yield url


def test_hub_role_grants_reach_the_service(hub, strict):
    """`embedders` gets `embeddings` and model `minilm` from Hub roles; joining and leaving the group is honoured
    for Hub tokens and for keys within the cache bound."""
    user = hub.new_user("emb")
    token = hub.api.user_token(user)
    key = new_key(strict, token)
    for credential in (token, key):
        assert status(strict, "POST", "v1/embeddings", credential, EMBED) == 403
        assert requests.get(strict + "v1/models", headers=bearer(credential)).json()["data"] == []

    def can_embed(expected: int):
        return all(status(strict, "POST", "v1/embeddings", c, EMBED) == expected for c in (token, key))

    hub.api.add_to_group("embedders", user)
    wait_for(lambda: can_embed(200), timeout=BOUND + 60, interval=0.3, what="embeddings granted by the Hub role")
    for credential in (token, key):
        models = requests.get(strict + "v1/models", headers=bearer(credential)).json()["data"]
        assert [m["id"] for m in models] == ["minilm"]
        perms = requests.get(strict + "api/me/permissions", headers=bearer(credential)).json()
        assert perms["features"]["embeddings"] == {
            "allowed": True, "source": "hub_scope", "via": "custom:inference:embeddings"
        }
        assert perms["models"]["minilm"]["source"] == "hub_scope"
        assert perms["models"]["tiny-chat"] == {"allowed": False, "source": "default"}
    hub.api.remove_from_group("embedders", user)
    wait_for(lambda: can_embed(403), timeout=BOUND, interval=0.3, what="embeddings gone with the group")


def test_admin_scope_through_a_hub_group(hub, instance):
    """Joining the group whose role holds `custom:inference:admin` makes a user an admin here, and leaving undoes it."""
    user = hub.new_user("grp")
    token = hub.api.user_token(user)
    key = new_key(instance.url, token)
    assert status(instance.url, "GET", "api/users", token) == 403
    hub.api.add_to_group("inference-admins", user)
    wait_for(lambda: all(status(instance.url, "GET", "api/users", c) == 200 for c in (token, key)),
             timeout=BOUND, interval=0.3, what="admin through the Hub group")
    hub.api.remove_from_group("inference-admins", user)
    wait_for(lambda: all(status(instance.url, "GET", "api/users", c) == 403 for c in (token, key)),
             timeout=BOUND, interval=0.3, what="admin gone with the group")


def test_taking_a_feature_refuses_existing_keys_at_once(hub, instance):
    url = instance.url
    admin = bearer(hub.api.user_token(hub.new_admin()))
    user = hub.new_user("narrow")
    token = hub.api.user_token(user)
    full, narrowed = new_key(url, token), new_key(url, token, features=["chat"], models=["tiny-chat"])
    for credential in (full, narrowed, token):
        assert status(url, "POST", "v1/chat/completions", credential, CHAT) == 200

    r = requests.patch(url + f"api/users/{user}/grants", headers=admin, json={"features": {"chat": False}})
    assert r.json() == {"features": {"chat": False}, "models": {}}
    for credential in (full, narrowed, token):  # no waiting: the very next request
        assert status(url, "POST", "v1/chat/completions", credential, CHAT) == 403
    perms = requests.get(url + f"api/users/{user}/permissions", headers=admin).json()
    assert perms["features"]["chat"] == {"allowed": False, "source": "user_grant", "via": f"user:{user}"}

    # A model taken away answers like a model that does not exist.
    requests.put(url + f"api/users/{user}/grants", headers=admin, json={"models": {"tiny-chat": False}})
    r = requests.post(url + "v1/chat/completions", headers=bearer(full), json=CHAT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "tiny-chat" not in [m["id"] for m in requests.get(url + "v1/models", headers=bearer(full)).json()["data"]]
    assert requests.delete(url + f"api/users/{user}/grants", headers=admin).json() == {"features": {}, "models": {}}
    assert status(url, "POST", "v1/chat/completions", narrowed, CHAT) == 200

    # Disable: every credential stops at once; enable: back.
    assert requests.post(url + f"api/users/{user}/disable", headers=admin).json()["status"] == "disabled"
    for credential in (full, narrowed, token):
        r = requests.post(url + "v1/chat/completions", headers=bearer(credential), json=CHAT)
        assert r.status_code == 403 and r.json()["error"]["code"] == "user_disabled"
    assert requests.post(url + f"api/users/{user}/enable", headers=admin).json()["status"] == "active"
    assert status(url, "POST", "v1/chat/completions", full, CHAT) == 200


def test_group_grants_two_models_and_embeddings(hub, instance):
    """The issue's story: an admin sees every user, grants a group two models and `embeddings`, narrows a user,
    and reads what happened."""
    url = instance.url
    admin_name = hub.new_admin()
    admin = bearer(hub.api.user_token(admin_name))
    member, outsider = hub.new_user("member"), hub.new_user("outsider")
    group = f"team-{member}"
    hub.api.add_to_group(group, member)
    body = {"features": {"embeddings": True}, "models": {"minilm": True, "tiny-chat": True}}
    r = requests.put(url + f"api/groups/{group}/grants", headers=admin, json=body)
    assert r.status_code == 200 and r.json() == body
    assert requests.get(url + f"api/groups/{group}/grants", headers=admin).json() == body

    users = {u["name"]: u for u in requests.get(url + "api/users", headers=admin).json()["users"]}
    # Hub users who never called the service are listed too (no status yet, no usage).
    assert users[outsider]["status"] is None and users[member]["groups"] == [group]
    assert users[admin_name]["role"] == "admin" and users["admin"]["role"] == "admin"
    assert users[outsider]["usage_30d"] == {"requests": 0, "total_tokens": 0}
    # Reading a user the service has not seen describes them from the Hub and creates nothing.
    detail = requests.get(url + f"api/users/{outsider}", headers=admin).json()
    assert detail["status"] is None and detail["permissions"]["features"]["chat"]["allowed"] is True
    assert requests.get(url + f"api/users/{outsider}/permissions", headers=admin).status_code == 200
    assert requests.get(url + f"api/users/{outsider}/grants", headers=admin).json() == {"features": {}, "models": {}}
    listed = {u["name"]: u for u in requests.get(url + "api/users", headers=admin).json()["users"]}
    assert listed[outsider]["status"] is None

    token = hub.api.user_token(member)
    perms = requests.get(url + "api/me/permissions", headers=bearer(token)).json()
    assert perms["features"]["embeddings"] == {"allowed": True, "source": "group_grant", "via": f"group:{group}"}
    assert perms["models"]["minilm"]["source"] == "group_grant"

    # Narrow the member below the group: user over group.
    requests.patch(url + f"api/users/{member}/grants", headers=admin, json={"models": {"minilm": False}})
    assert status(url, "POST", "v1/embeddings", token, EMBED) == 404
    detail = requests.get(url + f"api/users/{member}", headers=admin).json()
    assert detail["grants"] == {"features": {}, "models": {"minilm": False}}
    assert detail["permissions"]["models"]["minilm"]["source"] == "user_grant"
    assert requests.get(url + "api/users/no-such-user-at-all", headers=admin).status_code == 404

    events = requests.get(url + f"api/audit?user=group:{group}", headers=admin).json()["events"]
    assert [(e["action"], e["actor"], e["details"]["changes"]) for e in events] == [
        ("grants.set", admin_name, {
            "feature:embeddings": {"from": None, "to": True},
            "model:minilm": {"from": None, "to": True},
            "model:tiny-chat": {"from": None, "to": True},
        })
    ]


def test_approve_and_deny_pending_users(hub):
    """Pending users are made by the login flow; here the in-process instance marks them pending directly."""
    instance = hub.instances["postgresql"]
    url, app = instance.url, instance.app
    admin_name = hub.new_admin()
    admin = bearer(hub.api.user_token(admin_name))
    alice, bob = hub.new_user("pend"), hub.new_user("pend")
    for name in (alice, bob):
        requests.get(url + "api/me", headers=bearer(hub.api.user_token(name)))
    # As another replica would: straight in the database, seen here once the user cache ages out.
    app.services.db.call(lambda s: s.execute(update(User).where(User.name.in_([alice, bob])).values(status="pending")))
    token = hub.api.user_token(alice)

    def refused() -> dict | None:
        r = requests.get(url + "api/me", headers=bearer(token))
        return r.json() if r.status_code == 403 else None

    assert wait_for(refused, what="the pending status")["error"]["code"] == "user_pending"
    pending = [u["name"] for u in requests.get(url + "api/users?status=pending", headers=admin).json()["users"]]
    assert alice in pending and bob in pending
    assert requests.post(url + f"api/users/{alice}/enable", headers=admin).status_code == 409
    assert requests.post(url + f"api/users/{alice}/approve", headers=admin).json()["status"] == "active"
    assert requests.get(url + "api/me", headers=bearer(token)).status_code == 200
    assert requests.post(url + f"api/users/{bob}/deny", headers=admin).json()["status"] == "disabled"
    assert requests.post(url + f"api/users/{bob}/approve", headers=admin).status_code == 409
    assert requests.get(url + "api/users?status=bogus", headers=admin).status_code == 400
    assert requests.post(url + f"api/users/{admin_name}/disable", headers=admin).status_code == 400  # no lock-out


def test_audit_log_one_entry_per_change(hub, instance):
    url = instance.url
    admin_name = hub.new_admin()
    admin = bearer(hub.api.user_token(admin_name))
    user = hub.new_user("aud")
    token = hub.api.user_token(user)
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat()

    key = requests.post(url + "api/keys", headers=bearer(token), json={"name": "mine"}).json()
    ISSUED.append(key["key"])
    requests.delete(url + f"api/keys/{key['id']}", headers=bearer(token))
    by_admin = requests.post(url + f"api/users/{user}/keys", headers=admin, json={"name": "given"}).json()
    ISSUED.append(by_admin["key"])
    requests.patch(url + f"api/users/{user}/grants", headers=admin, json={"features": {"usage": False}})
    requests.patch(url + f"api/users/{user}/grants", headers=admin, json={"features": {"usage": False}})  # no-op
    requests.post(url + f"api/users/{user}/disable", headers=admin)
    requests.post(url + f"api/users/{user}/disable", headers=admin)  # no-op
    requests.post(url + f"api/users/{user}/enable", headers=admin)
    acting = admin | {"X-Inference-Act-As": user}
    assert requests.get(url + "api/keys", headers=acting).status_code == 200
    assert requests.post(url + "api/keys", headers=acting, json={"name": "x"}).status_code == 403
    requests.delete(url + "api/keys", headers=acting)  # revokes the admin-issued key, as the user

    r = requests.get(url + "api/audit", params={"user": user, "since": since}, headers=admin)
    assert r.status_code == 200, r.text
    events = r.json()["events"]
    got = [(e["action"], e["actor"], e["acting_as"], e["subject"]) for e in reversed(events)]
    assert got == [
        ("key.create", user, None, user),
        ("key.revoke", user, None, user),
        ("key.create", admin_name, None, user),
        ("grants.set", admin_name, None, user),
        ("user.disable", admin_name, None, user),
        ("user.enable", admin_name, None, user),
        ("impersonate", admin_name, user, user),  # the start of the view-as session, not every request
        ("key.revoke", admin_name, user, user),  # a change made while acting names both
    ]
    assert all(e["client_ip"] for e in events)
    assert events[0]["details"] == {"id": by_admin["id"], "name": "given", "prefix": by_admin["prefix"]}
    only_actions = requests.get(url + f"api/audit?user={user}&action=user.disable", headers=admin).json()["events"]
    assert [e["action"] for e in only_actions] == ["user.disable"]
    assert requests.get(url + "api/audit?limit=0", headers=admin).status_code == 400
    assert requests.get(url + "api/audit?until=not-a-time", headers=admin).status_code == 400


def all_audit_events(url: str, admin: dict) -> list[dict]:
    """The whole audit log, paged backwards by time."""
    events: dict[int, dict] = {}
    until = None
    while True:
        params = {"limit": AUDIT_LIMIT_MAX} | ({"until": until} if until else {})
        page = requests.get(url + "api/audit", params=params, headers=admin).json()["events"]
        new = [e for e in page if e["id"] not in events]
        events.update((e["id"], e) for e in page)
        if len(page) < AUDIT_LIMIT_MAX or not new:
            return list(events.values())
        until = page[-1]["time"]


def test_the_audit_log_holds_no_secret(hub, instance):
    """Search the whole log for every key this module issued, and for anything shaped like a key at all."""
    url = instance.url
    admin = bearer(hub.api.user_token(hub.new_admin()))
    user = hub.new_user("sec")
    token = hub.api.user_token(user)
    new_key(url, token)
    new_key(url, token, features=["chat"])
    text = json.dumps(all_audit_events(url, admin))
    assert "key.create" in text
    for secret in ISSUED + [token]:
        assert secret not in text
        assert secret[8:30] not in text  # nor a long piece of one
    assert not [m for m in re.findall(r"jhi_[A-Za-z0-9_]+", text) if key_format.is_well_formed(m)]
    if instance.app is not None:  # the in-process instance: the stored hashes are not in the log either
        from sqlalchemy import select

        from hub_extension.orm import ApiKey

        hashes = instance.app.services.db.call(lambda s: list(s.execute(select(ApiKey.hashed)).scalars()))
        assert hashes and not [h for h in hashes if h in text]


def test_the_user_list_shows_each_users_usage(hub, instance):
    admin = bearer(hub.api.user_token(hub.new_admin()))
    user = hub.new_user("spender")
    r = requests.post(instance.url + "v1/chat/completions", json=CHAT, headers=bearer(hub.api.user_token(user)))
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["total_tokens"]

    def usage(path: str) -> dict | None:
        answer = requests.get(instance.url + path, headers=admin).json()
        found = answer["users"] if "users" in answer else [answer]
        return next(u["usage_30d"] for u in found if u["name"] == user)

    wait_for(lambda: usage("api/users") == {"requests": 1, "total_tokens": tokens}, timeout=30,
             what="the chat in the user list's usage")
    assert usage(f"api/users/{user}") == {"requests": 1, "total_tokens": tokens}


def test_cli(db_url, capsys):
    """`users list|disable|enable|approve|deny`, `grants show|set`, `audit` against a database."""
    db = Database(db_url, threads=1)
    db.upgrade()
    users = UserDirectory(db, cache_seconds=0, new_user_status="pending")
    for name in ("cli-ann", "cli-bob"):
        asyncio.run(users.seen_from_hub({"name": name}))
    # cli-ann's use: two hours this month, and one long ago that the last 30 days leave out.
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    for hour, prompt in ((now, 1000), (now - dt.timedelta(hours=5), 234), (now - dt.timedelta(days=60), 99)):
        db.call(lambda s, h=hour, p=prompt: s.add(UsageRollup(
            hour=h, day=h.strftime("%Y-%m-%d"), month=h.strftime("%Y-%m"), user="cli-ann", model="tiny-chat",
            key_id=0, endpoint="/v1/chat/completions", requests=2, prompt_tokens=p, completion_tokens=1)))
    db.close()

    def cli(*argv) -> tuple[int, str]:
        return run_command(capsys, *argv, "--db-url", db_url)

    code, out = cli("users", "list")
    assert code == 0 and "cli-ann" in out and "pending" in out and "TOKENS_30D" in out
    assert re.search(r"^cli-ann\s.*\s1236\s*$", out, re.M) and re.search(r"^cli-bob\s.*\s0\s*$", out, re.M), out
    code, out = cli("users", "list", "--json")
    assert {u["name"]: u["usage_30d"] for u in json.loads(out)} == {
        "cli-ann": {"requests": 4, "total_tokens": 1236}, "cli-bob": {"requests": 0, "total_tokens": 0}}
    assert cli("users", "approve", "cli-ann") == (0, "cli-ann: active\n")
    assert cli("users", "enable", "cli-bob")[0] == 1  # pending: approve, not enable
    assert cli("users", "disable", "cli-bob") == (0, "cli-bob: disabled\n")
    assert cli("users", "enable", "cli-bob") == (0, "cli-bob: active\n")
    assert cli("users", "disable", "nobody")[0] == 1
    code, out = cli("users", "list", "--status", "active", "--json")
    assert code == 0 and {u["name"] for u in json.loads(out)} == {"cli-ann", "cli-bob"}

    code, out = cli("grants", "set", "--group", "staff", "--feature", "embeddings=allow", "--model", "minilm=allow",
                    "--model", "tiny-chat=allow")
    assert code == 0 and json.loads(out) == {"features": {"embeddings": True},
                                             "models": {"minilm": True, "tiny-chat": True}}
    code, out = cli("grants", "set", "--user", "cli-ann", "--feature", "chat=deny")
    assert code == 0 and json.loads(out) == {"features": {"chat": False}, "models": {}}
    assert cli("grants", "set", "--user", "cli-ann", "--feature", "flying=allow")[0] == 1
    assert cli("grants", "set", "--user", "cli-ann", "--feature", "chat=maybe")[0] == 1
    code, out = cli("grants", "show", "--user", "cli-ann")
    assert code == 0 and re.search(r"chat\s+False\s+user_grant", out), out
    code, out = cli("grants", "show", "--user", "cli-ann", "--json")
    assert json.loads(out)["effective"]["features"]["chat"]["source"] == "user_grant"

    code, out = cli("audit", "--json")
    events = json.loads(out)
    actor = f"cli:{getpass.getuser()}"
    assert [(e["action"], e["subject"]) for e in reversed(events)] == [
        ("user.approve", "cli-ann"),
        ("user.disable", "cli-bob"),
        ("user.enable", "cli-bob"),
        ("grants.set", "group:staff"),
        ("grants.set", "cli-ann"),
    ]
    assert {e["actor"] for e in events} == {actor}
    code, out = cli("audit", "--user", "cli-bob", "--action", "user.disable", "--json")
    assert [e["action"] for e in json.loads(out)] == ["user.disable"]
    assert cli("audit", "--since", "yesterday")[0] == 1

"""API keys end to end through the real Hub proxy, on SQLite and PostgreSQL instances."""

from __future__ import annotations

import time

import requests
from conftest import CACHE_SECONDS, HUB_SYNC_SECONDS, bearer, user_action, wait_for

from hub_extension import key_format


def test_key_lifecycle(hub, instance):
    user = hub.new_user()
    token = hub.api.user_token(user)

    me = requests.get(instance.url + "api/me", headers=bearer(token))
    assert me.status_code == 200, me.text
    assert me.json()["name"] == user and me.json()["authenticated_via"] == "hub_token"

    created = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "laptop"})
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    assert secret.startswith("jhi_") and key_format.is_well_formed(secret)

    # Use it, both header forms.
    for headers in (bearer(secret), {"x-api-key": secret}):
        r = requests.get(instance.url + "v1/models", headers=headers)
        assert r.status_code == 200, r.text
    assert requests.get(instance.url + "api/me", headers=bearer(secret)).json()["authenticated_via"] == "api_key"

    # The list shows only the prefix.
    listed = requests.get(instance.url + "api/keys", headers=bearer(token)).json()["keys"]
    assert [k["prefix"] for k in listed] == [key_format.display_prefix(secret)]
    assert secret not in str(listed)

    # Revoke: refused on the very next request.
    key_id = created.json()["id"]
    assert requests.delete(instance.url + f"api/keys/{key_id}", headers=bearer(token)).status_code == 204
    r = requests.get(instance.url + "v1/models", headers=bearer(secret))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # Revoking again, or an unknown id, is 404.
    assert requests.delete(instance.url + f"api/keys/{key_id}", headers=bearer(token)).status_code == 404


def test_other_users_keys_are_404(hub, instance):
    alice, bob = hub.new_user(), hub.new_user()
    a_token, b_token = hub.api.user_token(alice), hub.api.user_token(bob)
    key = requests.post(instance.url + "api/keys", headers=bearer(a_token), json={"name": "k"}).json()
    r = requests.delete(instance.url + f"api/keys/{key['id']}", headers=bearer(b_token))
    assert r.status_code == 404
    assert requests.get(instance.url + "v1/models", headers=bearer(key["key"])).status_code == 200


def test_revoke_all(hub, instance):
    user = hub.new_user()
    token = hub.api.user_token(user)
    secrets_ = [requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": f"k{i}"}).json()["key"] for i in range(3)]
    r = requests.delete(instance.url + "api/keys", headers=bearer(token))
    assert r.json() == {"revoked": 3}
    for s in secrets_:
        assert requests.get(instance.url + "v1/models", headers=bearer(s)).status_code == 401


def test_user_deleted_in_hub_loses_access_within_the_bound(hub, instance):
    user = hub.new_user()
    token = hub.api.user_token(user)
    secret = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "k"}).json()["key"]
    assert requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 200
    hub.api.delete_user(user)
    # Configured bound: HUB_SYNC_SECONDS; poll generously (tests prove it happens, not how fast).
    wait_for(lambda: requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 401,
             timeout=30 + 10 * HUB_SYNC_SECONDS, interval=0.2, what="key refused after Hub deletion")
    wait_for(lambda: requests.get(instance.url + "v1/models", headers=bearer(token)).status_code in (401, 403),
             timeout=30 + 10 * CACHE_SECONDS, interval=0.2, what="Hub token refused after deletion")
    # A new person given the same name starts with nothing of the old one's: no keys, and the old key stays dead.
    hub.api.create_user(user)
    new_token = hub.api.user_token(user)
    wait_for(lambda: requests.get(instance.url + "api/keys?include_revoked=true", headers=bearer(new_token)).status_code
             == 200, timeout=30 + 10 * CACHE_SECONDS, interval=0.2, what="the new user admitted")
    assert requests.get(instance.url + "api/keys?include_revoked=true", headers=bearer(new_token)).json() == {"keys": []}
    assert requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 401


def test_blocked_group_loses_access(hub, instance):
    user = hub.new_user()
    token = hub.api.user_token(user)
    secret = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "k"}).json()["key"]
    hub.api.add_to_group("inference-blocked", user)
    wait_for(lambda: requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 401,
             timeout=30, interval=0.2, what="key refused after block")
    # The user's Hub token is refused too (once its cached identity ages out), and using it must not
    # "restore" the user: the key stays refused.
    wait_for(lambda: requests.get(instance.url + "v1/models", headers=bearer(token)).status_code == 401,
             timeout=30, interval=0.2, what="Hub token refused after block")
    assert requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 401
    hub.api.remove_from_group("inference-blocked", user)
    wait_for(lambda: requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 200,
             timeout=30, interval=0.2, what="key accepted after unblock")


def test_expired_key_is_refused(hub):
    instance = hub.instances["postgresql"]
    app = instance.app
    user = hub.new_user()
    token = hub.api.user_token(user)
    created = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "short", "expires_in_days": 1}).json()
    # Move its expiry into the past in the database, and drop the cache entry as a replica's TTL would.
    from sqlalchemy import update

    from hub_extension.orm import ApiKey, utcnow

    app.services.db.call(lambda s: s.execute(update(ApiKey).where(ApiKey.id == created["id"]).values(expires_at=utcnow())))
    app.services.keys.forget_all()
    r = requests.get(instance.url + "v1/models", headers=bearer(created["key"]))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_bad_checksum_is_refused_without_a_database_query(hub):
    from sqlalchemy import event

    instance = hub.instances["postgresql"]
    engine = instance.app.services.db.engine
    user = hub.new_user()
    token = hub.api.user_token(user)
    secret = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "k"}).json()["key"]
    typo = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    made_up = key_format.PREFIX + "x" * (key_format.KEY_LENGTH - len(key_format.PREFIX))
    # Only key lookups count: the service's periodic jobs (usage flush, quota sync, Hub sync) share the engine.
    lookups: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("SELECT") and "api_keys" in statement:
            lookups.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        for bad in (typo, made_up, "jhi_short"):
            r = requests.get(instance.url + "v1/models", headers=bearer(bad))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert lookups == [], bad
        # The listener does see a real lookup, so the empty list above means something.
        instance.app.services.keys.forget_all()
        assert requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 200
        assert lookups
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_disabled_user_is_refused_at_once(hub):
    instance = hub.instances["postgresql"]
    user = hub.new_user()
    token = hub.api.user_token(user)
    secret = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "k"}).json()["key"]
    assert requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 200
    app = instance.app
    user_action(app, user, "disable")
    for credential in (secret, token):
        r = requests.get(instance.url + "v1/models", headers=bearer(credential))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "user_disabled"
    user_action(app, user, "enable")
    assert requests.get(instance.url + "v1/models", headers=bearer(secret)).status_code == 200


def test_key_limits_and_validation(hub):
    instance = hub.instances["postgresql"]
    user = hub.new_user()
    headers = bearer(hub.api.user_token(user))
    for body, param in (
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"name": "k", "expires_in_days": 0}, "expires_in_days"),
        ({"name": "k", "expires_in_days": 100000}, "expires_in_days"),
        ({"name": "k", "expires_in_days": None}, "expires_in_days"),  # the maximum lifetime forbids "never"
        ({"name": "k", "features": "chat"}, "features"),
        ({"name": "k", "features": ["teleport"]}, "features"),
        ({"name": "k", "models": [1]}, "models"),
        ({"name": "k", "colour": "red"}, "colour"),
    ):
        r = requests.post(instance.url + "api/keys", headers=headers, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    for raw in (b"{not json", b"[1, 2]", b""):
        r = requests.post(instance.url + "api/keys", headers=headers, data=raw)
        assert r.status_code == 400, raw
    r = requests.post(instance.url + "api/keys", headers=headers, data=b'{"name": "' + b"x" * (9 * 1024 * 1024) + b'"}')
    assert r.status_code == 413
    limit = app_limit = instance.app.services.keys.max_keys_per_user
    for i in range(limit):
        assert requests.post(instance.url + "api/keys", headers=headers, json={"name": f"k{i}"}).status_code == 201
    r = requests.post(instance.url + "api/keys", headers=headers, json={"name": "one too many"})
    assert r.status_code == 409 and str(app_limit) in r.json()["error"]["message"]
    assert len(requests.get(instance.url + "api/keys", headers=headers).json()["keys"]) == limit


def test_no_key_in_the_service_logs(hub, caplog):
    """Keys used every which way never reach a log line (the Hub-managed instance logs into the Hub's log)."""
    issued = []
    for instance in hub.instances.values():
        token = hub.api.user_token(hub.new_user("log"))
        made = requests.post(instance.url + "api/keys", headers=bearer(token), json={"name": "log"}).json()
        issued.append(made["key"])
        requests.get(instance.url + "v1/models", headers=bearer(made["key"]))
        requests.get(instance.url + f"v1/models?api_key={made['key']}")
        requests.get(instance.url + "no/such/route", headers={"x-api-key": made["key"]})
        requests.post(instance.url + "v1/chat/completions", headers=bearer(made["key"]), data=b"{bad json")
        requests.delete(instance.url + f"api/keys/{made['id']}", headers=bearer(token))
        requests.get(instance.url + "v1/models", headers=bearer(made["key"]))  # revoked now
    time.sleep(1)
    text = hub.log_path.read_text(errors="replace") + caplog.text
    for key in issued:
        assert key not in text

"""State changes that must hold at once, through the Hub: admin power follows the credential, reads write nothing,
client addresses come only from trusted proxies, and odd input in paths and queries is a 400, never a 500."""

from __future__ import annotations

import requests
from conftest import bearer, new_key

from hub_extension.administration import ACT_AS_HEADER


def audit(url: str, admin: dict, **params) -> list[dict]:
    r = requests.get(url + "api/audit", params=params, headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["events"]


def test_admin_power_follows_the_credentials_scopes(hub, instance):
    """An admin's Hub token narrowed to `access:services` administers nothing; a narrowed key cannot act as anyone."""
    url = instance.url
    admin, user = hub.new_admin(), hub.new_user()
    full = bearer(hub.api.user_token(admin))
    assert requests.get(url + "api/users", headers=full).status_code == 200
    narrowed_token = bearer(hub.api.user_token(admin, scopes=[f"access:services!service={instance.name}"]))
    assert requests.get(url + "api/me", headers=narrowed_token).json()["role"] == "user"
    assert requests.get(url + "api/users", headers=narrowed_token).status_code == 403
    r = requests.post(url + f"api/users/{user}/keys", headers=narrowed_token, json={"name": "stolen"})
    assert r.status_code == 403, r.text
    assert requests.get(url + "api/me", headers={**narrowed_token, ACT_AS_HEADER: user}).status_code == 403

    narrowed_key = bearer(new_key(url, hub.api.user_token(admin), features=["chat", "keys"]))
    assert requests.get(url + "api/users", headers=narrowed_key).status_code == 403
    assert requests.get(url + "api/me", headers={**narrowed_key, ACT_AS_HEADER: user}).status_code == 403
    full_key = bearer(new_key(url, hub.api.user_token(admin)))
    r = requests.get(url + "api/me", headers={**full_key, ACT_AS_HEADER: user})
    assert r.status_code == 200 and r.json()["name"] == user, r.text


def test_reads_write_nothing(hub, instance):
    """Listing an unseen user's keys makes no user row; view-as is audited once per session, not per GET."""
    url = instance.url
    admin_name, unseen, user = hub.new_admin(), hub.new_user("unseen"), hub.new_user()
    admin = bearer(hub.api.user_token(admin_name))
    assert requests.get(url + f"api/users/{unseen}/keys", headers=admin).json() == {"keys": []}
    assert requests.get(url + f"api/users/{unseen}", headers=admin).json()["status"] is None  # still no row
    requests.get(url + "api/me", headers=bearer(hub.api.user_token(user)))
    as_user = {**admin, ACT_AS_HEADER: user}
    for _ in range(5):
        assert requests.get(url + "api/keys", headers=as_user).status_code == 200
        assert requests.get(url + "api/me", headers=as_user).json()["acting_admin"] == admin_name
    events = audit(url, admin, user=user, action="impersonate")
    assert len(events) == 1 and events[0]["actor"] == admin_name


def test_client_address_is_not_taken_from_x_real_ip(hub, instance):
    """The client's claim in X-Real-Ip never reaches the audit log: forwarding headers count only from a trusted
    proxy, and then only X-Forwarded-For (the Hub's proxy appends the real peer; `test_net.py` has the rules)."""
    url = instance.url
    admin_name = hub.new_admin()
    admin = bearer(hub.api.user_token(admin_name))
    r = requests.post(url + "api/keys", headers={**admin, "X-Real-Ip": "203.0.113.66"}, json={"name": "k"})
    assert r.status_code == 201
    event = audit(url, admin, user=admin_name, action="key.create", limit=1)[0]
    assert event["client_ip"] in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), event


def test_odd_ids_queries_and_dates_are_client_errors(hub, instance):
    url = instance.url
    admin = bearer(hub.api.user_token(hub.new_admin()))
    token = bearer(hub.api.user_token(hub.new_user()))
    for key_id in ("²", "١٢", "%F0%9F%98%80", "9" * 40):
        assert requests.delete(url + f"api/keys/{key_id}", headers=token).status_code == 404
    for params in ({"limit": "²"}, {"limit": "١٠"}, {"limit": "501"}, {"since": "0001-01-01T00:00:00+14:00"},
                   {"until": "9999-12-31T23:59:59-14:00"}, {"since": "99999-01-01"}):
        r = requests.get(url + "api/audit", params=params, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] in params, (params, r.text)


def test_sizes_a_user_writes_are_bounded(hub, instance):
    url = instance.url
    token = bearer(hub.api.user_token(hub.new_user()))
    for body in ({"name": "k", "models": [f"m{i}" for i in range(65)]}, {"name": "k", "models": ["m" * 129]},
                 {"name": "x" * 129}, {"name": "line\nbreak"}, {"name": "k", "features": ["chat"] * 1000},
                 {"name": "k", "expires_in_days": 10**12}):
        r = requests.post(url + "api/keys", headers=token, json=body)
        assert r.status_code == 400, (body, r.text)

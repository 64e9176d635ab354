"""Quotas through the Hub with the openai SDK, on both instances: an admin's limit applies at once, refuses with
OpenAI's 429s (`insufficient_quota`, `rate_limit_exceeded`) and `Retry-After`, shows in /api/me/quota, and is
audited. Requests go through a narrowed key, which counts against its owner."""

from __future__ import annotations

import openai
import pytest
import requests
from conftest import bearer, new_key, wait_for

MESSAGES = [{"role": "user", "content": "hi"}]


def setup(hub, instance, quota: dict) -> tuple[str, dict, openai.OpenAI, dict]:
    """A fresh user with `quota` set by a fresh admin: (user, the user's headers, an SDK client on a narrowed
    key of theirs, the admin's headers)."""
    admin = bearer(hub.api.user_token(hub.new_admin()))
    user = hub.new_user("quota")
    token = hub.api.user_token(user)
    key = new_key(instance.url, token, features=["chat"], models=["tiny-chat"])
    r = requests.put(instance.url + f"api/users/{user}/quota", headers=admin, json=quota, timeout=30)
    assert r.status_code == 200, r.text
    assert all(r.json()[name] == value for name, value in quota.items())
    client = openai.OpenAI(base_url=instance.url + "v1", api_key=key, max_retries=0, timeout=120)
    return user, bearer(token), client, admin


def my_quota(instance, headers: dict) -> dict:
    r = requests.get(instance.url + "api/me/quota", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["limits"]


def test_tokens_per_day_refuses_with_insufficient_quota(hub, instance):
    limit = 100
    user, headers, client, admin = setup(hub, instance, {"tokens_per_day": limit})
    spent = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(30):
            r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8)
            spent += r.usage.total_tokens
    error = info.value
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota", error.body
    assert "tokens_per_day" in error.message
    assert 1 <= int(error.response.headers["retry-after"]) <= 24 * 3600
    assert limit - 9 < spent < limit + 30  # stopped by the budget (9: this request's worst case as estimated)
    client.close()

    def shown():  # the database view catches up with what this process counted (within a sync)
        window = my_quota(instance, headers)["tokens_per_day"]
        return window if window["used"] == spent else None

    window = wait_for(shown, timeout=30, what="the day's use in /api/me/quota")
    assert window["limit"] == limit and window["remaining"] == max(0, limit - spent)
    assert window["source"] == "user" and window["resets_at"].endswith("T00:00:00Z")
    events = requests.get(instance.url + f"api/audit?user={user}&action=quota.set", headers=admin,
                          timeout=30).json()["events"]
    assert len(events) == 1 and events[0]["subject"] == user
    assert events[0]["details"]["changes"] == {"tokens_per_day": {"from": None, "to": limit}}
    # The admin lifts it: applies at once.
    r = requests.delete(instance.url + f"api/users/{user}/quota", headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["effective"]["limits"]["tokens_per_day"]["limit"] is None
    r = requests.post(instance.url + "v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_requests_per_minute_refuses_with_rate_limit_exceeded(hub, instance):
    user, headers, client, _admin = setup(hub, instance, {"requests_per_minute": 2})
    for _ in range(2):
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=1, stream=True)
    error = info.value
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_error", error.body
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    client.close()

    def shown():  # the owner's, though the key made them (a second read settles a sync that raced a flush)
        window = my_quota(instance, headers)["requests_per_minute"]
        return window if window["used"] == 2 else None

    window = wait_for(shown, timeout=30, what="the minute's requests in /api/me/quota")
    assert (window["limit"], window["remaining"]) == (2, 0) and window["source"] == "user"

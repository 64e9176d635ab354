"""An upstream backend (E6): the PostgreSQL instance forwards `upstream-*` models to the SQLite instance.

Both are our own service behind the real Hub proxy; identity, permissions and usage of the front instance
still apply to forwarded requests.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from urllib.parse import urlsplit

import openai
import pytest
import requests

MESSAGES = [{"role": "user", "content": "What does the os module do?"}]


@pytest.fixture
def front(hub):
    instance = hub.instances["postgresql"]
    user = hub.new_user("up")
    token = hub.api.user_token(user)
    key = requests.post(instance.url + "api/keys", headers={"Authorization": f"Bearer {token}"}, json={"name": "k"}).json()["key"]
    client = openai.OpenAI(base_url=instance.url + "v1", api_key=key, max_retries=0, timeout=120)
    yield instance, user, client
    client.close()


def test_forwarded_chat_matches_the_upstream_model(front):
    instance, user, client = front
    assert {"upstream-chat", "upstream-embed"} <= {m.id for m in client.models.list()}
    events: list[dict] = []
    instance.app.services.usage_sinks.append(events.append)
    try:
        local = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0)
        remote = client.chat.completions.create(model="upstream-chat", messages=MESSAGES, max_tokens=10, temperature=0)
        assert remote.choices[0].message.content == local.choices[0].message.content
        assert remote.usage.completion_tokens == local.usage.completion_tokens
        stream = client.chat.completions.create(
            model="upstream-chat", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            else:
                usage = chunk.usage
        assert text == local.choices[0].message.content and usage.completion_tokens == local.usage.completion_tokens
        emb = client.embeddings.create(model="upstream-embed", input=["a cat", "a kitten"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    finally:
        instance.app.services.usage_sinks.remove(events.append)
    forwarded = [e for e in events if e["model"] == "upstream-chat"]
    assert len(forwarded) == 2 and all(e["user"] == user and e["status"] == 200 for e in forwarded)
    assert forwarded[0]["completion_tokens"] == 10


def test_permissions_apply_to_forwarded_models(hub, front):
    instance, user, client = front
    admin = {"Authorization": "Bearer " + hub.api.user_token(hub.new_admin())}
    r = requests.put(instance.url + f"api/users/{user}/grants", headers=admin, json={"models": {"upstream-chat": False}})
    assert r.status_code == 200, r.text
    assert "upstream-chat" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="upstream-chat", messages=MESSAGES, max_tokens=2)
    assert client.embeddings.create(model="upstream-embed", input="still allowed").data


def test_a_client_leaving_a_big_embedding_request_stops_it_and_others_are_served_meanwhile(hub, front):
    """Through the Hub's proxy: a small request from another user is answered between the batches of a big
    one, and when the big request's client hangs up, its remaining batches are never computed."""
    instance, _, client = front
    models = instance.app.services.models
    backend = asyncio.run_coroutine_threadsafe(models.get("minilm"), instance.app._loop).result(60)
    batches = [0]
    hook = backend.model.register_forward_pre_hook(lambda m, a: batches.__setitem__(0, batches[0] + 1))
    other = hub.api.user_token(hub.new_user("small"))
    key = requests.post(instance.url + "api/keys", headers={"Authorization": f"Bearer {other}"}, json={"name": "k"})
    small = openai.OpenAI(base_url=instance.url + "v1", api_key=key.json()["key"], max_retries=0, timeout=120)
    texts = [f"{i}: " + "the quick brown fox jumps over the lazy dog " * 8 for i in range(2000)]  # 63 batches
    url = urlsplit(instance.url + "v1/embeddings")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request(
            "POST", url.path, json.dumps({"model": "minilm", "input": texts}),
            {"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"},
        )
        wait_until(lambda: batches[0] >= 2)
        assert len(small.embeddings.create(model="minilm", input="a cat").data) == 1
        assert batches[0] < 63 and models.in_flight("minilm") >= 2000  # the big one is still running
        conn.close()  # the big request's client hangs up
        wait_until(lambda: models.in_flight("minilm") == 0)
        left_at = batches[0]
        assert len(small.embeddings.create(model="minilm", input="a dog").data) == 1
        assert batches[0] - left_at <= 2, (left_at, batches[0])  # the batch running then, and ours
    finally:
        conn.close()
        small.close()
        hook.remove()


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

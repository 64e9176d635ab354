"""An upstream backend (E6): the PostgreSQL instance forwards `upstream-*` models to the SQLite instance.

Both are our own service behind the real Hub proxy; identity, permissions and usage of the front instance
still apply to forwarded requests.
"""

from __future__ import annotations

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

"""The real openai SDK against the service through the real Hub proxy, on both instances."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading

import httpx
import openai
import pytest
import requests
from conftest import user_action, wait_for

MESSAGES = [{"role": "user", "content": "Say something about modules."}]


@pytest.fixture
def client(hub, instance):
    user = hub.new_user("sdk")
    token = hub.api.user_token(user)
    key = requests.post(instance.url + "api/keys", headers={"Authorization": f"Bearer {token}"}, json={"name": "sdk"}).json()["key"]
    c = openai.OpenAI(base_url=instance.url + "v1", api_key=key, max_retries=0, timeout=120)
    c.user_name = user
    yield c
    c.close()


def test_models_list_and_retrieve(client):
    names = {m.id for m in client.models.list()}
    assert {"tiny-chat", "tiny-generate", "minilm"} <= names
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage_matches_non_streaming(client):
    full = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            usage = chunk.usage
    assert chunks > 2
    assert text == full.choices[0].message.content
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_string_and_list(client):
    one = client.completions.create(model="tiny-chat", prompt="import json", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    two = client.completions.create(model="tiny-chat", prompt=["a", "b"], max_tokens=5, temperature=0)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_embeddings_related_pair_scores_higher(client):
    texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly tax filing deadlines."]
    r = client.embeddings.create(model="minilm", input=texts)
    vecs = [d.embedding for d in r.data]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=False))  # noqa: E731
    assert len(vecs[0]) == 384 and abs(dot(vecs[0], vecs[0]) - 1) < 1e-4
    assert dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2])
    assert r.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model="minilm", input="A cat sits on the mat.", encoding_format="base64")
    decoded = struct.unpack("<384f", base64.b64decode(b64.data[0].embedding))  # float32, little-endian
    assert list(decoded[:5]) == pytest.approx(vecs[0][:5], abs=1e-5)


def test_sdk_exception_types(hub, instance, client):
    bad = openai.OpenAI(base_url=instance.url + "v1", api_key="jhi_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=MESSAGES, model=None)  # no model: never a default one
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens="many")
    assert e.value.param == "max_tokens"
    # Harmless parameters are accepted.
    client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2, user="x", metadata={"a": "b"})


def test_disabled_user_gets_permission_denied(hub):
    instance = hub.instances["postgresql"]
    user = hub.new_user("off")
    token = hub.api.user_token(user)
    key = requests.post(instance.url + "api/keys", headers={"Authorization": f"Bearer {token}"}, json={"name": "k"}).json()["key"]
    app = instance.app
    user_action(app, user, "disable")
    c = openai.OpenAI(base_url=instance.url + "v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        c.models.list()


def test_full_queue_is_a_rate_limit_error_with_retry_after(client):
    """tiny-busy decodes one request and queues one; a burst beyond that is refused with 429."""
    results: list = []

    def call():
        try:
            client.chat.completions.create(model="tiny-busy", messages=MESSAGES, max_tokens=64, temperature=0)
            results.append("ok")
        except openai.RateLimitError as e:
            results.append(e.response.headers.get("retry-after"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refusals = [r for r in results if r != "ok"]
    assert refusals and all(r and int(r) >= 1 for r in refusals), results
    assert "ok" in results


def test_sixteen_concurrent_streams_match_sequential(hub):
    instance = hub.instances["postgresql"]
    user = hub.new_user("par")
    token = hub.api.user_token(user)
    key = requests.post(instance.url + "api/keys", headers={"Authorization": f"Bearer {token}"}, json={"name": "k"}).json()["key"]
    prompts = [f"Question number {i} about the os module?" for i in range(16)]

    async def one(c, prompt):
        stream = await c.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            else:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=instance.url + "v1", api_key=key, max_retries=0, timeout=300) as c:
            sequential = [await one(c, p) for p in prompts]
            concurrent = await asyncio.gather(*(one(c, p) for p in prompts))
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    assert concurrent == sequential


def test_client_disconnect_frees_the_slot(hub):
    instance = hub.instances["postgresql"]
    user = hub.new_user("dc")
    token = hub.api.user_token(user)
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
    models = instance.app.services.models
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", instance.url + "v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert models.in_flight("tiny-chat") >= 1
        # closed mid-stream
    wait_for(lambda: models.in_flight("tiny-chat") == 0, 30, 0.05, "the engine to drop the request")
    c = openai.OpenAI(base_url=instance.url + "v1", api_key=token, max_retries=0)
    assert c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3).choices

"""Hostile input through the Hub: a 400 in OpenAI's envelope, never a 500; clients that hang up are a 499."""

from __future__ import annotations

import json
import socket
import urllib.parse

import openai
import pytest
import requests
from conftest import wait_for

from hub_extension import protocol
from hub_extension.json_body import MAX_DEPTH

MESSAGES = [{"role": "user", "content": "Say something about modules."}]


@pytest.fixture
def caller(hub, instance):
    """A new user's name, Hub token and a key of theirs."""
    user = hub.new_user("hostile")
    token = hub.api.user_token(user)
    auth = {"Authorization": f"Bearer {token}"}
    key = requests.post(instance.url + "api/keys", headers=auth, json={"name": "k"}, timeout=30).json()["key"]
    return user, token, key


def post_raw(url: str, token: str, body: bytes) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return requests.post(url, data=body, headers=headers, timeout=60)


def assert_envelope_400(r: requests.Response, says: str, param: str | None = None) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert says in error["message"] and error["param"] == param


DEEP = ("[" * 1000 + "]" * 1000).encode()


@pytest.mark.parametrize("path", ["v1/chat/completions", "v1/completions", "v1/embeddings", "api/keys"])
def test_deep_json_is_a_400_everywhere(instance, caller, path):
    _, token, _ = caller
    r = post_raw(instance.url + path, token, b'{"model": "tiny-chat", "messages": ' + DEEP + b"}")
    assert_envelope_400(r, f"more than {MAX_DEPTH} levels deep")


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "v1/chat/completions",
            {"model": "tiny-chat", "messages": [{"role": "user", "content": "a\ud800"}]},
            "messages[0].content",
        ),
        ("v1/chat/completions", {"model": "tiny-chat", "messages": MESSAGES, "stop": ["\udc00"]}, "stop[0]"),
        ("v1/completions", {"model": "tiny-chat", "prompt": ["ok", "\ud800"]}, "prompt[1]"),
        ("v1/embeddings", {"model": "minilm", "input": "\udfff"}, "input"),
        ("v1/embeddings", {"model": "minilm", "input": "x", "metadata": {"k\ud800": 1}}, "metadata"),
        ("api/keys", {"name": "laptop\ud800"}, "name"),
    ],
)
def test_lone_surrogates_are_a_400(instance, caller, path, body, param):
    _, token, _ = caller
    r = post_raw(instance.url + path, token, json.dumps(body).encode())  # ensure_ascii: sent as \ud800
    assert_envelope_400(r, "lone UTF-16 surrogate", param)


def test_oversized_lists_are_a_400(instance, caller):
    _, _, key = caller
    with openai.OpenAI(base_url=instance.url + "v1", api_key=key, max_retries=0, timeout=120) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="minilm", input=["a"] * (protocol.MAX_INPUTS + 1))
        assert e.value.param == "input" and "at most 2048 texts" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-chat", prompt=[[1] * 1000] * 300, max_tokens=1)
        assert e.value.param == "prompt" and "token ids" in e.value.message


# -- clients that hang up ---------------------------------------------------------------------------


@pytest.fixture
def usage_events(hub):
    """Usage events the in-process (PostgreSQL) instance records while the test runs."""
    events: list[dict] = []
    sinks = hub.instances["postgresql"].app.services.usage_sinks
    sinks.append(events.append)
    yield events
    sinks.remove(events.append)


def hang_up_once_busy(url: str, token: str, body: dict, busy) -> None:
    """Send a request on a plain socket, wait until the engine works on it, then close the connection."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode()
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(head.encode() + data)
        wait_for(busy, 60, 0.01, "the engine to take the request")


@pytest.mark.parametrize(
    "path, body, model",
    [
        (
            "v1/chat/completions",
            {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 400, "temperature": 0},
            "tiny-chat",
        ),
        (
            "v1/completions",
            {"model": "tiny-chat", "prompt": "import os", "max_tokens": 400, "temperature": 0},
            "tiny-chat",
        ),
        (
            "v1/embeddings",
            {"model": "minilm", "input": ["a sentence about modules and packages " * 20] * 2048},
            "minilm",
        ),
    ],
)
def test_non_streaming_client_that_hangs_up_is_recorded_as_499(hub, usage_events, path, body, model):
    instance = hub.instances["postgresql"]  # the in-process one, whose engine and usage events the test sees
    user = hub.new_user("gone")
    token = hub.api.user_token(user)
    models = instance.app.services.models
    hang_up_once_busy(instance.url + path, token, body, lambda: models.in_flight(model) >= 1)

    def mine() -> list[int]:
        return [e["status"] for e in usage_events if e["user"] == user and e["endpoint"] == "/" + path]

    wait_for(mine, 30, 0.05, "the usage event")
    assert mine() == [499]
    wait_for(lambda: models.in_flight(model) == 0, 30, 0.05, "the engine to drop the request")

"""The kernel extension against the real Hub and service: a kernel's token (the `server` role's scopes, as the
Hub gives them) carries its owner's inference rights and no more, and `%load_ext kernel_ext` in an in-process
IPython with a kernel's variables finds the service, lists models and streams a `%%chat` answer.

A real single-user server is not spawned here: the token is asked of the Hub's REST API with the scopes the
spawner asks for (test_kernel_ext.py checks the role lists them).
"""

from __future__ import annotations

import os

import pytest
import requests
from conftest import TEST_ROLES, bearer
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from test_kernel_ext import kernel_env  # noqa: F401 (a fixture)
from traitlets.config import Config

import kernel_ext
from hub_extension.hub_config import access_scope, configure
from kernel_ext.discovery import find_service

# None of a kernel's variables set before each test; all the test and the extension set undone after it.
pytestmark = pytest.mark.usefixtures("kernel_env")


def kernel_token(hub, user: str) -> tuple[str, set[str]]:
    """A token like the one the Hub gives `user`'s server, and the scopes the Hub left out as not held.

    The spawner asks for the `server` role's scopes and the Hub keeps those the owner holds; its REST API
    instead refuses the token (400, naming the scopes not held), so ask again without them.
    """
    c = Config()
    configure(c, roles=TEST_ROLES)
    role = next(r for r in c.JupyterHub.load_roles if r["name"] == "server")
    wanted = {s + f"={user}/" if s.endswith("!server") else s for s in role["scopes"]}
    wanted.add(access_scope("inference-pg"))  # the test Hub's second instance (conftest)
    r = requests.post(f"{hub.url}/hub/api/users/{user}/tokens", json={"scopes": sorted(wanted), "note": "kernel"},
                      headers={"Authorization": f"token {hub.api.token}"}, timeout=30)
    if r.status_code == 400:
        message = r.json()["message"]
        assert message.startswith("Not assigning requested scopes "), message
        dropped = set(message.removeprefix("Not assigning requested scopes ").split(" not held by ")[0].split(","))
        return hub.api.user_token(user, scopes=sorted(wanted - dropped)), dropped
    r.raise_for_status()
    return r.json()["token"], set()


def test_a_kernel_token_carries_its_owners_inference_rights_and_no_more(hub, instance):
    member = hub.new_admin()  # in the group whose Hub role grants custom:inference:admin
    hub.api.add_to_group("embedders", member)  # ... and in the one granting embeddings and model minilm
    token, dropped = kernel_token(hub, member)
    assert not {"custom:inference:admin", "custom:inference:embeddings", "custom:inference:model:minilm"} & dropped
    assert requests.get(instance.url + "api/users", headers=bearer(token), timeout=30).status_code == 200
    perms = requests.get(instance.url + "api/me/permissions", headers=bearer(token), timeout=30).json()
    assert perms["features"]["embeddings"]["source"] == "hub_scope"
    assert perms["models"]["minilm"]["source"] == "hub_scope"

    plain = hub.new_user()
    token, dropped = kernel_token(hub, plain)
    assert {"custom:inference:admin", "custom:inference:embeddings", "custom:inference:model:minilm"} <= dropped
    assert requests.get(instance.url + "api/users", headers=bearer(token), timeout=30).status_code == 403
    perms = requests.get(instance.url + "api/me/permissions", headers=bearer(token), timeout=30).json()
    assert perms["features"]["embeddings"]["source"] == "default"
    # What the token does have still reaches the service as its user.
    me = requests.get(instance.url + "api/me", headers=bearer(token), timeout=30).json()
    assert (me["name"], me["role"]) == (plain, "user")


def test_discovery_through_the_real_hub(hub, instance):
    """The Hub will not tell a kernel's token the service's URL (no `read:services`): the public URL is used."""
    user = hub.new_user()
    env = {
        "JUPYTERHUB_API_TOKEN": kernel_token(hub, user)[0],
        "JUPYTERHUB_API_URL": f"{hub.url}/hub/api",
        "JUPYTERHUB_PUBLIC_HUB_URL": f"{hub.url}/hub/",
        "INFERENCE_SERVICE_NAME": instance.name,
    }
    assert find_service(env).base_url == instance.url


def test_the_extension_in_a_kernel(hub, instance, monkeypatch, capsys):
    user = hub.new_user()
    token = kernel_token(hub, user)[0]
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
    monkeypatch.setenv("INFERENCE_SERVICE_URL", instance.url)
    shell = InteractiveShell.instance()

    shell.run_line_magic("reload_ext", "kernel_ext")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and instance.url in lines[0] and f"as {user}" in lines[0], lines
    assert os.environ["OPENAI_BASE_URL"] == instance.url + "v1" and os.environ["OPENAI_API_KEY"] == token

    assert shell.run_cell("%models").success
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["tiny-chat", "chat"] in listed and ["minilm", "embedding"] in listed, listed

    with capture_output() as captured:
        assert shell.run_cell("%%chat --model tiny-chat --max-tokens 16\nSay hello.").success
    assert "kernel_ext:" not in captured.stdout, captured.stdout  # no error line
    updates = [o for o in captured.outputs if o.update]
    assert len(updates) >= 2, "the answer should arrive in more than one piece"
    pieces = [o.data["text/markdown"] for o in updates]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(pieces, pieces[1:], strict=False)), pieces

    # Without --model: the first chat model the user may call; --system goes first, as a system message.
    from kernel_ext import magics

    sent = []
    real_client = magics.openai_client

    def recording_client(location=None):  # the real SDK client; what the magic asks of it is noted on the way
        client = real_client(location)
        create = client.chat.completions.create
        client.chat.completions.create = lambda **kw: sent.append(kw) or create(**kw)
        return client

    monkeypatch.setattr(magics, "openai_client", recording_client)
    with capture_output() as captured:
        assert shell.run_cell('%%chat --system "Answer in French." --max-tokens 4\nSay hello.').success
    assert "kernel_ext:" not in captured.stdout, captured.stdout
    first_chat_model = next(m["id"] for m in kernel_ext.InferenceClient(instance.url, token).models()
                            if m["task"] == "chat")
    assert [(kw["model"], kw["messages"]) for kw in sent] == [(first_chat_model, [
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello.\n"}])]
    assert any(o.update for o in captured.outputs)

    assert "tiny-chat" in [m.id for m in kernel_ext.client().models.list()]

    assert shell.run_cell("%usage").success
    out = capsys.readouterr().out
    assert out.startswith("Usage since ") and "tokens per day:" in out, out

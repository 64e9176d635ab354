"""Faults under a running service, each ending in a clear refusal and a recovery without a restart, never an
open door:

- the database stopped mid-run (a PostgreSQL cluster of the test's own, `pg_cluster.own_cluster`);
- the Hub's API unreachable (the session Hub behind a relay the test cuts and restores);
- an exception inside the engine (a model whose tokenizer has a token its embedding lacks: the forward pass fails
  for real on that token), and a model that fails to load.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import threading
import time

import openai
import psycopg
import pytest
import requests
from conftest import bearer, free_port, new_key, wait_for
from pg_cluster import own_cluster, poll, start_service

from hub_extension import key_format
from hub_extension.db import Database
from hub_extension.notify import libpq_url
from hub_extension.orm import User

pytestmark = pytest.mark.e2e  # service processes of their own (and, for the Hub, the session's Hub)

ADMIN_KEY = "faults-test-static-admin-key-0123456789"
OUT_OF_RANGE = "<|out-of-range|>"


def get(url: str, credential: str | None = None) -> requests.Response:
    return requests.get(url, headers=bearer(credential) if credential else {}, timeout=30)


def assert_refusal(r: requests.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    assert error["type"] == ("server_error" if status >= 500 else error["type"])


# -- the database stops ------------------------------------------------------------------------------------


def issue(service, user: str) -> dict:
    r = requests.post(service.url + f"api/users/{user}/keys", headers=bearer(ADMIN_KEY), json={"name": "k"}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def test_a_stopped_database_fails_closed_and_recovers_without_a_restart(tmp_path):
    with own_cluster() as cluster:
        db = Database(cluster.url, threads=1)
        db.upgrade()
        with db.session() as session:
            session.add(User(name="alice", hub_groups=[], hub_roles=[]))
        db.close()
        service = start_service(
            tmp_path, cluster.url, "--KeyManager.cache_seconds=1", "--UserDirectory.cache_seconds=1",
            "--UserDirectory.sync_interval=600",
            env={"INFERENCE_IDENTITY": "hub", "INFERENCE_API_KEYS": ADMIN_KEY,
                 "JUPYTERHUB_API_URL": f"http://127.0.0.1:{free_port()}/hub/api",
                 "JUPYTERHUB_API_TOKEN": secrets.token_hex(16), "JUPYTERHUB_CLIENT_ID": "service-inference"},
        )
        try:
            good, revoked = issue(service, "alice"), issue(service, "alice")
            r = requests.delete(service.url + f"api/users/alice/keys/{revoked['id']}", headers=bearer(ADMIN_KEY),
                                timeout=30)
            assert r.status_code == 204, r.text
            never_issued = key_format.generate()
            assert get(service.url + "api/me", good["key"]).status_code == 200
            assert get(service.url + "api/me", revoked["key"]).status_code == 401

            cluster.stop()
            # Once the caches (1 s) are spent, a key needs the database: 503, saying why.
            (r,), _ = poll(lambda: (r := get(service.url + "api/me", good["key"])).status_code == 503 and [r], 30,
                           "a 503 while the database is down")
            assert_refusal(r, 503, "database is unavailable")
            assert r.headers.get("Retry-After")
            r = get(service.url + "v1/models", good["key"])
            assert_refusal(r, 503, "database is unavailable")  # OpenAI's shape on /v1
            assert r.json()["error"]["code"] == "service_unavailable"
            # Never an open door: for a while, nothing but a valid key's 503 and refusals.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert get(service.url + "api/me", revoked["key"]).status_code in (401, 503)
                assert get(service.url + "api/me", never_issued).status_code in (401, 503)
                assert get(service.url + "api/me").status_code == 401
                assert get(service.url + "v1/models", "not-a-credential").status_code in (401, 503)
                assert get(service.url + "api/keys", good["key"]).status_code == 503
                time.sleep(0.1)
            assert "Traceback" not in service.output()  # one warning line per refusal, no stack traces

            cluster.start()  # back, on the same port: the service reconnects by itself
            poll(lambda: get(service.url + "api/me", good["key"]).status_code == 200, 60, "recovery")
            assert get(service.url + "api/me", revoked["key"]).status_code == 401
            assert get(service.url + "api/me", never_issued).status_code == 401
            # The listener for other replicas' changes came back too.
            poll(lambda: "listening for changes again" in service.output(), 60, "the listener to reconnect")
            with psycopg.connect(libpq_url(cluster.url), autocommit=True) as conn:
                assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                    "'jupyterhub-inference-listener'").fetchone()[0] == 1
        finally:
            assert service.stop() == 0, service.output()[-3000:]


# -- the Hub's API goes away ----------------------------------------------------------------------------------


class Relay:
    """A TCP relay on loopback in front of the Hub: `cut()` closes it and every connection through it (the Hub
    unreachable), `restore()` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        except OSError:
            pass
        self._server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_an_unreachable_hub_keeps_keys_working_and_hub_tokens_until_their_cache_ends(tmp_path, hub):
    relay = Relay(int(hub.url.rsplit(":", 1)[1]))
    service = start_service(
        tmp_path, f"sqlite:///{tmp_path / 'hubless.sqlite'}", "--IdentityProvider.hub_token_cache_seconds=10",
        "--UserDirectory.sync_interval=1",
        env={"INFERENCE_IDENTITY": "hub", "JUPYTERHUB_API_URL": f"http://127.0.0.1:{relay.port}/hub/api",
             # The tests' own Hub service: it may list users (the sync) but is no admin of ours.
             "JUPYTERHUB_API_TOKEN": hub.api.token, "JUPYTERHUB_SERVICE_NAME": "inference-pg",
             "JUPYTERHUB_CLIENT_ID": "service-inference-pg"},
    )
    try:
        name = hub.new_user("hubless")
        key = new_key(service.url, hub.api.user_token(name))
        assert get(service.url + "api/me", key).status_code == 200
        token, fresh = hub.api.user_token(name), hub.api.user_token(name)
        assert get(service.url + "api/me", token).status_code == 200  # checked with the Hub, cached 10 s

        relay.cut()
        assert get(service.url + "api/me", token).status_code == 200  # from the cache: no Hub needed
        # A token the service never saw cannot be checked: 503, never 200.
        assert_refusal(get(service.url + "api/me", fresh), 503, "Hub cannot be reached")
        assert_refusal(get(service.url + "v1/models", fresh), 503, "Hub cannot be reached")
        # When the cache ends, the known token is refused the same way.
        (r,), _ = poll(lambda: (r := get(service.url + "api/me", token)).status_code == 503 and [r], 40,
                       "cache expiry")
        assert_refusal(r, 503, "Hub cannot be reached")
        # Keys need no Hub; the failing sync retires nobody.
        poll(lambda: service.output().count("background task sync_with_hub failed") >= 2, 30, "failed syncs")
        assert get(service.url + "api/me", key).status_code == 200
        assert get(service.url + "v1/models", key).status_code == 200
        assert get(service.url + "api/me").status_code == 401
        assert "Traceback" not in service.output()

        relay.restore()
        poll(lambda: get(service.url + "api/me", token).status_code == 200, 30, "Hub tokens working again")
        assert get(service.url + "api/me", fresh).status_code == 200
    finally:
        relay.cut()
        assert service.stop() == 0, service.output()[-3000:]


# -- the engine fails -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_models(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """The tiny model with one tokenizer entry past the embedding (a real, if misconfigured, model: the forward
    pass fails on that token), on both engines, and a model whose files are not a model at all."""
    tmp = tmp_path_factory.mktemp("faulty")
    model = tmp / "oov"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenizer["added_tokens"].append({"id": vocab, "content": OUT_OF_RANGE, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": False})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{this is not a model")
    config = tmp / "models.yaml"
    config.write_text(f"""\
defaults: {{dtype: float32, context_length: 512, page_size: 32, default_max_tokens: 8}}
models:
  - {{name: broken, source: {broken}, task: chat}}
  - {{name: oov-chat, source: {model}, task: chat, engine: continuous, max_concurrency: 4, max_queue: 8,
      kv_cache_tokens: 4096}}
  - {{name: oov-generate, source: {model}, task: chat, engine: generate, max_concurrency: 1, max_queue: 8}}
""")
    return config


@pytest.fixture(scope="module")
def faulty_service(faulty_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faulty-service")
    service = start_service(tmp, f"sqlite:///{tmp / 'svc.sqlite'}", "--identity=static", f"--models={faulty_models}",
                            env={"INFERENCE_API_KEYS": ADMIN_KEY})
    wait_for(lambda: "models ready" in service.output() or "loading the startup models failed" in service.output(),
             120, 0.2, "startup models")
    yield service
    assert service.stop() == 0, service.output()[-3000:]


@pytest.mark.parametrize("model", ["oov-chat", "oov-generate"])
def test_an_exception_inside_the_engine_is_a_500_and_the_next_request_works(faulty_service, model):
    client = openai.OpenAI(base_url=faulty_service.url + "v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    ask = lambda text, **kw: client.chat.completions.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": text}], max_tokens=4, **kw)
    with pytest.raises(openai.InternalServerError) as failed:
        ask(f"hello {OUT_OF_RANGE}")
    assert failed.value.status_code == 500
    assert failed.value.body["type"] == "server_error" and failed.value.body["code"] == "engine_error"
    assert ask("hello").choices[0].finish_reason in ("stop", "length")
    # Streamed: the failure ends the stream with an error, never a normal finish; then the model serves again.
    with pytest.raises(openai.APIError):
        for _ in ask(f"again {OUT_OF_RANGE}", stream=True):
            pass
    for _ in range(3):
        assert ask("hello again").choices[0].finish_reason in ("stop", "length")


def test_a_model_that_fails_to_load_answers_503_and_the_others_serve(faulty_service):
    client = openai.OpenAI(base_url=faulty_service.url + "v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    for _ in range(2):  # each request tries again (a model fixed meanwhile comes back), and fails the same way
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "service_unavailable"
        assert "could not be loaded" in refused.value.body["message"]
        assert "{this is not" not in json.dumps(refused.value.body)  # the cause is logged, not shown
    for model in ("oov-chat", "oov-generate"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].message.content is not None
    assert "model 'broken' failed to load" in faulty_service.output()


async def test_a_status_change_is_answered_while_the_hub_is_unreachable(tmp_path):
    """The change is saved before the Hub is asked for the user's details: with the Hub down the answer comes from
    the service's own mirror (never a 503 for a change that was made)."""
    from hub_extension.administration import UserAdmin
    from hub_extension.permissions import PermissionPolicy
    from hub_extension.users import HubUsers, UserDirectory

    db = Database(f"sqlite:///{tmp_path / 'admin.sqlite'}", threads=1)
    db.upgrade()
    try:
        users, permissions = UserDirectory(db), PermissionPolicy(db)
        permissions.load()
        await users.seen_from_hub({"name": "ada", "admin": False, "groups": [], "roles": ["user"]})
        admin = UserAdmin(users, permissions, HubUsers(f"http://127.0.0.1:{free_port()}/hub/api", "no-hub"))
        audit = {"actor": "root", "subject": "ada", "client_ip": None}
        model = await admin.set_status("ada", "disable", audit=audit)
        assert model["status"] == "disabled" and model["in_hub"] is True
        assert (await users.by_name("ada")).status == "disabled"
    finally:
        db.close()

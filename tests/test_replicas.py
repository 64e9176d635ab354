"""Two replicas of the service on one PostgreSQL database: a change made through one is honoured by the other
at once, through LISTEN/NOTIFY (`hub_extension/notify.py`).

Every cache is configured to live a minute and every periodic reload to wait as long, and each check gives up
well before that, so only the notification can explain the other replica seeing the change. The replicas run
in `hub` mode with a static admin key (the admin API) and the Hub's API out of reach: keys are checked without
the Hub, and the users are rows the Hub sync would have made.
"""

from __future__ import annotations

import psycopg
import pytest
import requests
from conftest import bearer, free_port, run_command
from pg import temp_database
from pg_cluster import poll, start_service

from hub_extension.db import Database
from hub_extension.notify import APPLICATION_NAME, libpq_url
from hub_extension.orm import User

LONG = 60  # every cache and reload interval of the replicas, in seconds
WITHIN = 10  # how long a check waits for the other replica: far below LONG, generous for a busy machine
ADMIN_KEY = "replica-test-static-admin-key-0123456789"

pytestmark = pytest.mark.timeout(300)


def replica_args() -> list[str]:
    return [
        f"--KeyManager.cache_seconds={LONG}",
        f"--UserDirectory.cache_seconds={LONG}",
        f"--UserDirectory.sync_interval={LONG * 10}",
        f"--PermissionPolicy.reload_seconds={LONG}",
        f"--QuotaPolicy.sync_seconds={LONG}",
        f"--IdentityProvider.hub_token_cache_seconds={LONG}",
    ]


def replica_env() -> dict:
    return {
        "INFERENCE_IDENTITY": "hub",
        "INFERENCE_API_KEYS": ADMIN_KEY,
        "JUPYTERHUB_API_URL": f"http://127.0.0.1:{free_port()}/hub/api",  # nothing listens there
        "JUPYTERHUB_API_TOKEN": "not-a-real-hub-token-0123456789abcdef",
        "JUPYTERHUB_CLIENT_ID": "service-inference",
    }


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    with temp_database("jhi_replicas") as url:
        db = Database(url, threads=1)
        db.upgrade()
        with db.session() as session:
            session.add_all([User(name=name, hub_groups=[], hub_roles=[]) for name in ("alice", "bob")])
        db.close()
        a = start_service(tmp, url, *replica_args(), env=replica_env(), name="a")
        try:
            b = start_service(tmp, url, *replica_args(), env=replica_env(), name="b")
            try:
                wait_listeners(url, 2)
                yield url, a, b
            finally:
                b.stop()
        finally:
            a.stop()


def listener_pids(url: str) -> list[int]:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            (APPLICATION_NAME,),
        ).fetchall()
    return [pid for (pid,) in rows]


def wait_listeners(url: str, count: int) -> list[int]:
    pids, _ = poll(lambda: (p := listener_pids(url)) and len(p) == count and p, 30, f"{count} listeners")
    return pids


def admin(method: str, url: str, **kw) -> requests.Response:
    r = requests.request(method, url, headers=bearer(ADMIN_KEY), timeout=30, **kw)
    assert r.status_code < 300, r.text
    return r


def issue_key(replica, user: str) -> tuple[int, str]:
    body = admin("POST", replica.url + f"api/users/{user}/keys", json={"name": "replica"}).json()
    return body["id"], body["key"]


def status(replica, key: str, path: str = "api/me") -> int:
    return requests.get(replica.url + path, headers=bearer(key), timeout=30).status_code


@pytest.mark.e2e  # two service processes
def test_a_revocation_on_one_replica_is_refused_by_the_other(replicas):
    _, a, b = replicas
    key_id, key = issue_key(a, "alice")
    assert status(b, key) == 200 and status(a, key) == 200  # both replicas now hold it in their cache
    admin("DELETE", a.url + f"api/users/alice/keys/{key_id}")
    assert status(a, key) == 401
    _, took = poll(lambda: status(b, key) == 401, WITHIN, "the other replica to refuse the revoked key")
    print(f"revocation seen by the other replica after {took:.3f}s")


@pytest.mark.e2e  # two service processes
def test_a_user_revoking_their_own_key_reaches_the_other_replica(replicas):
    _, a, b = replicas
    key_id, key = issue_key(a, "bob")
    assert status(a, key) == 200 and status(b, key) == 200
    r = requests.delete(b.url + f"api/keys/{key_id}", headers=bearer(key), timeout=30)
    assert r.status_code in (200, 204), r.text
    poll(lambda: status(a, key) == 401, WITHIN, "replica a to refuse the key revoked on b")


@pytest.mark.e2e  # two service processes
def test_a_grant_change_on_one_replica_applies_on_the_other(replicas):
    _, a, b = replicas
    _, key = issue_key(a, "alice")

    def embeddings_allowed(replica) -> bool:
        r = requests.get(replica.url + "api/me/permissions", headers=bearer(key), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["features"]["embeddings"]["allowed"]

    assert embeddings_allowed(b)
    admin("PATCH", a.url + "api/users/alice/grants", json={"features": {"embeddings": False}})
    poll(lambda: not embeddings_allowed(b), WITHIN, "the other replica to apply the deny")
    admin("PATCH", a.url + "api/users/alice/grants", json={"features": {"embeddings": None}})
    poll(lambda: embeddings_allowed(b), WITHIN, "the other replica to apply the removal")


@pytest.mark.e2e  # two service processes
def test_a_quota_change_on_one_replica_applies_on_the_other(replicas):
    _, a, b = replicas
    _, key = issue_key(a, "alice")

    def day_limit(replica):
        r = requests.get(replica.url + "api/me/quota", headers=bearer(key), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["limits"]["tokens_per_day"]["limit"]

    assert day_limit(b) is None
    admin("PUT", a.url + "api/users/alice/quota", json={"tokens_per_day": 1234})
    poll(lambda: day_limit(b) == 1234, WITHIN, "the other replica to apply the quota")
    admin("DELETE", a.url + "api/users/alice/quota")
    poll(lambda: day_limit(b) is None, WITHIN, "the other replica to drop the quota")


def user_action(url: str, capsys, action: str, name: str) -> None:
    """`jupyterhub-inference users ACTION NAME`: a status change made by a third process (the admin API's answer
    includes the Hub's view of the user, and these replicas have no Hub to ask)."""
    code, out = run_command(capsys, "users", action, name, f"--db-url={url}")
    assert code == 0, out


@pytest.mark.e2e  # two service processes
def test_disabling_a_user_refuses_their_keys_on_every_replica(replicas, capsys):
    url, a, b = replicas
    _, key = issue_key(a, "bob")
    assert status(a, key) == 200 and status(b, key) == 200
    user_action(url, capsys, "disable", "bob")
    for replica in (a, b):
        poll(lambda r=replica: status(r, key) == 403, WITHIN, "a replica to refuse the disabled user")
    user_action(url, capsys, "enable", "bob")
    for replica in (a, b):
        poll(lambda r=replica: status(r, key) == 200, WITHIN, "a replica to accept the enabled user")


@pytest.mark.e2e  # two service processes
def test_a_killed_listener_reconnects_and_still_delivers(replicas, capsys):
    url, a, b = replicas
    _, key = issue_key(a, "alice")
    assert status(b, key) == 200
    before = wait_listeners(url, 2)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for pid in before:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # Both come back on new connections (backoff starts at half a second).
    poll(lambda: len(set(listener_pids(url)) - set(before)) == 2, 30, "both listeners to reconnect")
    assert "lost the change notifications" in b.output()
    # Meanwhile the key stays good, and a change made now still reaches the other replica at once.
    assert status(b, key) == 200
    user_action(url, capsys, "disable", "alice")
    try:
        poll(lambda: status(b, key) == 403, WITHIN, "the reconnected replica to refuse the disabled user")
    finally:
        user_action(url, capsys, "enable", "alice")
    poll(lambda: status(b, key) == 200, WITHIN, "the reconnected replica to accept the enabled user")


@pytest.mark.e2e  # two service processes
def test_a_change_from_the_command_line_reaches_running_replicas(replicas, capsys):
    url, a, b = replicas
    key_id, key = issue_key(a, "alice")
    assert status(a, key) == 200 and status(b, key) == 200
    code, out = run_command(capsys, "keys", "revoke", "--user", "alice", "--id", str(key_id), f"--db-url={url}")
    assert code == 0, out
    for replica in (a, b):
        poll(lambda r=replica: status(r, key) == 401, WITHIN, "a replica to refuse the key revoked by the CLI")


# -- the pieces, without processes ------------------------------------------------------------------------------


def test_publishing_on_sqlite_is_a_no_op(tmp_path):
    from hub_extension.notify import publish

    db = Database(f"sqlite:///{tmp_path / 'one.sqlite'}", threads=1)
    try:
        before = db.statements
        db.call(lambda session: publish(session, "keys", 1))
        assert db.statements == before
        with pytest.raises(ValueError):
            db.call(lambda session: publish(session, "everything"))
    finally:
        db.close()


async def test_the_listener_applies_others_changes_and_skips_its_own_and_garbage(caplog):
    import json

    from hub_extension.notify import ORIGIN, ChangeListener

    heard = []

    def failing(_payload):
        raise RuntimeError("the database went away mid-reload")

    listener = ChangeListener("postgresql+psycopg://u@127.0.0.1/db", {"keys": heard.append, "grants": failing})
    other = {"kind": "keys", "id": 7, "origin": "another-replica"}
    await listener.dispatch(json.dumps(other))
    await listener.dispatch(json.dumps({**other, "origin": ORIGIN}))  # this process made it: already applied
    for garbage in ("not json", "[]", json.dumps({"kind": "nonsense", "origin": "x"}), json.dumps({"id": 1})):
        await listener.dispatch(garbage)
    await listener.dispatch(json.dumps({"kind": "grants", "id": None, "origin": "x"}))  # logged, not raised
    assert heard == [other]
    assert listener.heard == 1
    assert "applying a grants change failed" in caplog.text


# -- with the Hub: every change through a replica's own API ------------------------------------------------------


def test_a_status_change_through_one_replica_reaches_the_other(hub, tmp_path):
    """As above, with the session's Hub behind the replicas, so the admin API answers in full (it includes the
    Hub's view of the user): disable and enable through replica a, refused and accepted again on replica b."""
    env = {**replica_env(), "JUPYTERHUB_API_URL": f"{hub.url}/hub/api", "JUPYTERHUB_API_TOKEN": hub.api.token}
    with temp_database("jhi_replicas_hub") as url:
        db = Database(url, threads=1)
        db.upgrade()
        db.close()
        a = start_service(tmp_path, url, *replica_args(), env=env, name="hub-a")
        try:
            b = start_service(tmp_path, url, *replica_args(), env=env, name="hub-b")
            try:
                wait_listeners(url, 2)
                name = hub.new_user("replica")
                _, key = issue_key(a, name)
                assert status(a, key) == 200 and status(b, key) == 200
                admin("POST", a.url + f"api/users/{name}/disable")
                poll(lambda: status(b, key) == 403, WITHIN, "replica b to refuse the user disabled on a")
                admin("POST", a.url + f"api/users/{name}/enable")
                poll(lambda: status(b, key) == 200, WITHIN, "replica b to accept the user enabled on a")
            finally:
                b.stop()
        finally:
            a.stop()

"""Usage recording through the real Hub proxy (both instances) and a real SIGTERM in the middle of a load."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import time
from collections import Counter

import httpx
import pytest
from conftest import bearer, new_key, wait_for
from sqlalchemy import and_, or_, select
from test_service_app import serve

from hub_extension.db import Database
from hub_extension.orm import UsageEvent

CHAT, COMPLETIONS, EMBED = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
MESSAGES = [{"role": "user", "content": "Say something about modules."}]


def request_for(i: int, key: str) -> tuple[str, dict, str, bool]:
    """The i-th request of the mixed load: (endpoint, body, key, disconnect after the first chunk)."""
    kind = i % 20
    if kind < 9:
        return CHAT, {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 1 + i % 2, "temperature": 0}, key, False
    if kind < 13:
        return EMBED, {"model": "minilm", "input": [f"sentence {i}", "another"]}, key, False
    if kind < 15:
        return CHAT, {"model": "tiny-chat", "messages": MESSAGES}, "jhi_not-a-key", False  # 401
    if kind < 17:
        return EMBED, {"model": "no-such-model", "input": "x"}, key, False  # 404
    if kind < 19:
        return CHAT, {"model": "tiny-chat", "messages": "not a list"}, key, False  # 400
    if i % 100 == 19:  # a few clients that read the first chunk of a stream and hang up
        body = {"model": "tiny-chat", "prompt": "import json", "max_tokens": 64, "stream": True}
        return COMPLETIONS, body, key, True
    return CHAT, {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 10_000_000}, key, False  # 400


async def send(client: httpx.AsyncClient, url: str, i: int, key: str) -> tuple[str, int | None, int, int]:
    """(endpoint, status, prompt tokens, completion tokens) as the response reported them; status None for
    a client that hung up."""
    endpoint, body, credential, hang_up = request_for(i, key)
    headers = bearer(credential)
    if hang_up:
        async with client.stream("POST", url + endpoint.lstrip("/"), json=body, headers=headers) as r:
            async for _line in r.aiter_lines():
                break
        return endpoint, None, 0, 0
    r = await client.post(url + endpoint.lstrip("/"), json=body, headers=headers)
    usage = (r.json().get("usage") or {}) if r.status_code == 200 else {}
    return endpoint, r.status_code, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)


async def load(url: str, key: str, total: int, clients: int) -> list[tuple]:
    todo = iter(range(total))
    results: list[tuple] = []

    async def worker(client):
        for i in todo:
            results.append(await send(client, url, i, key))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return results


def usage_database(hub, instance) -> Database:
    """The instance's own database: the in-process one's, or the Hub-managed service's SQLite file."""
    if instance.app is not None:
        return instance.app.services.db
    return Database(f"sqlite:///{hub.log_path.parent / 'inference.sqlite'}", threads=1)


def naive_utc(posix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(posix, dt.UTC).replace(tzinfo=None)


async def test_every_request_is_one_usage_row(hub, instance):
    """1,000 mixed requests from 50 concurrent clients: exactly 1,000 rows, the same statuses per endpoint as
    the responses, and the token sums the responses reported."""
    user = hub.new_user("meter")
    key = new_key(instance.url, hub.api.user_token(user))
    db = usage_database(hub, instance)
    t0 = time.time()
    results = await load(instance.url, key, 1000, 50)
    t1 = time.time()
    ours = or_(
        UsageEvent.user == user,
        and_(UsageEvent.user == "", UsageEvent.status == 401,  # refused before anyone was identified
             UsageEvent.time >= naive_utc(t0 - 0.001), UsageEvent.time <= naive_utc(t1)),
    )
    query = select(UsageEvent.endpoint, UsageEvent.status, UsageEvent.prompt_tokens, UsageEvent.completion_tokens)

    def rows() -> list:
        return db.call(lambda s: s.execute(query.where(ours)).all())

    try:
        wait_for(lambda: len(rows()) >= 1000, timeout=60, what="1,000 usage rows")
        time.sleep(2.5)  # two more flushes: nothing beyond the 1,000
        written = rows()
    finally:
        if instance.app is None:
            db.close()
    assert len(written) == 1000
    answered = [r for r in results if r[1] is not None]
    hung_up = len(results) - len(answered)
    assert hung_up == 10
    assert Counter((e, s) for e, s, _, _ in written if e != COMPLETIONS) == Counter((e, s) for e, s, _, _ in answered)
    assert sum(1 for r in written if r[0] == COMPLETIONS) == hung_up
    assert {s for e, s, _, _ in answered} >= {200, 400, 401, 404}
    served = [r for r in written if r[0] != COMPLETIONS and r[1] == 200]
    assert sum(r[2] for r in served) == sum(r[2] for r in answered) > 0
    assert sum(r[3] for r in served) == sum(r[3] for r in answered) > 0


@pytest.mark.e2e  # a service process of its own, under load
async def test_sigterm_mid_load_loses_no_answered_request(tmp_path, model_config_file):
    """A standalone service that writes usage only when it stops (flush_interval 600 s), stopped by SIGTERM
    while 16 clients keep sending: every request that got an answer is in `usage_events`."""
    key = "sk-usage-sigterm-test"
    proc, url = serve(tmp_path, "--identity=static", f"--models={model_config_file}",
                      "--UsageRecorder.flush_interval=600", env={"INFERENCE_API_KEYS": key})
    answered: Counter = Counter()
    sent = 0

    async def worker(client, n):
        nonlocal sent
        i = n
        while True:
            endpoint, body, credential, _hang_up = request_for(i % 17, key)  # chats, embeddings, 401s, 404s
            i += 16
            sent += 1
            try:
                r = await client.post(url + endpoint.lstrip("/"), json=body, headers=bearer(credential))
            except httpx.HTTPError:  # the service closed the connection or stopped listening
                return
            answered[endpoint, r.status_code] += 1

    async def stop_midway():
        while sum(answered.values()) < 200:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)

    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            await asyncio.gather(stop_midway(), *(worker(client, n) for n in range(16)))
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
    db = Database(f"sqlite:///{tmp_path / 'svc.sqlite'}", threads=1)
    try:
        rows = db.call(lambda s: Counter(s.execute(select(UsageEvent.endpoint, UsageEvent.status)).all()))
    finally:
        db.close()
    assert sum(answered.values()) >= 200
    for what, n in answered.items():
        assert rows[what] >= n, (what, rows, answered)
    assert sum(rows.values()) <= sent


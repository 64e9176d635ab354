"""Usage recording and reports as components (no Tornado), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, text

from hub_extension import usage
from hub_extension.db import Database
from hub_extension.errors import BadRequest
from hub_extension.orm import UsageEvent, UsageRollup
from hub_extension.usage import UsageRecorder, UsageReports, parse_report_query, to_csv

CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"

# (arrival, user, model, key id, endpoint, status, prompt tokens, completion tokens): three months, both sides of
# an hour, a day and a month boundary, a 401 before authentication (no user, no model), errors of every kind.
EVENTS = [
    ("2026-01-15T10:05:00Z", "alice", "chat", 1, CHAT, 200, 10, 5),
    ("2026-01-15T10:55:00Z", "alice", "chat", 1, CHAT, 200, 20, 7),
    ("2026-01-15T11:00:00Z", "alice", "minilm", None, EMBED, 200, 30, 0),
    ("2026-01-31T23:59:59Z", "bob", "chat", 2, CHAT, 499, 8, 1),
    ("2026-02-01T00:00:00Z", "bob", "chat", 2, CHAT, 200, 4, 2),
    ("2026-02-01T00:30:00Z", None, None, None, CHAT, 401, 0, 0),
    ("2026-02-14T12:00:00Z", "alice", None, 1, CHAT, 404, 0, 0),
    ("2026-03-03T08:15:00Z", "bob", "minilm", None, EMBED, 200, 100, 0),
    ("2026-03-03T08:45:00Z", "alice", "chat", 3, CHAT, 429, 0, 0),
]
RANGE = {"since": dt.datetime(2026, 1, 1), "until": dt.datetime(2026, 4, 1)}


def posix(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def usage_event(when="2026-01-15T10:05:00Z", user="alice", model="chat", key_id=1, endpoint=CHAT, status=200,
                prompt=1, completion=1) -> dict:
    """An event as `handlers/openai.py` hands it to the usage sinks."""
    return {
        "time": posix(when), "user": user, "credential": "api_key" if key_id else None, "user_id": None,
        "key_id": key_id, "acting_admin": None, "model": model, "endpoint": endpoint, "prompt_tokens": prompt,
        "completion_tokens": completion, "latency_ms": 1.5, "ttft_ms": None, "status": status, "streamed": False,
    }


def row(bucket, group, requests, errors, prompt, completion) -> dict:
    return {"bucket": bucket, "group": group, "requests": requests, "errors": errors, "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": prompt + completion}


@pytest.fixture
async def db(db_url):
    db = Database(db_url)
    db.upgrade()
    yield db
    db.close()


def commits(db: Database) -> list:
    """Every commit on `db`'s engine from now on (a transaction that wrote)."""
    seen: list = []
    sa_event.listen(db.engine, "commit", lambda _conn: seen.append(1))
    return seen


def count(db: Database, model) -> int:
    return db.call(lambda s: s.scalar(select(func.count()).select_from(model)))


async def test_one_transaction_per_flush(db):
    recorder = UsageRecorder(db, batch_size=10_000)
    for i in range(300):
        recorder.record(usage_event(prompt=i))
    assert recorder.pending() == 300 and recorder.lag_seconds() > 0 and count(db, UsageEvent) == 0
    seen = commits(db)
    assert await recorder.flush() == 300
    assert len(seen) == 1 and recorder.transactions == 1 and recorder.written == 300
    assert recorder.pending() == 0 and recorder.lag_seconds() == 0
    assert count(db, UsageEvent) == 300 and count(db, UsageRollup) == 1  # one hour, user, model, key, endpoint
    statements = db.statements
    assert await recorder.flush() == 0 and db.statements == statements  # nothing waiting: no round trip at all


async def test_early_flush_at_batch_size(db):
    recorder = UsageRecorder(db, batch_size=50, flush_interval=3600)
    flushed: list[list[dict]] = []
    recorder.flushed_callbacks.append(flushed.append)
    seen = commits(db)
    events = [usage_event(prompt=i) for i in range(70)]
    for e in events[:50]:
        recorder.record(e)  # the 50th starts a flush
    while recorder.pending():
        await asyncio.sleep(0.01)
    assert len(seen) == 1 and recorder.written == 50
    for e in events[50:]:
        recorder.record(e)  # fewer than batch_size: they wait for the periodic flush (here: close)
    await asyncio.sleep(0.05)
    assert recorder.pending() == 20 and len(seen) == 1
    await recorder.close()
    assert count(db, UsageEvent) == 70 and recorder.written == 70
    assert [e for batch in flushed for e in batch] == events  # the callbacks get the events as handed in, in order


async def test_bounded_buffer_drops_the_newest_and_counts_them(db, caplog):
    recorder = UsageRecorder(db, max_buffer=10, batch_size=1000)
    with caplog.at_level(logging.WARNING, logger="hub_extension.usage"):
        for i in range(15):
            recorder.record(usage_event(prompt=i))
    assert recorder.pending() == 10 and recorder.dropped == 5
    assert caplog.text.count("usage buffer full") == 1  # said once, not once per event
    await recorder.flush()
    kept = db.call(lambda s: s.scalars(select(UsageEvent.prompt_tokens).order_by(UsageEvent.id)).all())
    assert kept == list(range(10))


async def test_a_failed_write_is_kept_and_retried(db):
    """The rollups table briefly gone: the whole batch rolls back (no raw rows either), stays buffered, with the
    events recorded meanwhile behind it, and the next flush writes each event exactly once."""
    recorder = UsageRecorder(db, batch_size=1000)
    for i in range(20):
        recorder.record(usage_event(prompt=i))
    db.call(lambda s: s.execute(text("ALTER TABLE usage_rollups RENAME TO usage_rollups_away")))
    try:
        assert await recorder.flush() == 0
        assert recorder.pending() == 20 and count(db, UsageEvent) == 0
        for i in range(20, 30):
            recorder.record(usage_event(prompt=i))
        assert await recorder.flush() == 0
    finally:
        db.call(lambda s: s.execute(text("ALTER TABLE usage_rollups_away RENAME TO usage_rollups")))
    assert await recorder.flush() == 30 and recorder.pending() == 0 and recorder.written == 30
    kept = db.call(lambda s: s.scalars(select(UsageEvent.prompt_tokens).order_by(UsageEvent.id)).all())
    assert kept == list(range(30))
    [(requests, prompt)] = db.call(lambda s: s.execute(select(UsageRollup.requests, UsageRollup.prompt_tokens)).all())
    assert (requests, prompt) == (30, sum(range(30)))


async def test_close_writes_everything(db):
    recorder = UsageRecorder(db, batch_size=1000, flush_interval=3600)
    for i in range(250):
        recorder.record(usage_event(prompt=i))
    await recorder.close()
    assert recorder.pending() == 0 and count(db, UsageEvent) == 250


async def test_prune_keeps_rollups(db, monkeypatch):
    monkeypatch.setattr(usage, "PRUNE_CHUNK", 2)  # several chunks, one transaction each
    now = dt.datetime.now(dt.UTC)
    recorder = UsageRecorder(db, raw_retention_days=30)
    ages = [100, 100, 100, 100, 100, 40, 10, 1]
    for days in ages:
        recorder.record(usage_event(when=(now - dt.timedelta(days=days)).isoformat(), prompt=days))
    await recorder.flush()
    rollups = count(db, UsageRollup)
    seen = commits(db)
    assert await recorder.prune() == 6
    assert len(seen) == 4  # 2 + 2 + 2 rows, then a chunk that found none
    assert sorted(db.call(lambda s: s.scalars(select(UsageEvent.prompt_tokens)).all())) == [1, 10]
    assert count(db, UsageRollup) == rollups  # reports still see the old months
    recorder.rollup_retention_days = 60
    assert await recorder.prune() == 1 and count(db, UsageRollup) == rollups - 1


async def record_fixture(db: Database) -> None:
    """EVENTS written by two recorders (two replicas on one database) flushing at once: the hour both write to
    (alice's two chats at 10:05 and 10:55) adds up."""
    replicas = [UsageRecorder(db), UsageRecorder(Database(db.url, threads=1))]
    for i, e in enumerate(EVENTS):
        replicas[i % 2].record(usage_event(*e))
    await asyncio.gather(*(r.flush() for r in replicas))
    replicas[1].db.close()


async def test_reports_by_month_and_user_and_csv(db):
    await record_fixture(db)
    rows = await UsageReports(db).query(**RANGE, bucket="month", group_by="user")
    assert rows == [
        row("2026-01", "alice", 3, 0, 60, 12),
        row("2026-01", "bob", 1, 1, 8, 1),
        row("2026-02", "", 1, 1, 0, 0),  # the 401: refused before anyone was identified
        row("2026-02", "alice", 1, 1, 0, 0),
        row("2026-02", "bob", 1, 0, 4, 2),
        row("2026-03", "alice", 1, 1, 0, 0),
        row("2026-03", "bob", 1, 0, 100, 0),
    ]
    assert to_csv(rows).splitlines() == [
        "bucket,group,requests,errors,prompt_tokens,completion_tokens,total_tokens",
        "2026-01,alice,3,0,60,12,72",
        "2026-01,bob,1,1,8,1,9",
        "2026-02,,1,1,0,0,0",
        "2026-02,alice,1,1,0,0,0",
        "2026-02,bob,1,0,4,2,6",
        "2026-03,alice,1,1,0,0,0",
        "2026-03,bob,1,0,100,0,100",
    ]
    assert await UsageReports(db).query(**RANGE, bucket="month") == [
        row("2026-01", None, 4, 1, 68, 13),
        row("2026-02", None, 3, 2, 4, 2),
        row("2026-03", None, 2, 1, 100, 0),
    ]


async def test_reports_by_day_model_hour_key_and_endpoint(db):
    await record_fixture(db)
    reports = UsageReports(db)
    assert await reports.query(**RANGE, users=["alice"], bucket="day", group_by="model") == [
        row("2026-01-15", "chat", 2, 0, 30, 12),
        row("2026-01-15", "minilm", 1, 0, 30, 0),
        row("2026-02-14", "", 1, 1, 0, 0),  # 404: no model resolved
        row("2026-03-03", "chat", 1, 1, 0, 0),
    ]
    # `since` inside an hour counts that whole hour (the rollups are hourly).
    hours = {"since": dt.datetime(2026, 1, 15, 10, 30), "until": dt.datetime(2026, 1, 15, 12)}
    assert await reports.query(**hours, bucket="hour", group_by="key") == [
        row("2026-01-15T10:00:00Z", "1", 2, 0, 30, 12),
        row("2026-01-15T11:00:00Z", "", 1, 0, 30, 0),  # "": not through one of our keys
    ]
    assert await reports.query(**RANGE, users=["bob", "nobody"], bucket="month", group_by="endpoint") == [
        row("2026-01", CHAT, 1, 1, 8, 1),
        row("2026-02", CHAT, 1, 0, 4, 2),
        row("2026-03", EMBED, 1, 0, 100, 0),
    ]
    # The rollups agree with the raw events they were made from.
    raw = db.call(lambda s: s.execute(select(
        func.count(), func.sum(UsageEvent.prompt_tokens), func.sum(UsageEvent.completion_tokens))).one())
    total = await reports.query(**RANGE, bucket="month")
    assert tuple(raw) == (sum(r["requests"] for r in total), sum(r["prompt_tokens"] for r in total),
                          sum(r["completion_tokens"] for r in total))


async def test_a_report_too_large_is_refused(db, monkeypatch):
    await record_fixture(db)
    monkeypatch.setattr(usage, "MAX_ROWS", 3)
    with pytest.raises(BadRequest, match="more than 3 rows"):
        await UsageReports(db).query(**RANGE, bucket="hour")
    assert len(await UsageReports(db).query(**RANGE, bucket="month")) == 3


def test_csv_cells_are_never_formulas():
    text_ = to_csv([row("2026-01", "=HYPERLINK(1)", 1, 0, 1, 1), row("2026-01", "a,b", 1, 0, 1, 1)])
    assert text_.splitlines()[1:] == ["2026-01,'=HYPERLINK(1),1,0,1,1,2", '2026-01,"a,b",1,0,1,1,2']


def test_parse_report_query():
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    q = parse_report_query({})
    assert (q["bucket"], q["group_by"], q["users"]) == ("day", None, None)
    assert dt.timedelta(days=30) == q["until"] - q["since"] and abs((q["until"] - now).total_seconds()) < 60
    q = parse_report_query({"bucket": "hour", "group_by": "key", "user": "alice,bob", "since": "2026-01-01T01:00:00+01:00",
                            "until": "2026-02-01", "format": "csv"})
    assert q == {"bucket": "hour", "group_by": "key", "users": ["alice", "bob"], "since": dt.datetime(2026, 1, 1),
                 "until": dt.datetime(2026, 2, 1)}
    assert parse_report_query({"group_by": "none", "user": ""})["group_by"] is None


@pytest.mark.parametrize("args, param", [
    ({"bucket": "week"}, "bucket"),
    ({"group_by": "team"}, "group_by"),
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01"}, "until"),
    ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
    ({"since": "2026-02-01", "until": "2026-01-01"}, "since"),
    ({"since": "2020-01-01", "until": "2026-01-01"}, "since"),  # more than two years
    ({"user": ",".join(f"u{i}" for i in range(101))}, "user"),
])
def test_parse_report_query_refuses(args, param):
    with pytest.raises(BadRequest) as e:
        parse_report_query(args)
    assert e.value.status == 400 and e.value.param == param


async def test_a_malformed_event_is_left_out(db, caplog):
    """An event the handler got wrong never raises on the request path nor blocks the others' write."""
    recorder = UsageRecorder(db)
    flushed: list[list[dict]] = []
    recorder.flushed_callbacks.append(flushed.append)
    good = usage_event()
    with caplog.at_level(logging.ERROR, logger="hub_extension.usage"):
        recorder.record({"time": "not a time"})
        recorder.record({"endpoint": CHAT})
        recorder.record(good)
        assert await recorder.flush() == 1
    assert count(db, UsageEvent) == 1 and flushed == [[good]] and recorder.pending() == 0
    assert caplog.text.count("malformed usage event left out") == 2


async def test_long_names_never_block_a_batch(db):
    """PostgreSQL refuses a value longer than its column: one such event must not fail everyone's write."""
    recorder = UsageRecorder(db)
    recorder.record(usage_event(user="u" * 300, model="m" * 300))
    recorder.record(usage_event())
    assert await recorder.flush() == 2
    assert db.call(lambda s: s.scalars(select(UsageEvent.user).order_by(UsageEvent.id)).all()) == ["u" * 255, "alice"]

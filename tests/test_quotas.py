"""Quotas without Tornado, on SQLite and PostgreSQL: windows and Retry-After (an injected clock, no sleeps),
where each limit comes from, narrowed keys, admin changes and their audit, two replicas on one database, the CLI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from conftest import run_command

from hub_extension.audit import AuditLog
from hub_extension.errors import BadRequest, RateLimited
from hub_extension.identity import Identity
from hub_extension.quotas import QuotaPolicy, estimate_tokens
from hub_extension.usage import UsageRecorder
from hub_extension.users import UserDirectory

NOON = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC).timestamp()
ANN = Identity(name="ann", via="hub_token", is_admin=False, user_id=1, groups=("lab", "staff"))
BOB = Identity(name="bob", via="hub_token", is_admin=False, user_id=2, groups=("staff",))
AUDIT = {"actor": "root", "subject": "x", "client_ip": None}


class Clock:
    """Time that only moves when a test moves it."""

    def __init__(self, now: float = NOON):
        self.now = now

    def __call__(self) -> float:
        return self.now



@pytest.fixture
def clock():
    return Clock()


async def new_policy(db, clock, quotas: dict | None = None, **settings) -> QuotaPolicy:
    """A policy with `quotas` ({(kind, subject): {field: value}}) written through `set_quota`."""
    p = QuotaPolicy(db, clock=clock, **settings)
    p.load()
    for (kind, subject), values in (quotas or {}).items():
        await p.set_quota(kind, subject, values, audit=AUDIT)
    return p


def refused(p: QuotaPolicy, identity, tokens: int) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        p.reserve(identity, tokens)
    assert info.value.status == 429
    return info.value


async def test_tokens_per_day_refused_at_the_limit_and_allowed_the_next_day(db, clock):
    p = await new_policy(db, clock, {("user", "ann"): {"tokens_per_day": 100}})
    p.reserve(ANN, 60).settle(50)
    e = refused(p, ANN, 60)  # 50 spent + 60 > 100
    assert (e.code, e.type) == ("insufficient_quota", "insufficient_quota")
    assert "tokens_per_day" in e.message and "100" in e.message
    assert e.headers["Retry-After"] == str(12 * 3600)  # until the UTC day ends
    held = p.reserve(ANN, 50)  # exactly the limit
    e = refused(p, ANN, 1)
    assert e.headers["Retry-After"] == "1" and "in flight" in e.message  # only the open reservation is in the way
    held.release()
    p.reserve(ANN, 10).settle(10)
    assert (await p.remaining(ANN))["limits"]["tokens_per_day"] | {"resets_at": None} == {
        "limit": 100, "used": 60, "reserved": 0, "remaining": 40, "resets_at": None, "source": "user"}
    clock.now += 12 * 3600  # midnight: a new day
    p.reserve(ANN, 100).settle(100)
    p.reserve(BOB, 10**9).settle(10**9)  # no quota for bob: unlimited


async def test_tokens_per_month_window(db, clock):
    p = await new_policy(db, clock, {("default", ""): {"tokens_per_month": 1000}})
    p.reserve(ANN, 900).settle(900)
    clock.now += 24 * 3600  # the next day, the same month
    e = refused(p, ANN, 200)
    assert e.code == "insufficient_quota" and "tokens_per_month" in e.message and "default" in e.message
    assert e.headers["Retry-After"] == str(12 * 3600)  # until December 1st, 00:00 UTC
    p.reserve(BOB, 1000).settle(1000)  # a limit per user
    clock.now += 12 * 3600
    p.reserve(ANN, 1000).settle(1000)


async def test_requests_per_minute_slide_and_released_requests_do_not_count(db, clock):
    p = await new_policy(db, clock, {("user", "ann"): {"requests_per_minute": 2}})
    p.reserve(ANN, 1).settle(1)
    clock.now += 10
    p.reserve(ANN, 1).release()  # never ran: not counted
    p.reserve(ANN, 1).settle(1)
    clock.now += 10
    e = refused(p, ANN, 1)
    assert (e.code, e.type) == ("rate_limit_exceeded", "rate_limit_error")
    assert e.headers["Retry-After"] == "40"  # the first request leaves the window 60 s after it came
    quota = await p.remaining(ANN)
    assert quota["limits"]["requests_per_minute"]["used"] == 2
    assert quota["limits"]["requests_per_minute"]["remaining"] == 0
    clock.now += 40.001
    p.reserve(ANN, 1).settle(1)
    refused(p, ANN, 1)


async def test_where_each_limit_comes_from(db, clock):
    """A user's row beats their groups'; among groups the most generous (0: unlimited); then the database
    default; then the settings. Each limit on its own."""
    p = await new_policy(
        db, clock,
        {("group", "lab"): {"tokens_per_day": 100, "weight": 2.0}, ("group", "staff"): {"tokens_per_day": 300},
         ("default", ""): {"requests_per_minute": 5}},
        default_tokens_per_month=10_000,
    )
    limits = (await p.remaining(ANN))["limits"]
    assert (limits["tokens_per_day"]["limit"], limits["tokens_per_day"]["source"]) == (300, "group:staff")
    assert (limits["requests_per_minute"]["limit"], limits["requests_per_minute"]["source"]) == (5, "default")
    assert (limits["tokens_per_month"]["limit"], limits["tokens_per_month"]["source"]) == (10_000, "config")
    assert p.weight(ANN) == 2.0 and p.weight(BOB) == 1.0
    p.reserve(ANN, 300).settle(300)
    refused(p, ANN, 1)
    # A group's member is limited; someone outside it is not.
    await p.set_quota("group", "staff", {"tokens_per_day": 0}, audit=AUDIT)  # 0: unlimited, the most generous
    assert (await p.remaining(ANN))["limits"]["tokens_per_day"]["source"] == "group:staff"
    p.reserve(ANN, 5000).settle(5000)
    outsider = Identity(name="cy", via="hub_token", is_admin=False, groups=("lab",))
    e = refused(p, outsider, 101)
    assert "group:lab" in e.message
    # The user's own row beats every group.
    await p.set_quota("user", "ann", {"tokens_per_day": 5, "weight": 0.5}, audit=AUDIT)
    refused(p, ANN, 6)
    assert p.weight(ANN) == 0.5
    assert (await p.remaining(ANN))["weight"] == {"value": 0.5, "source": "user"}


async def test_a_narrowed_key_counts_against_its_owner(db, clock):
    p = await new_policy(db, clock, {("user", "ann"): {"tokens_per_day": 100, "requests_per_minute": 3}})
    key = Identity(name="ann", via="api_key", is_admin=False, user_id=1, groups=ANN.groups, key_id=7,
                   key_features=("chat",), key_models=("tiny-chat",))
    p.reserve(key, 80).settle(80)
    p.reserve(key, 1).settle(1)
    used = (await p.remaining(ANN))["limits"]
    assert used["tokens_per_day"]["used"] == 81 and used["requests_per_minute"]["used"] == 2
    assert refused(p, ANN, 20).code == "insufficient_quota"
    p.reserve(ANN, 1).settle(1)
    assert refused(p, key, 1).code == "rate_limit_exceeded"


async def test_identities_without_a_user_are_not_limited(db, clock):
    p = await new_policy(db, clock, default_tokens_per_day=1, default_requests_per_minute=1)
    for identity in (Identity.anonymous(), Identity(name="static", via="static_key", is_admin=True)):
        for _ in range(3):
            p.reserve(identity, 10**6).settle(10**6)
        assert (await p.remaining(identity))["limits"]["tokens_per_day"]["source"] == "unrestricted"
    refused(p, ANN, 2)


def test_estimates_and_settings():
    assert estimate_tokens(["abcd", "abcde", [1, 2, 3]]) == 1 + 2 + 3
    for bad in ({"default_tokens_per_day": -1}, {"default_weight": 0.0}, {"sync_seconds": 0}):
        with pytest.raises(ValueError, match="QuotaPolicy"):
            QuotaPolicy(**bad)


@pytest.mark.parametrize("body", [
    [], {"tokens_per_day": -1}, {"tokens_per_day": 1.5}, {"tokens_per_day": True}, {"tokens_per_day": "9"},
    {"tokens_per_month": 10**13}, {"requests_per_minute": 10**7}, {"weight": 0}, {"weight": 101}, {"weight": "1"},
    {"tokens": 5},
])
def test_bad_quota_bodies_are_400(body):
    with pytest.raises(BadRequest):
        QuotaPolicy.parse_quota(body)


async def test_changes_are_audited_and_seen_at_once(db, clock):
    p = await new_policy(db, clock)
    other = await new_policy(db, clock)  # another replica: sees the change at its next sync
    body = QuotaPolicy.parse_quota({"tokens_per_day": 10, "weight": 3})
    row = await p.set_quota("user", "ann", body, audit={**AUDIT, "subject": "ann"})
    assert row["tokens_per_day"] == 10 and row["weight"] == 3.0 and row["updated_by"] == "root"
    refused(p, ANN, 11)
    other.reserve(ANN, 11).release()
    await other.sync()
    refused(other, ANN, 11)
    await p.set_quota("user", "ann", body, audit=AUDIT)  # no change: no entry
    await p.set_quota("user", "ann", {}, audit={**AUDIT, "subject": "ann"})
    assert p.quota("user", "ann")["tokens_per_day"] is None
    p.reserve(ANN, 11).settle(11)
    events = await AuditLog(db).query(user="ann")
    assert [e["action"] for e in events] == ["quota.delete", "quota.set"]
    assert events[1]["details"] == {"subject_kind": "user", "changes": {
        "tokens_per_day": {"from": None, "to": 10}, "weight": {"from": None, "to": 3.0}}}


def event(clock: Clock, user: str, tokens: int, status: int = 200) -> dict:
    return {"time": clock.now, "user": user, "credential": "hub_token", "user_id": 1, "key_id": None,
            "acting_admin": None, "model": "tiny-chat", "endpoint": "/v1/chat/completions", "prompt_tokens": tokens,
            "completion_tokens": 0, "latency_ms": 1.0, "ttft_ms": None, "status": status, "streamed": False}


async def replicas(db, clock, n: int) -> list[tuple[QuotaPolicy, UsageRecorder]]:
    out = []
    for _ in range(n):
        p, recorder = QuotaPolicy(db, clock=clock), UsageRecorder(db)
        p.load()
        recorder.flushed_callbacks.append(p.on_flushed)
        out.append((p, recorder))
    return out


async def test_two_replicas_stay_within_the_documented_overshoot(db, clock):
    """Two replicas on one database, each admitting ann's requests: the total stays within the limit plus
    (replicas - 1) x what one replica admits in one flush + sync interval. Without `sync` it would be twice
    the limit (each replica would see only its own spending)."""
    limit, worst, actual, per_interval = 1000, 50, 40, 3
    (a, rec_a), (b, rec_b) = both = await replicas(db, clock, 2)
    await a.set_quota("user", "ann", {"tokens_per_day": limit}, audit=AUDIT)
    await b.sync()
    used, refusals = 0, 0
    for _ in range(30):  # intervals
        for p, recorder in both:
            held = []
            for _ in range(per_interval):  # in flight together, then done
                try:
                    held.append(p.reserve(ANN, worst))
                except RateLimited as e:
                    assert e.code == "insufficient_quota"
                    refusals += 1
            for reservation in held:
                reservation.settle(actual)
                recorder.record(event(clock, "ann", actual))
                used += actual
            clock.now += 0.1
        for _, recorder in both:
            await recorder.flush()
        for p, _ in both:
            await p.sync()
    assert limit - worst < used <= limit + (2 - 1) * per_interval * worst
    assert refusals > 0
    for p, _ in both:  # each replica now sees everything both spent
        assert (await p.remaining(ANN))["limits"]["tokens_per_day"]["used"] == used


async def test_two_replicas_share_the_minute(db, clock):
    (a, rec_a), (b, rec_b) = await replicas(db, clock, 2)
    await a.set_quota("user", "ann", {"requests_per_minute": 3}, audit=AUDIT)
    await b.sync()
    for _ in range(2):
        a.reserve(ANN, 1).settle(1)
        rec_a.record(event(clock, "ann", 1))
    rec_a.record(event(clock, "ann", 0, status=429))  # refused requests do not count
    b.reserve(ANN, 1).release()  # b now watches ann's minute
    await rec_a.flush()
    await a.sync()
    await b.sync()
    b.reserve(ANN, 1).settle(1)  # a's two + this one
    rec_b.record(event(clock, "ann", 1))
    assert refused(b, ANN, 1).code == "rate_limit_exceeded"
    a.reserve(ANN, 1).release()  # a does not know b's yet (not written): within the documented overshoot
    await rec_b.flush()
    await a.sync()
    assert refused(a, ANN, 1).headers["Retry-After"] == "60"
    clock.now += 61
    await a.sync()
    a.reserve(ANN, 1).settle(1)


def test_cli(db, db_url, capsys):
    asyncio.run(UserDirectory(db).seen_from_hub({"name": "cli-ann", "groups": ["lab"]}))

    def cli(*argv) -> tuple[int, str]:
        return run_command(capsys, "quotas", *argv, "--db-url", db_url)

    code, out = cli("set", "--group", "lab", "--tokens-per-day", "500", "--weight", "2")
    assert code == 0 and json.loads(out)["tokens_per_day"] == 500
    code, out = cli("set", "--group", "lab", "--requests-per-minute", "9")  # merged with what is there
    assert code == 0 and json.loads(out) | {"updated_at": None} == {
        "subject_kind": "group", "subject": "lab", "tokens_per_day": 500, "tokens_per_month": None,
        "requests_per_minute": 9, "weight": 2.0, "updated_at": None, "updated_by": json.loads(out)["updated_by"]}
    code, out = cli("show", "--user", "cli-ann")
    effective = json.loads(out)["effective"]["limits"]["tokens_per_day"]
    assert code == 0 and (effective["limit"], effective["source"]) == (500, "group:lab")
    assert cli("set", "--default", "--tokens-per-day", "lots")[0] == 1
    assert cli("set", "--default", "--tokens-per-day", "-5")[0] == 1
    assert cli("show", "--user", "nobody")[0] == 1
    assert cli("show")[0] == 1
    assert cli("set", "--default", "--tokens-per-day", "7")[0] == 0
    assert cli("clear", "--group", "lab")[0] == 0
    code, out = cli("show", "--user", "cli-ann")
    assert json.loads(out)["effective"]["limits"]["tokens_per_day"]["source"] == "default"
    actions = [e["action"] for e in asyncio.run(AuditLog(db).query())]
    assert actions == ["quota.delete", "quota.set", "quota.set", "quota.set"]


async def test_a_user_deleted_in_the_hub_takes_their_spending_and_quota_along(db, clock):
    """Whoever gets the name next starts with a clean slate: no spending against their quota (at once, before any
    sync), no user quota of the old person's, no usage history; admins still see the old usage, under the
    retired name."""
    from hub_extension.usage import UsageReports

    users = UserDirectory(db)
    p, recorder = (await replicas(db, clock, 1))[0]
    users.on_retired.append(p.forget_user)
    old = await users.seen_from_hub({"name": "ann"})
    await p.set_quota("default", "", {"tokens_per_month": 1000}, audit=AUDIT)
    await p.set_quota("user", "ann", {"tokens_per_day": 500}, audit=AUDIT)
    clock.now -= 86400  # yesterday, then today
    recorder.record(event(clock, "ann", 400))
    clock.now += 86400
    recorder.record(event(clock, "ann", 300))
    await recorder.flush()
    await p.sync()
    assert refused(p, ANN, 301).code == "insufficient_quota"  # 700 of the month's 1000 spent

    late = {**event(clock, "ann", 50), "user_id": old.id}  # answered before the deletion, written after it
    recorder.record(late)
    await users.sync([{"name": "bob"}])  # the Hub deleted ann
    await recorder.flush()
    new = await users.seen_from_hub({"name": "ann"})
    assert new.id != old.id
    p.reserve(ANN, 1000).release()  # at once: nothing of the old ann's spending is held against the new one
    await p.sync()
    p.reserve(ANN, 1000).release()
    assert p.resolve(ANN, "tokens_per_day") == (0, "config")  # unlimited: the old ann's own quota went with her
    reports = UsageReports(db)
    span = {"since": dt.datetime(2026, 11, 1), "until": dt.datetime(2026, 12, 1)}
    assert await reports.query(users=["ann"], **span) == []
    retired = f"ann/deleted-{old.id}"
    kept = await reports.query(users=[retired], bucket="month", **span)
    assert [row["total_tokens"] for row in kept] == [750]  # the late event went with the rest
    [deleted] = [e for e in await AuditLog(db).query(user="ann") if e["action"] == "user.deleted"]
    assert deleted["details"]["usage_kept_as"] == retired and deleted["details"]["quota_removed"] is True

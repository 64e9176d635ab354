"""Usage reports where users and admins see them: `/api/usage`, `/api/admin/usage`, the CLI and the account page.

Requests go through the Hub's proxy to the real models; the service records them, flushes them in batches (about
every second) and the reports must then add up to exactly what the responses reported. The account page's chart is
drawn by its own script in a real headless Chromium, driven by Playwright (the `page` fixture).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import itertools
import json
from collections import Counter

import requests
from browser import screenshot
from conftest import bearer, new_key, run_command, wait_for
from test_jupyterlab_e2e import log_in

from hub_extension.db import Database
from hub_extension.usage import UsageRecorder

COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")


def spend(url: str, credential: str, chats: int = 1, embeddings: int = 1) -> dict[str, Counter]:
    """Chat and embedding requests, plus one for a model that does not exist: what the responses reported, by model."""
    spent: dict[str, Counter] = {}
    calls = [("tiny-chat", "v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})]
    calls = calls * chats + [("minilm", "v1/embeddings", {"input": ["a sentence", "another one"]})] * embeddings
    for model, path, body in calls:
        r = requests.post(url + path, headers=bearer(credential), json={"model": model, **body}, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        c = spent.setdefault(model, Counter())
        c.update(requests=1, prompt_tokens=usage["prompt_tokens"], completion_tokens=usage.get("completion_tokens", 0),
                 total_tokens=usage["total_tokens"])
    r = requests.post(url + "v1/chat/completions", headers=bearer(credential), timeout=60,
                      json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404, r.text
    return spent


def total(*spent: dict[str, Counter]) -> dict:
    """Totals as the API reports them: every request (the refused one too, as an error)."""
    counts = sum((c for s in spent for c in s.values()), Counter())
    counts.update(requests=len(spent), errors=len(spent))  # one refused request per spend()
    return {name: counts[name] for name in COUNTS}


def report(url: str, headers: dict, path: str = "api/usage", **params) -> dict:
    r = requests.get(url + path, headers=headers, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def settled(url: str, headers: dict, expected: dict, path: str = "api/usage", **params) -> dict:
    """The report once the service has flushed every request made so far (it writes about every second)."""
    return wait_for(lambda: (r := report(url, headers, path, **params))["totals"] == expected and r,
                    timeout=30, interval=0.3, what=f"usage totals {expected}")


def recent_days() -> set[str]:
    """Today and yesterday (UTC): the day buckets of requests just made, even around midnight."""
    today = dt.datetime.now(dt.UTC).date()
    return {today.isoformat(), (today - dt.timedelta(days=1)).isoformat()}


def by_group(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        c = out.setdefault(row["group"], Counter())
        c.update({name: row[name] for name in COUNTS})
    return out


def test_own_usage_json_and_csv(hub, instance):
    user = hub.new_user("usage")
    token = hub.api.user_token(user)
    key = new_key(instance.url, token)
    spent_key = spend(instance.url, key, chats=2)
    spent_token = spend(instance.url, token, embeddings=0)
    expected = total(spent_key, spent_token)
    mine = bearer(token)

    data = settled(instance.url, mine, expected, bucket="day", group_by="model")
    assert data["bucket"] == "day" and data["group_by"] == "model"
    assert data["since"] < data["until"] and data["until"].endswith("Z")
    assert {row["bucket"] for row in data["rows"]} <= recent_days()
    groups = by_group(data["rows"])
    for model in ("tiny-chat", "minilm"):
        want = spent_key.get(model, Counter()) + spent_token.get(model, Counter())
        assert {n: groups[model][n] for n in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")} == {
            n: want[n] for n in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
        assert groups[model]["errors"] == 0

    # Through the key: the key's owner's usage; grouped by key, the key's requests apart from the token's.
    assert report(instance.url, bearer(key))["totals"] == expected
    key_id = str(requests.get(instance.url + "api/keys", headers=mine, timeout=30).json()["keys"][0]["id"])
    by_key = by_group(report(instance.url, mine, group_by="key")["rows"])
    assert by_key[key_id]["requests"] == 4  # two chats, one embedding, one refused

    for params, headers in (({"format": "csv", "group_by": "model"}, mine),
                            ({"group_by": "model"}, mine | {"Accept": "text/csv"})):
        r = requests.get(instance.url + "api/usage", headers=headers, params=params, timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv"), r.text
        assert "attachment" in r.headers["Content-Disposition"] and ".csv" in r.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert {name: sum(int(row[name]) for row in rows) for name in COUNTS} == expected
        assert {row["group"] for row in rows} >= {"tiny-chat", "minilm"}


def test_admin_usage_by_user_filters_and_view_as(hub, instance):
    ann, bob = hub.new_user("ann"), hub.new_user("bob")
    tokens = {name: hub.api.user_token(name) for name in (ann, bob)}
    spent = {ann: spend(instance.url, tokens[ann]), bob: spend(instance.url, tokens[bob], chats=2, embeddings=0)}
    admin = bearer(hub.api.user_token(hub.new_admin()))

    data = settled(instance.url, admin, total(*spent.values()), "api/admin/usage", group_by="user", user=f"{ann},{bob}")
    assert set(by_group(data["rows"])) == {ann, bob}
    for name, groups in by_group(data["rows"]).items():
        assert {n: groups[n] for n in COUNTS} == total(spent[name])
    assert report(instance.url, admin, "api/admin/usage", group_by="user", user=ann)["totals"] == total(spent[ann])
    both = requests.get(instance.url + "api/admin/usage", headers=admin, timeout=30,
                        params=[("group_by", "user"), ("user", ann), ("user", bob)])
    assert set(by_group(both.json()["rows"])) == {ann, bob}
    everyone = report(instance.url, admin, "api/admin/usage", group_by="user")
    assert {ann, bob} <= set(by_group(everyone["rows"]))
    r = requests.get(instance.url + "api/admin/usage", headers=admin, params={"user": bob, "format": "csv"}, timeout=30)
    assert sum(int(row["total_tokens"]) for row in csv.DictReader(io.StringIO(r.text))) == total(spent[bob])[
        "total_tokens"]

    # A user never sees anyone else's: the admin route is refused, and their own report is theirs only.
    assert requests.get(instance.url + "api/admin/usage", headers=bearer(tokens[ann]), timeout=30).status_code == 403
    assert report(instance.url, bearer(tokens[ann]))["totals"] == total(spent[ann])
    # View as: the viewed user's usage, not the admin's (who made no requests).
    assert report(instance.url, admin | {"X-Inference-Act-As": bob})["totals"] == total(spent[bob])
    assert report(instance.url, admin)["totals"]["requests"] == 0


BAD_ARGS = [
    ("api/usage", {"bucket": "week"}),
    ("api/usage", {"group_by": "user"}),  # a user's own report has one user
    ("api/usage", {"group_by": "colour"}),
    ("api/usage", {"user": "someone"}),
    ("api/usage", {"since": "yesterday"}),
    ("api/usage", {"since": "٢٠٢٦-٠١-٠١"}),  # digits, but not ASCII ones
    ("api/usage", {"since": "9999-12-31T23:59:59-01:00"}),  # past year 9999 in UTC
    ("api/usage", {"until": "2026-13-01"}),
    ("api/usage", {"since": "2026-02-01", "until": "2026-01-01"}),
    ("api/usage", {"format": "xml"}),
    ("api/admin/usage", {"group_by": "colour"}),
    ("api/admin/usage", {"bucket": "year"}),
    ("api/admin/usage", {"since": "0000-01-01"}),
]


def test_bad_arguments_are_400s(hub, instance):
    admin = bearer(hub.api.user_token(hub.new_admin()))
    for path, params in BAD_ARGS:
        r = requests.get(instance.url + path, headers=admin, params=params, timeout=30)
        assert r.status_code == 400, (path, params, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_usage(db_url, capsys):
    """`usage` reads the service's database: a table with totals, JSON, CSV, filters; bad arguments exit 1."""
    db = Database(db_url, threads=1)
    db.upgrade()
    recorder = UsageRecorder(db)
    times = [dt.datetime(2026, 1, 31, 23, 30, tzinfo=dt.UTC), dt.datetime(2026, 2, 1, 0, 30, tzinfo=dt.UTC)]
    for (who, model, tokens), when in itertools.product(
            [("cli-ann", "tiny-chat", (5, 7)), ("cli-bob", "minilm", (11, 0))], times):
        recorder.record({"time": when.timestamp(), "user": who, "credential": "hub_token", "user_id": None,
                         "key_id": None, "acting_admin": None, "model": model, "endpoint": "/v1/chat/completions",
                         "prompt_tokens": tokens[0], "completion_tokens": tokens[1], "latency_ms": 1.0,
                         "ttft_ms": None, "status": 200, "streamed": False})
    asyncio.run(recorder.flush())
    db.close()

    def cli(*argv) -> tuple[int, str]:
        return run_command(capsys, "usage", *argv, "--db-url", db_url)

    window = ("--since", "2026-01-01", "--until", "2026-03-01")
    code, out = cli(*window, "--bucket", "month", "--group-by", "user", "--json")
    assert code == 0, out
    assert [(r["bucket"], r["group"], r["requests"], r["total_tokens"]) for r in json.loads(out)] == [
        ("2026-01", "cli-ann", 1, 12), ("2026-01", "cli-bob", 1, 11),
        ("2026-02", "cli-ann", 1, 12), ("2026-02", "cli-bob", 1, 11),
    ]
    code, out = cli(*window, "--user", "cli-ann", "--group-by", "model")
    assert code == 0 and "cli-bob" not in out and "minilm" not in out, out
    assert out.splitlines()[-1].split()[:3] == ["total", "-", "2"], out  # two requests, 24 tokens
    assert out.splitlines()[-1].split()[-1] == "24", out
    code, out = cli(*window, "--user", "cli-ann", "--user", "cli-bob", "--bucket", "day", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and sum(int(r["total_tokens"]) for r in rows) == 46 and len(rows) == 4, out
    assert cli("--bucket", "week")[0] == 1
    assert cli("--since", "yesterday")[0] == 1


# -- the account page in a real browser ------------------------------------------------------------


def draw_account_page(page, hub, page_url: str, user: str) -> dict:
    """Log in with the Hub's form, open the account page, wait for its chart: what the page shows, and any
    script error or Content-Security-Policy violation the browser reported."""
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    log_in(page, hub, user, page_url)
    page.wait_for_url(page_url)
    page.wait_for_function("!!document.querySelector('#usage-chart svg')"
                           " && document.querySelectorAll('#quota tr').length === 3")
    shown = page.evaluate("""() => ({
        days: document.querySelector('#usage-chart svg').dataset.days,
        bars: [...document.querySelectorAll('#usage-chart rect[data-day]')].map(
            r => [r.dataset.day, r.dataset.model, r.getAttribute('height') > 0]),
        legend: [...document.querySelectorAll('#usage-chart .legend text')].map(t => t.textContent),
        labels: [...document.querySelectorAll('#usage-chart svg > text')].map(t => t.textContent),
        table: [...document.querySelectorAll('#usage-models tr')].map(
            tr => [...tr.children].map(td => td.textContent)),
        quota: [...document.querySelectorAll('#quota tr')].map(tr => [...tr.children].map(td => td.textContent)),
    })""")
    screenshot(page, "account-page-usage-chart")
    return shown | {"problems": problems}


def test_account_page_chart_in_chromium(hub, page):
    instance = hub.instances["sqlite"]  # the Hub-managed service, as deployed
    user = hub.new_user("chart")
    token = hub.api.user_token(user)
    spent = spend(instance.url, token, chats=2)
    settled(instance.url, bearer(token), total(spent))
    shown = draw_account_page(page, hub, instance.url, user)
    assert shown["problems"] == []
    assert shown["days"] == "30"
    assert {model for _day, model, tall in shown["bars"] if tall} == {"tiny-chat", "minilm"}
    assert {day for day, _model, _tall in shown["bars"]} <= recent_days()
    assert {"tiny-chat", "minilm"} <= set(shown["legend"])
    assert "day (UTC)" in shown["labels"] and "tokens" in shown["labels"] and "0" in shown["labels"]
    quota = {row[0]: row[1:] for row in shown["quota"]}
    assert set(quota) == {"Tokens per day", "Tokens per month", "Requests per minute"}
    assert all(len(cells) == 5 and cells[-1] in ("config", "default") for cells in quota.values()), quota
    table = {row[0]: row[1:] for row in shown["table"]}
    assert table["tiny-chat"][0] == "2" and int(table["tiny-chat"][4].replace(",", "")) == spent["tiny-chat"][
        "total_tokens"]

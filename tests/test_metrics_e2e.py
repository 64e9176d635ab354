"""`/metrics` through the Hub: requests of known kinds move the counters by exactly what was made."""

from __future__ import annotations

import json

import requests
from conftest import bearer, wait_for
from test_metrics import samples

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 3}


def scrape(instance, headers: dict) -> dict[tuple, float]:
    r = requests.get(instance.url + "metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    return samples(r.text)


def streamed_usage(url: str, headers: dict, body: dict) -> dict:
    """The usage chunk of a streamed answer (`include_usage`)."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    with requests.post(url, json=body, headers=headers, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    return chunks[-1]["usage"]


def test_counters_match_the_requests_made(hub, instance):
    url = instance.url
    admin = bearer(hub.api.user_token(hub.new_admin()))
    user = bearer(hub.api.user_token(hub.new_user("metrics")))
    disabled_name = hub.new_user("metrics-off")
    disabled = bearer(hub.api.user_token(disabled_name))
    r = requests.post(url + f"api/users/{disabled_name}/disable", headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    before = scrape(instance, admin)

    made: dict[tuple[str, int], int] = {}  # (endpoint, status) -> requests
    tokens = {("tiny-chat", "prompt"): 0, ("tiny-chat", "completion"): 0, ("minilm", "prompt"): 0}
    first_tokens = 0

    def call(endpoint: str, headers: dict, body: dict | None, status: int) -> dict:
        method = "POST" if body is not None else "GET"
        r = requests.request(method, url + endpoint.lstrip("/"), json=body, headers=headers, timeout=60)
        assert r.status_code == status, (endpoint, r.status_code, r.text)
        made[(endpoint, status)] = made.get((endpoint, status), 0) + 1
        return r.json()

    def count(model: str, usage: dict) -> None:
        nonlocal first_tokens
        tokens[(model, "prompt")] += usage["prompt_tokens"]
        if model == "tiny-chat":
            tokens[(model, "completion")] += usage["completion_tokens"]
            first_tokens += usage["completion_tokens"] > 0

    for _ in range(2):
        count("tiny-chat", call("/v1/chat/completions", user, CHAT, 200)["usage"])
    count("tiny-chat", call("/v1/completions", user, {"model": "tiny-chat", "prompt": "One, two,", "max_tokens": 2},
                            200)["usage"])
    count("tiny-chat", streamed_usage(url + "v1/chat/completions", user, CHAT))
    made[("/v1/chat/completions", 200)] += 1
    for text in ("a sentence", ["two", "sentences"]):
        count("minilm", call("/v1/embeddings", user, {"model": "minilm", "input": text}, 200)["usage"])
    call("/v1/models", user, None, 200)
    call("/v1/chat/completions", user, CHAT | {"model": "no-such-model"}, 404)
    call("/v1/chat/completions", bearer("garbage-credential"), CHAT, 401)  # auth failure: invalid_api_key
    call("/v1/models", disabled, None, 403)  # auth failure: user_disabled
    # /metrics itself: without a credential 401 (an auth failure), a user's 403 (not one: they are who they say)
    assert requests.get(url + "metrics", timeout=30).status_code == 401
    r = requests.get(url + "metrics", headers=user, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    after = scrape(instance, admin)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    for (endpoint, status), n in made.items():
        assert moved("inference_requests_total", endpoint=endpoint, status=str(status)) == n, (endpoint, status)
    moved_requests = sum(after[k] - before.get(k, 0) for k in after if k[0] == "inference_requests_total")
    assert moved_requests == sum(made.values())  # and nothing else: /metrics and /api are not /v1 requests
    for endpoint in {e for e, _ in made}:
        n = sum(v for (e, _), v in made.items() if e == endpoint)
        assert moved("inference_request_duration_seconds_count", endpoint=endpoint) == n, endpoint
    for (model, kind), n in tokens.items():
        assert n > 0 and moved("inference_tokens_total", model=model, kind=kind) == n, (model, kind)
    assert moved("inference_time_to_first_token_seconds_count", model="tiny-chat") == first_tokens
    assert moved("inference_auth_failures_total", reason="invalid_api_key") == 2
    assert moved("inference_auth_failures_total", reason="user_disabled") == 1
    assert after[("inference_model_in_flight", (("model", "tiny-chat"),))] == 0
    assert after[("inference_model_loaded", (("model", "tiny-chat"),))] == 1

    # The usage writer wrote every one of these requests: its gauges and counter say so once it caught up.
    def caught_up():
        now = scrape(instance, admin)
        written = now[("inference_usage_events_written_total", ())] - before[("inference_usage_events_written_total", ())]
        pending = now[("inference_usage_pending_events", ())]
        return pending == 0 and written >= sum(made.values()) and now

    final = wait_for(caught_up, timeout=30, what="the usage writer to catch up")
    assert final[("inference_usage_writer_lag_seconds", ())] == 0
    assert final[("inference_usage_events_dropped_total", ())] == 0


def test_a_scrapers_scope_reads_metrics_and_nothing_else(hub, instance):
    """`custom:inference:metrics` (a role for a Prometheus scraper) reads /metrics but administers nothing."""
    scraper = hub.new_user("scrape")
    hub.api.add_to_group("scrapers", scraper)
    headers = bearer(hub.api.user_token(scraper))
    r = requests.get(instance.url + "metrics", headers=headers)
    assert r.status_code == 200 and "inference_requests_total" in r.text
    assert requests.get(instance.url + "api/users", headers=headers).status_code == 403

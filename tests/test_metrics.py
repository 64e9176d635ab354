"""Prometheus metrics as a component: counters and histograms from usage events, gauges read when scraped from
a real model manager and a real usage writer, and who may read `/metrics` (a service in this process, no Hub)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import requests
from conftest import ServiceThread, bearer, free_port
from prometheus_client.parser import text_string_to_metric_families
from traitlets.config import Config

from hub_extension.db import Database
from hub_extension.engine import ModelManager, SamplingParams
from hub_extension.metrics import LATENCY_BUCKETS, Metrics
from hub_extension.usage import UsageRecorder

MESSAGES = [{"role": "user", "content": "Count to ten."}]


def samples(text: str) -> dict[tuple, float]:
    """Every sample of an exposition, keyed by (sample name, sorted labels); parsing it is part of the test."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(metrics: Metrics) -> dict[tuple, float]:
    return samples(metrics.exposition().decode())


def event(endpoint: str, status: int, model: str | None = None, prompt: int = 0, completion: int = 0,
          latency_ms: float = 5.0, ttft_ms: float | None = None, when: float | None = None) -> dict:
    return {
        "time": time.time() if when is None else when, "user": "alice-private", "credential": "api_key",
        "user_id": 7, "key_id": 4242, "acting_admin": None, "model": model, "endpoint": endpoint,
        "prompt_tokens": prompt, "completion_tokens": completion, "latency_ms": latency_ms, "ttft_ms": ttft_ms,
        "status": status, "streamed": ttft_ms is not None,
    }


EVENTS = [
    event("/v1/chat/completions", 200, "tiny-chat", 11, 5, latency_ms=40, ttft_ms=12),
    event("/v1/chat/completions", 200, "tiny-chat", 9, 7, latency_ms=700, ttft_ms=300),
    event("/v1/chat/completions", 499, "tiny-chat", 9, 2, latency_ms=3000, ttft_ms=30),
    event("/v1/chat/completions", 401),
    event("/v1/chat/completions", 404),  # a model the caller may not use: no model, no tokens
    event("/v1/completions", 200, "tiny-generate", 4, 3, latency_ms=90_000, ttft_ms=2_000),
    event("/v1/completions", 429, "tiny-generate", latency_ms=1),
    event("/v1/embeddings", 200, "minilm", 33, latency_ms=8),
    event("/v1/models", 200, latency_ms=0.3),
]


@pytest.fixture
def recorder(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'usage.sqlite'}")
    db.upgrade()
    yield UsageRecorder(db)
    db.close()


def test_counters_and_histograms_match_the_events(model_config_file, recorder):
    metrics = Metrics()
    metrics.watch(ModelManager.from_config(model_config_file), recorder)
    before = scrape(metrics)
    assert before[("inference_tokens_total", (("kind", "prompt"), ("model", "minilm")))] == 0  # exists from the start
    for e in EVENTS:
        metrics.record(e)
    for reason in ("invalid_api_key", "invalid_api_key", "user_disabled", "something new"):
        metrics.auth_failure(reason)
    text = metrics.exposition().decode()
    after = samples(text)

    requests_by = {}
    for e in EVENTS:
        key = (("endpoint", e["endpoint"]), ("status", str(e["status"])))
        requests_by[key] = requests_by.get(key, 0) + 1
    got = {labels: v for (name, labels), v in after.items() if name == "inference_requests_total"}
    assert got == requests_by
    for model in ("tiny-chat", "tiny-generate", "minilm", "tiny-busy"):
        for kind in ("prompt", "completion"):
            expected = sum(e[f"{kind}_tokens"] for e in EVENTS if e["model"] == model)
            assert after[("inference_tokens_total", (("kind", kind), ("model", model)))] == expected, (model, kind)
    for endpoint in {e["endpoint"] for e in EVENTS}:
        mine = [e["latency_ms"] / 1000 for e in EVENTS if e["endpoint"] == endpoint]
        labels = (("endpoint", endpoint),)
        assert after[("inference_request_duration_seconds_count", labels)] == len(mine)
        assert after[("inference_request_duration_seconds_sum", labels)] == pytest.approx(sum(mine))
        for bound in LATENCY_BUCKETS:  # cumulative buckets
            le = (("endpoint", endpoint), ("le", str(float(bound))))
            assert after[("inference_request_duration_seconds_bucket", le)] == sum(x <= bound for x in mine)
    ttft = {model: [e["ttft_ms"] / 1000 for e in EVENTS if e["model"] == model and e["ttft_ms"] is not None]
            for model in ("tiny-chat", "tiny-generate")}
    for model, values in ttft.items():
        assert after[("inference_time_to_first_token_seconds_count", (("model", model),))] == len(values)
        assert after[("inference_time_to_first_token_seconds_sum", (("model", model),))] == pytest.approx(sum(values))
    assert ("inference_time_to_first_token_seconds_count", (("model", "minilm"),)) not in after  # not generation
    failures = {dict(labels)["reason"]: v for (name, labels), v in after.items() if name == "inference_auth_failures_total"}
    assert failures == {"invalid_api_key": 2, "user_disabled": 1, "permission_denied": 0, "user_pending": 0, "other": 1}
    # Labels are bounded: no user name, key id or free text ever becomes one.
    assert "alice-private" not in text and "4242" not in text and "something new" not in text


async def test_gauges_read_a_real_model_manager(model_config_file, recorder):
    manager = ModelManager.from_config(model_config_file)
    metrics = Metrics()
    metrics.watch(manager, recorder)
    backend = await manager.get("tiny-generate")  # runs one request at a time (max_concurrency 1)
    gate = threading.Event()

    def hold(module, args) -> None:  # holds the model's thread in its first forward pass until the gate opens
        gate.wait(30)

    hook = backend.model.register_forward_pre_hook(hold)
    try:
        gens = [await backend.chat(MESSAGES, SamplingParams(max_tokens=4, temperature=0)) for _ in range(3)]
        busy, counted = scrape(metrics), manager.in_flight("tiny-generate")
    finally:
        gate.set()
        hook.remove()
    await asyncio.gather(*(g.collect() for g in gens))
    idle = scrape(metrics)
    await manager.close()

    def gauge(snapshot, name, model):
        return snapshot[(f"inference_model_{name}", (("model", model),))]

    assert (gauge(busy, "loaded", "tiny-generate"), gauge(busy, "loaded", "tiny-chat")) == (1, 0)
    assert gauge(busy, "in_flight", "tiny-generate") == 3 == counted
    assert gauge(busy, "queue_depth", "tiny-generate") == 2  # one decoding, two waiting
    assert gauge(idle, "in_flight", "tiny-generate") == 0 and gauge(idle, "queue_depth", "tiny-generate") == 0
    assert gauge(busy, "in_flight", "minilm") == 0  # not loaded


async def test_gauges_read_the_usage_writer(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'usage.sqlite'}")
    db.upgrade()
    recorder = UsageRecorder(db, max_buffer=5)  # the database "too slow": the last 4 events are dropped
    metrics = Metrics()
    metrics.watch(None, recorder)  # a service without models
    start = scrape(metrics)
    assert start[("inference_usage_pending_events", ())] == 0
    assert start[("inference_usage_writer_lag_seconds", ())] == 0
    for e in EVENTS:
        recorder.record(e)
    buffered = scrape(metrics)
    assert buffered[("inference_usage_pending_events", ())] == 5 == recorder.pending()
    assert buffered[("inference_usage_events_dropped_total", ())] == len(EVENTS) - 5 == recorder.dropped
    assert buffered[("inference_usage_writer_lag_seconds", ())] > 0
    await recorder.flush()
    written = scrape(metrics)
    db.close()
    assert written[("inference_usage_events_written_total", ())] == 5 == recorder.written
    assert written[("inference_usage_pending_events", ())] == 0
    assert written[("inference_usage_writer_lag_seconds", ())] == 0


def test_token_mode_needs_a_token():
    with pytest.raises(ValueError, match="Metrics.token"):
        Metrics(auth="token")
    with pytest.raises(ValueError, match="Metrics.token"):
        Metrics(auth="token", token="short")


# -- who may read /metrics: a real service (static keys: a holder is an admin) ------------------------------

ADMIN_KEY = "sk-metrics-admin-key"
SCRAPER_TOKEN = "scraper-token-0123456789"


def start_service(tmp_path, **metrics_settings) -> tuple[ServiceThread, str]:
    cfg = Config()
    cfg.IdentityProvider.mode = "static"
    cfg.IdentityProvider.static_keys = [ADMIN_KEY]
    cfg.InferenceService.port = port = free_port()
    cfg.InferenceService.db_url = f"sqlite:///{tmp_path / 'svc.sqlite'}"
    for name, value in metrics_settings.items():
        setattr(cfg.Metrics, name, value)
    service = ServiceThread(cfg)
    service.start()
    service.app.ready.wait(60)
    if service.error:
        raise service.error
    return service, f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize(
    "settings, answers",
    [
        ({}, {"none": 401, "token": 401, "admin": 200}),
        ({"auth": "token", "token": SCRAPER_TOKEN}, {"none": 401, "token": 200, "admin": 200}),
        ({"auth": "public"}, {"none": 200, "token": 200, "admin": 200}),
    ],
    ids=["admin", "token", "public"],
)
def test_who_may_read_metrics(tmp_path, settings, answers):
    service, url = start_service(tmp_path, **settings)
    try:
        headers = {"none": {}, "token": bearer(SCRAPER_TOKEN), "admin": bearer(ADMIN_KEY)}
        got = {who: requests.get(url + "metrics", headers=h, timeout=10) for who, h in headers.items()}
        assert {who: r.status_code for who, r in got.items()} == answers
        for r in got.values():
            if r.status_code == 200:
                assert r.headers["Content-Type"].startswith("text/plain; version=")
                assert ("inference_auth_failures_total", (("reason", "invalid_api_key"),)) in samples(r.text)
            else:
                assert r.json()["error"]["code"] == "invalid_api_key"
        # Refused scrapes are auth failures like any other (counted, then read by the admin).
        refused = sum(r.status_code == 401 for r in got.values())
        final = samples(requests.get(url + "metrics", headers=bearer(ADMIN_KEY), timeout=10).text)
        assert final[("inference_auth_failures_total", (("reason", "invalid_api_key"),))] == refused
    finally:
        service.stop()

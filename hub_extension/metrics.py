"""Prometheus metrics at `/metrics`: what operators watch (mission M5).

Two kinds of numbers. Counters and histograms move as requests finish: `record(event)` is a usage sink (one
`/v1` request, `services.record_usage`) and `auth_failure(reason)` is told by the identity provider why a
credential was refused. Gauges of the moment (queue depth and in-flight work per model, the usage writer's lag,
its buffer and its totals) are read only when `/metrics` is scraped, by a collector, so nothing runs per request
for them.

Label values are bounded: models come from the registry, endpoints from a fixed list, statuses are numbers,
auth-failure reasons a fixed list of error codes. No user name or key id is ever a label.

The registry is this component's own, not prometheus_client's global one, so several services in one process
(the tests) each count their own requests.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from traitlets import Enum, Unicode, default
from traitlets.config import LoggingConfigurable

from . import logs
from .errors import Unauthorized
from .identity import StaticKeys, presented_credential

PREFIX = "inference_"
ENDPOINTS = ("/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# The error codes the identity provider refuses a credential with; anything else counts as "other".
AUTH_FAILURE_REASONS = ("invalid_api_key", "permission_denied", "user_disabled", "user_pending")
GENERATION_TASKS = ("chat", "completion")
OTHER = "other"
# Whole requests: from a cached /v1/models (milliseconds) to a long generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The first token: admitted at once (tens of ms) or behind a full queue and a long prompt (tens of seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics(LoggingConfigurable):
    """Counts requests, tokens, latencies and auth failures; reads models and the usage writer when scraped."""

    auth = Enum(
        ["admin", "token", "public"],
        "admin",
        help="""Who may read `/metrics`.

        - `admin`: an administrator's credential of this service (`custom:inference:admin` by a Hub role, or the
          Hub's admin-level scopes), as the admin API.
        - `token`: `Authorization: Bearer <Metrics.token>` (what a Prometheus scrape job sends), or an admin.
        - `public`: anyone who can reach the service. The numbers name no user, but they show how busy each model
          is: choose this only where the service is reachable by whom may see that.""",
    ).tag(config=True)

    token = Unicode(
        help="""The scraper's secret when `auth` is `token` (at least 16 characters; compared in constant time).
        Defaults to $INFERENCE_METRICS_TOKEN.""",
    ).tag(config=True)

    @default("token")
    def _token_default(self):
        return os.environ.get("INFERENCE_METRICS_TOKEN", "")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.auth == "token" and len(self.token) < 16:
            raise ValueError("Metrics.auth is 'token': Metrics.token must be set, at least 16 characters")
        if self.token:
            logs.add_secret(self.token)
        if self.auth == "public":
            self.log.warning("/metrics is public (Metrics.auth = 'public'): anyone who can reach it may read it")
        self._token = StaticKeys([self.token] if self.auth == "token" else [])
        self._model_names: frozenset[str] = frozenset()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests", "Finished /v1 requests by endpoint and HTTP status (499: the client went away).",
            ["endpoint", "status"], registry=self.registry,
        )
        self.tokens = Counter(
            PREFIX + "tokens", "Tokens processed by model and kind (prompt or completion).",
            ["model", "kind"], registry=self.registry,
        )
        self.latency = Histogram(
            PREFIX + "request_duration_seconds", "Time from a /v1 request's arrival to its end, by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from a generation request's arrival to its first token.",
            ["model"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.auth_failures = Counter(
            PREFIX + "auth_failures", "Requests refused by the identity check, by reason (its error code).",
            ["reason"], registry=self.registry,
        )
        for endpoint in ENDPOINTS:
            self.latency.labels(endpoint)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)

    def watch(self, models, usage) -> None:
        """Read `models` (an engine.ModelManager, or None) and `usage` (a usage.UsageRecorder) when scraped."""
        self._model_names = frozenset(models.names()) if models is not None else frozenset()
        for name in self._model_names:  # every series exists from the start, so rate() sees the first request
            for kind in ("prompt", "completion"):
                self.tokens.labels(name, kind)
            if models.spec(name).task in GENERATION_TASKS:
                self.ttft.labels(name)
        self.registry.register(_StateCollector(models, usage))

    # -- the sinks (on the event loop, per request: O(1), no I/O) ----------------------------------------

    def record(self, event: dict) -> None:
        """A usage sink: one finished `/v1` request (the event shape is `handlers/openai.py`'s)."""
        endpoint = event["endpoint"] if event["endpoint"] in ENDPOINTS else OTHER
        self.requests.labels(endpoint, str(int(event["status"]))).inc()
        self.latency.labels(endpoint).observe(event["latency_ms"] / 1000)
        model = event["model"]
        if model not in self._model_names:  # refused before a model was chosen: no tokens, no first token
            return
        if event["prompt_tokens"]:
            self.tokens.labels(model, "prompt").inc(event["prompt_tokens"])
        if event["completion_tokens"]:
            self.tokens.labels(model, "completion").inc(event["completion_tokens"])
        if event["ttft_ms"] is not None:
            self.ttft.labels(model).observe(event["ttft_ms"] / 1000)

    def auth_failure(self, reason: str) -> None:
        """Told by the identity provider why a credential was refused (its error code)."""
        self.auth_failures.labels(reason if reason in AUTH_FAILURE_REASONS else OTHER).inc()

    # -- reading ------------------------------------------------------------------------------------

    def token_matches(self, headers) -> bool:
        """Whether the request carries the scraper's token (`auth` = `token`), compared in constant time."""
        if not self._token:
            return False
        try:
            presented = presented_credential(headers)
        except Unauthorized:  # a malformed header: the normal check refuses it (and counts the failure)
            return False
        return bool(presented) and self._token.matches(presented)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format (`prometheus_client.CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read at scrape time from the model manager and the usage writer."""

    def __init__(self, models, usage):
        self.models = models
        self.usage = usage

    def collect(self):
        loaded = GaugeMetricFamily(PREFIX + "model_loaded", "1 if the model is loaded.", labels=["model"])
        in_flight = GaugeMetricFamily(
            PREFIX + "model_in_flight",
            "Work admitted and not finished: sequences (n x prompts) for text models, texts for embeddings.",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            PREFIX + "model_queue_depth",
            "Work waiting for a slot (a text model's fair-share queue). At max_queue more, requests get 429.",
            labels=["model"],
        )
        models = self.models
        for name in models.names() if models is not None else ():
            loaded.add_metric([name], 1 if models.info(name).loaded else 0)
            in_flight.add_metric([name], models.in_flight(name))
            queued.add_metric([name], models.queued(name))
        yield from (loaded, in_flight, queued)
        usage = self.usage
        yield GaugeMetricFamily(
            PREFIX + "usage_writer_lag_seconds", "Age of the oldest usage event not yet written (0: none).",
            value=usage.lag_seconds(),
        )
        yield GaugeMetricFamily(
            PREFIX + "usage_pending_events", "Usage events buffered, not yet written.", value=usage.pending()
        )
        yield CounterMetricFamily(PREFIX + "usage_events_written", "Usage events written.", value=usage.written)
        yield CounterMetricFamily(
            PREFIX + "usage_events_dropped",
            "Usage events dropped because the buffer was full (the database too slow or down).",
            value=usage.dropped,
        )

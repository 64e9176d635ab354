"""SIGTERM with streams in flight: they finish (up to `InferenceService.shutdown_grace_seconds`), new work is
refused with 503 in OpenAI's shape meanwhile, the process exits by itself, and every finished stream's usage is
in the database afterwards. A service process of its own with the tiny model."""

from __future__ import annotations

import re
import signal
import threading

import openai
import pytest
import requests
from conftest import bearer, wait_for
from pg_cluster import start_service
from sqlalchemy import select

from hub_extension.db import Database
from hub_extension.orm import UsageEvent

pytestmark = pytest.mark.e2e  # a service process of its own, loading a model

KEY = "sk-graceful-stop-test-key"
STREAMS = 3


class Stream(threading.Thread):
    """One streamed chat completion read to its end: the text, and how it ended."""

    def __init__(self, url: str, model: str, max_tokens: int = 80):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=url + "v1", api_key=KEY, max_retries=0, timeout=120)
        self.model = model
        self.max_tokens = max_tokens
        self.started = threading.Event()
        self.chunks = 0
        self.finish_reason = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=self.max_tokens, stream=True, seed=1,
            )
            for chunk in stream:
                self.chunks += 1
                self.started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish_reason = chunk.choices[0].finish_reason
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.started.set()


def admitted(service, model: str = "tiny-generate") -> int:
    """Requests for `model` running or waiting for their turn, from the service's own gauges."""
    text = requests.get(service.url + "metrics", headers=bearer(KEY), timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("inference_model_in_flight{", "inference_model_queue_depth{")) and f'"{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def usage_rows(tmp_path) -> list[tuple]:
    db = Database(f"sqlite:///{tmp_path / 'stop.sqlite'}", threads=1)
    try:
        query = select(UsageEvent.endpoint, UsageEvent.status, UsageEvent.streamed, UsageEvent.completion_tokens)
        return db.call(lambda s: list(s.execute(query).all()))
    finally:
        db.close()


def start(tmp_path, model_config_file, grace: float):
    return start_service(
        tmp_path, f"sqlite:///{tmp_path / 'stop.sqlite'}", "--identity=static", f"--models={model_config_file}",
        f"--InferenceService.shutdown_grace_seconds={grace}", "--UsageRecorder.flush_interval=600",
        env={"INFERENCE_API_KEYS": KEY}, name="stop",
    )


def test_sigterm_lets_streams_finish_and_refuses_new_work(tmp_path, model_config_file):
    service = start(tmp_path, model_config_file, grace=120)
    try:
        # `tiny-generate` runs one request at a time: when the first stream has begun, the others wait their turn,
        # so they are certainly still in flight when the signal arrives.
        streams = [Stream(service.url, "tiny-generate") for _ in range(STREAMS)]
        streams[0].start()
        assert streams[0].started.wait(120) and streams[0].error is None, streams[0].error
        for s in streams[1:]:
            s.start()
        wait_for(lambda: admitted(service) == STREAMS, 60, 0.05, "every stream admitted")
        service.proc.send_signal(signal.SIGTERM)
        # Health answers 503 once the signal is handled (load balancers stop sending work here)...
        wait_for(lambda: requests.get(service.url + "health", timeout=10).status_code == 503, 30, 0.02, "draining")

        # ... and new work meanwhile gets 503 in OpenAI's shape.
        r = requests.get(service.url + "v1/models", headers=bearer(KEY), timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert "shutting down" in r.json()["error"]["message"]
        assert r.headers.get("Retry-After")
        with pytest.raises(openai.APIStatusError) as refused:
            openai.OpenAI(base_url=service.url + "v1", api_key=KEY, max_retries=0).chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            )
        assert refused.value.status_code == 503

        for s in streams:
            s.join(120)
        assert service.stop(timeout=120) == 0, service.output()[-3000:]
    finally:
        if service.proc.poll() is None:
            service.stop(signal.SIGKILL)
    for s in streams:
        assert s.error is None, s.error
        assert s.finish_reason in ("stop", "length"), (s.finish_reason, s.chunks)
    # The first stream may have ended just before the signal; the ones queued behind it were still in flight.
    waited = re.search(r"waiting up to 120s for (\d+) request\(s\) in flight", service.output())
    assert waited and int(waited.group(1)) >= STREAMS - 1, service.output()[-3000:]
    rows = usage_rows(tmp_path)
    chats = [r for r in rows if r[0] == "/v1/chat/completions"]
    # Every stream's usage was written on the way out (the flush interval is far beyond the test).
    assert sorted(r[1:3] for r in chats if r[2]) == [(200, True)] * STREAMS, chats
    assert all(r[3] > 0 for r in chats if r[2])
    assert (503, False) in {r[1:3] for r in chats}  # the refused request is recorded too


@pytest.mark.parametrize("how", ["grace spent", "second signal"])
def test_what_outlasts_the_grace_is_cut_off_and_the_process_exits(tmp_path, model_config_file, how):
    service = start(tmp_path, model_config_file, grace=0.5 if how == "grace spent" else 600)
    try:
        streams = [Stream(service.url, "tiny-generate", max_tokens=200) for _ in range(STREAMS)]
        streams[0].start()
        assert streams[0].started.wait(120) and streams[0].error is None, streams[0].error
        for s in streams[1:]:
            s.start()
        wait_for(lambda: admitted(service) >= 2, 60, 0.05, "streams admitted")
        service.proc.send_signal(signal.SIGTERM)
        if how == "second signal":  # as a process manager's SIGTERM after its SIGINT: stop waiting now
            wait_for(lambda: "waiting up to" in service.output(), 30, 0.05, "draining")
            service.proc.send_signal(signal.SIGTERM)
        assert service.stop(timeout=60) == 0, service.output()[-3000:]
        for s in streams:
            s.join(60)
    finally:
        if service.proc.poll() is None:
            service.stop(signal.SIGKILL)
    assert "cutting off" in service.output()
    assert any(s.error is not None or s.finish_reason is None for s in streams)  # the queue was not served


def test_a_stop_while_a_model_loads_exits_cleanly(tmp_path):
    """SIGTERM while a model still loads on its thread: the process exits 0 without waiting for the load, and
    without the interpreter's teardown under it (torch aborts a process torn down mid-load: SIGABRT)."""
    registry = tmp_path / "models.yaml"
    # `builtin:tiny-30M` is built on its first load into an empty `build_dir`: seconds of work to interrupt.
    registry.write_text(f"build_dir: {tmp_path / 'build'}\nmodels:\n"
                        "  - {name: big, source: 'builtin:tiny-30M', task: chat, engine: generate}\n")
    service = start(tmp_path, registry, grace=600)
    try:
        wait_for(lambda: "loading model 'big'" in service.output(), 60, 0.02, "the load begun")
        service.proc.send_signal(signal.SIGTERM)
        assert service.stop(timeout=60) == 0, service.output()[-3000:]
    finally:
        if service.proc.poll() is None:
            service.stop(signal.SIGKILL)
    assert "exiting while model(s) still load: big" in service.output(), service.output()[-3000:]
    assert "model 'big' loaded" not in service.output()

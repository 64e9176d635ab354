"""Fair share in the engine: when a model's queue is contended, waiting requests are admitted across tenants in
weighted turns, not first come first served. Real tiny models on both runners; the assertions are about the ORDER
in which requests enter the engine and stream their first tokens, never about time."""

from __future__ import annotations

import asyncio

import pytest
from engine_fixtures import tiny_model_dir  # noqa: F401

from hub_extension.engine import ModelManager, SamplingParams, parse_registry
from hub_extension.errors import RateLimited

ENGINES = ["continuous", "generate"]
SLOTS = 2  # max_concurrency of every model here: continuous batching decodes two at once, `generate` one


@pytest.fixture(scope="module")
async def manager(tiny_model_dir):  # noqa: F811
    common = {
        "source": str(tiny_model_dir),
        "task": "chat",
        "dtype": "float32",
        "context_length": 256,
        "max_concurrency": SLOTS,
        "max_queue": 64,
        "page_size": 32,
        "kv_cache_tokens": 1024,
    }
    mgr = ModelManager(parse_registry({"models": [{**common, "name": e, "engine": e} for e in ENGINES]}))
    await mgr.start()
    yield mgr
    await mgr.close()


class Recorder:
    """Which request entered the engine when (a spy that calls through to the real runner), and which streamed
    its first token when. Every prompt is `label`, so the engine's token ids say whose request it is."""

    def __init__(self, backend, monkeypatch):
        self.backend = backend
        self.labels: dict[tuple[int, ...], str] = {}
        self.admitted: list[str] = []
        self.first_tokens: list[str] = []
        self.most_in_engine = 0
        submit = backend.runner.submit

        def spy(req):
            self.admitted.append(self.labels[tuple(req.input_ids)])
            rid = submit(req)
            self.most_in_engine = max(self.most_in_engine, backend.runner.in_flight())
            return rid

        monkeypatch.setattr(backend.runner, "submit", spy)

    def start(self, label: str, tenant: str, weight: float = 1.0, max_tokens: int = 4, n: int = 1):
        """Queue one request now, without yielding to the loop (so nothing finishes meanwhile)."""
        ids = self.backend.prompt_ids(label)
        self.labels[tuple(ids)] = label
        params = SamplingParams(max_tokens=max_tokens, temperature=0, tenant=tenant, weight=weight, n=n)
        return label, self.backend.start([ids], params)

    async def drain(self, started) -> dict[str, str]:
        """Stream every request to its end; the texts by label."""

        async def one(label, gen):
            text = ""
            async for delta in gen:
                if not text:
                    self.first_tokens.append(label)
                text += delta.text
            return label, text

        return dict(await asyncio.gather(*(one(label, gen) for label, gen in started)))


async def wait_idle(backend) -> None:
    for _ in range(500):
        if not (backend.in_flight() or backend.runner.engine_pending()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError((backend.in_flight(), backend.runner.engine_pending()))


@pytest.mark.parametrize("engine", ENGINES)
async def test_one_request_is_not_stuck_behind_another_tenants_forty(manager, monkeypatch, engine):
    backend = await manager.get(engine)
    rec = Recorder(backend, monkeypatch)
    slots = backend.runner.slots
    started = [rec.start(f"A{i}", "alice") for i in range(40)]
    assert (backend.in_flight(), backend.queued()) == (40, 40 - slots)
    started.append(rec.start("B", "bob"))
    texts = await rec.drain(started)

    # Bob's request takes the first slot that frees, not the 41st.
    assert rec.admitted.index("B") == slots, rec.admitted
    # A30 is the tenth from last of Alice's.
    assert rec.first_tokens.index("B") < rec.first_tokens.index("A30"), rec.first_tokens
    assert rec.first_tokens.index("B") <= slots + 1, rec.first_tokens
    assert [a for a in rec.admitted if a != "B"] == [f"A{i}" for i in range(40)]  # each tenant's own FIFO
    assert rec.most_in_engine == slots  # the rest waited in our queues, not the engine's
    await wait_idle(backend)

    # The same greedy text as each request alone.
    for label in ("A0", "A17", "A39", "B"):
        _, gen = rec.start(label, "carol")
        assert (await gen.collect())[0] == texts[label]


@pytest.mark.parametrize("engine", ENGINES)
async def test_weights_share_admissions(manager, monkeypatch, engine):
    backend = await manager.get(engine)
    rec = Recorder(backend, monkeypatch)
    started = [rec.start(f"A{i}", "alice", weight=2.0, max_tokens=2) for i in range(30)]
    started += [rec.start(f"B{i}", "bob", weight=1.0, max_tokens=2) for i in range(30)]
    await rec.drain(started)
    # Admissions while both tenants had requests waiting: whose turn each was.
    contended = [label[0] for label in rec.admitted[backend.runner.slots : 33]]
    assert abs(contended.count("A") - 2 * contended.count("B")) <= 2, rec.admitted
    for i in range(0, len(contended) - 5, 3):  # about two A's per B in every stretch, not in blocks
        assert contended[i : i + 6].count("B") in (1, 2, 3), rec.admitted
    await wait_idle(backend)


async def test_a_requests_choices_belong_to_its_tenant(manager, monkeypatch):
    backend = await manager.get("continuous")
    rec = Recorder(backend, monkeypatch)
    started = [rec.start("A", "alice", n=12), rec.start("B", "bob")]
    assert backend.queued() == 12 + 1 - SLOTS
    await rec.drain(started)
    assert rec.admitted.index("B") == SLOTS, rec.admitted
    await wait_idle(backend)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_cancelled_waiting_request_leaves_its_queue_at_once(manager, monkeypatch, engine):
    backend = await manager.get(engine)
    rec = Recorder(backend, monkeypatch)
    started = [rec.start(f"A{i}", "alice", max_tokens=200) for i in range(backend.capacity)]
    with pytest.raises(RateLimited):
        rec.start("late", "bob")
    _, gone = started.pop(10)
    gone.cancel()  # what the handler does when the client goes away
    queued = backend.capacity - 1 - backend.runner.slots
    assert (backend.in_flight(), backend.queued()) == (backend.capacity - 1, queued)
    assert await gone.collect() == [""]
    started.append(rec.start("late", "bob"))  # its place is free now
    for _, gen in started:
        gen.cancel()
    await wait_idle(backend)
    assert "A10" not in rec.admitted
    assert backend.queued() == 0

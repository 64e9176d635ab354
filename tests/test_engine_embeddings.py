"""Embeddings under hostile input, without HTTP: the packaged MiniLM, big and cancelled requests, fairness,
capacity in texts, and the collection after an unload running off the event loop.

Batches are counted with a forward hook on the real model (one forward pass per batch)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from hub_extension.engine import ModelManager, parse_registry
from hub_extension.engine.embeddings import EmbeddingBackend
from hub_extension.engine.loading import load_embedding
from hub_extension.engine.registry import ModelSpec
from hub_extension.errors import BadRequest, RateLimited

SPEC = ModelSpec(
    name="minilm", task="embedding", source="builtin:minilm", dtype="float32", context_length=256
)
SENTENCE = "The quick brown fox jumps over the lazy dog. " * 25  # 1125 characters, 252 tokens


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The model and tokenizer, loaded once; each test builds its own backends around them."""
    backend = load_embedding(SPEC, tmp_path_factory.mktemp("build"))
    yield backend.model, backend.tokenizer
    backend.close()


@pytest.fixture
def make(minilm):
    made: list[EmbeddingBackend] = []

    def make(**spec) -> EmbeddingBackend:
        made.append(EmbeddingBackend(replace(SPEC, **spec), *minilm, SPEC.context_length))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def batches(minilm):
    """How many forward passes (batches) the model has run so far: `batches()`."""
    count = [0]
    hook = minilm[0].register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    yield lambda: count[0]
    hook.remove()


async def until(condition, timeout: float = 60.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_vectors_are_unit_length_related_pair_closer_and_independent_of_batching(make):
    backend = make()
    texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    result, other = await asyncio.gather(
        backend.embed(texts), backend.embed(["batched with the other request"])
    )
    v = result.vectors
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose((v**2).sum(axis=1), 1, atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    assert result.prompt_tokens == sum(backend.count_tokens(t) for t in texts)
    alone = [(await backend.embed([t])).vectors[0] for t in texts]
    assert np.abs(v - np.stack(alone)).max() < 1e-5
    # long words: 252 tokens in 4750 characters still fits; 601 tokens does not
    assert (await backend.embed(["telecommunications " * 250])).vectors.shape == (1, 384)
    with pytest.raises(BadRequest) as info:
        await backend.embed(["word " * 600])
    assert info.value.code == "context_length_exceeded"


async def test_tokenizing_a_big_request_leaves_the_event_loop_free(make, batches):
    backend = make(max_concurrency=1, max_queue=399, batch_size=8)  # room for 3,200 texts
    texts = [SENTENCE] * 2500
    t0 = time.perf_counter()
    backend.tokenizer(texts, add_special_tokens=True)
    tokenizing = time.perf_counter() - t0

    loop = asyncio.get_running_loop()
    lag = 0.0
    stop = asyncio.Event()

    async def probe():
        nonlocal lag
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            lag, last = max(lag, loop.time() - last), loop.time()

    probing = asyncio.ensure_future(probe())
    task = asyncio.ensure_future(backend.embed(texts))
    await until(lambda: batches() > 0 or task.done())  # tokenised, the first batch running
    stop.set()
    await probing
    await cancel(task)
    assert lag < tokenizing / 4, (lag, tokenizing)
    assert backend.in_flight() == 0


async def test_a_cancelled_request_stops_computing_and_leaves_the_count_at_once(make, batches):
    backend = make(batch_size=4)
    task = asyncio.ensure_future(backend.embed([f"sentence number {i}" for i in range(200)]))  # 50 batches
    await until(lambda: batches() >= 2)
    await cancel(task)
    assert backend.in_flight() == 0
    at_cancel = batches()
    await backend.embed(["one more"])  # served once the model thread is past the cancelled request
    assert batches() - at_cancel <= 2, (at_cancel, batches())  # the batch running at the cancel, then ours


async def test_a_small_request_is_served_between_the_batches_of_a_big_one(make, batches):
    backend = make(batch_size=4)
    texts = [f"sentence number {i}" for i in range(200)]  # 50 batches
    big = asyncio.ensure_future(backend.embed(texts))
    await until(lambda: batches() >= 1)
    small = await backend.embed(["a cat"])
    assert not big.done() and batches() < 50
    assert np.abs(small.vectors - (await make().embed(["a cat"])).vectors).max() < 1e-5
    vectors = (await big).vectors  # rows taken a batch at a time still land in their places
    for i in (0, 1, 57, 199):
        assert np.abs(vectors[i] - (await backend.embed([texts[i]])).vectors[0]).max() < 1e-5


async def test_capacity_counts_texts(make):
    backend = make(max_concurrency=1, max_queue=1, batch_size=4)  # 8 texts
    with pytest.raises(BadRequest) as info:  # can never fit: not a 429 to retry forever
        await backend.embed(["x"] * 9)
    assert info.value.status == 400 and info.value.param == "input"
    task = asyncio.ensure_future(backend.embed(["x"] * 7))
    await asyncio.sleep(0)
    with pytest.raises(RateLimited) as info:  # 7 + 2 > 8: full right now
        await backend.embed(["y", "z"])
    assert info.value.status == 429 and "Retry-After" in info.value.headers
    assert (await backend.embed(["y"])).vectors.shape == (1, 384)
    assert (await task).vectors.shape == (7, 384)
    assert backend.in_flight() == 0


async def test_an_overlong_text_is_refused_before_tokenizing(make):
    backend = make()
    text = "word " * 4_000_000  # 20 million characters
    t0 = time.perf_counter()
    with pytest.raises(BadRequest) as info:
        await backend.embed(["fine", text])
    refusing = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.tokenizer(text[: len(text) // 100], add_special_tokens=True)
    tokenizing_a_hundredth = time.perf_counter() - t0
    assert info.value.code == "context_length_exceeded" and "Input 1 " in info.value.message
    assert refusing < tokenizing_a_hundredth, (refusing, tokenizing_a_hundredth)
    assert backend.in_flight() == 0


async def test_collection_after_an_unload_runs_off_the_event_loop():
    manager = ModelManager(
        parse_registry(
            {
                "models": [
                    {"name": "minilm", "source": "builtin:minilm", "task": "embedding", "load": "first_use"}
                ]
            }
        )
    )
    await manager.start()
    full: list[int] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(threading.get_ident())

    try:
        await (await manager.get("minilm")).embed(["hello"])
        gc.callbacks.append(on_gc)
        try:
            assert await manager.unload("minilm")
        finally:
            gc.callbacks.remove(on_gc)
    finally:
        await manager.close()
    assert any(ident != threading.get_ident() for ident in full), full

"""The text engine under hostile input: huge prompts, seeded sampling beside other users' streams, requests
that can never fit. Real tiny models built offline; assertions are about behaviour and ordering, and the one
about time is a ratio (the event loop's worst stall against the tokenising it no longer does)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from engine_fixtures import tiny_model_dir  # noqa: F401

from hub_extension.engine import ModelManager, SamplingParams, parse_registry
from hub_extension.errors import BadRequest

MESSAGES = [{"role": "user", "content": "Tell me about the json module."}]
SAMPLE_TEXT = " ".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog; json.dumps(x)." for i in range(40)
)


@pytest.fixture(scope="module")
async def manager(tiny_model_dir):  # noqa: F811
    common = {"source": str(tiny_model_dir), "task": "chat", "dtype": "float32", "context_length": 2048}
    registry = parse_registry(
        {
            "models": [
                {
                    **common,
                    "name": "chat",
                    "max_concurrency": 16,
                    "max_queue": 16,
                    "kv_cache_tokens": 8192,
                    "page_size": 32,
                },
                {**common, "name": "generate", "engine": "generate", "max_concurrency": 1, "max_queue": 4},
            ]
        }
    )
    mgr = ModelManager(registry)
    await mgr.start()
    yield mgr
    await mgr.close()


def spy_tokenize(monkeypatch, backend) -> list[tuple[int, float]]:
    """Record (thread, seconds) for each call of the backend's one tokenising method."""
    calls: list[tuple[int, float]] = []
    real = backend._tokenize

    def counted(text, special):
        t0 = time.perf_counter()
        try:
            return real(text, special)
        finally:
            calls.append((threading.get_ident(), time.perf_counter() - t0))

    monkeypatch.setattr(backend, "_tokenize", counted)
    return calls


async def worst_loop_gap(work, tick: float = 0.01) -> float:
    """Run `work` while a coroutine ticks every `tick` seconds; return the worst lateness of a tick."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = False

    async def probe():
        nonlocal worst
        while not done:
            t = loop.time()
            await asyncio.sleep(tick)
            worst = max(worst, loop.time() - t - tick)

    task = asyncio.create_task(probe())
    await asyncio.sleep(tick)  # the probe is ticking before the work starts
    try:
        await work
    finally:
        done = True
        await task
    return worst


def test_importing_the_engine_loads_neither_torch_nor_transformers():
    code = (
        "import sys, hub_extension.engine, hub_extension.engine.generation, hub_extension.engine.registry; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_character_bound_holds_and_exists_only_where_it_is_exact(manager):
    from transformers import AutoTokenizer

    from hub_extension.engine.loading import chars_per_token, minilm_path

    backend = manager._slots["chat"].backend
    cpt = chars_per_token(backend.tokenizer)
    assert backend.max_prompt_chars == backend.context_length * cpt
    longest = max(backend.tokenizer.convert_ids_to_tokens(list(range(len(backend.tokenizer)))), key=len)
    for text in (SAMPLE_TEXT, longest * 50, " " * 5000, "ü" * 3000, "🎉x" * 2000):
        assert len(backend.tokenizer(text, add_special_tokens=False)["input_ids"]) * cpt >= len(text)
    # WordPiece maps a whole long word to [UNK] and BERT's pre-tokeniser drops spaces: no bound, no check.
    assert chars_per_token(AutoTokenizer.from_pretrained(minilm_path())) is None


async def test_a_prompt_that_can_never_fit_is_refused_without_tokenising(manager, monkeypatch):
    backend = await manager.get("chat")
    calls = spy_tokenize(monkeypatch, backend)
    huge = "x" * (backend.max_prompt_chars + 1)
    with pytest.raises(BadRequest) as info:
        await backend.chat([{"role": "user", "content": huge}], SamplingParams(max_tokens=4))
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(BadRequest) as info:
        await backend.complete(["short", huge], SamplingParams(max_tokens=4))
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")
    assert calls == []
    assert backend.in_flight() == 0 and backend._preparing == 0


async def test_tokenising_large_prompts_leaves_the_event_loop_free(manager, monkeypatch):
    backend = await manager.get("chat")
    calls = spy_tokenize(monkeypatch, backend)
    # As large as the bound lets through, and far more tokens than the context: tokenised, then refused.
    prompt = (SAMPLE_TEXT * (backend.max_prompt_chars // len(SAMPLE_TEXT) + 1))[: backend.max_prompt_chars]
    request = backend.complete([prompt] * 12, SamplingParams(max_tokens=4))

    async def refused():
        with pytest.raises(BadRequest) as info:
            await request
        assert info.value.code == "context_length_exceeded"

    gap = await worst_loop_gap(refused())
    assert len(calls) == 12
    assert threading.get_ident() not in {thread for thread, _ in calls}
    tokenising = sum(seconds for _, seconds in calls)
    assert gap < 0.25 * tokenising, (gap, tokenising)


async def test_seeded_sampling_runs_inside_the_batch_beside_greedy_streams(manager):
    backend = await manager.get("chat")
    events: list[str] = []
    # This seed runs to max_tokens on the tiny model (another might sample an end-of-text early).
    seeded = await backend.chat(MESSAGES, SamplingParams(max_tokens=300, temperature=0.5, seed=1))
    deltas = aiter(seeded)
    events.append("s:" + (await anext(deltas)).text)  # the seeded request is running

    async def drain_seeded():
        async for delta in deltas:
            events.append("s:" + delta.text)

    async def greedy():
        gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=16, temperature=0))
        async for delta in gen:
            events.append("g:" + delta.text)
        return gen.completion_tokens

    seeded_task = asyncio.create_task(drain_seeded())
    assert await greedy() == 16
    # the greedy stream finished while the seeded one was still going
    assert not seeded_task.done(), seeded.completion_tokens
    await seeded_task
    assert seeded.completion_tokens == 300
    kinds = [e[0] for e in events]
    first_g, last_g = kinds.index("g"), len(kinds) - 1 - kinds[::-1].index("g")
    assert "s" in kinds[first_g:last_g] and "s" in kinds[last_g:]  # tokens interleaved, not one after another


async def test_same_seed_same_tokens_on_either_engine_and_beside_other_traffic(manager):
    batch, single = await manager.get("chat"), await manager.get("generate")
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234, n=2)
    alone = await (await batch.chat(MESSAGES, params)).collect()
    assert len(set(alone)) == 2  # the n samples differ

    other = await batch.chat(MESSAGES, SamplingParams(max_tokens=40, temperature=1.0))
    crowded, _ = await asyncio.gather((await batch.chat(MESSAGES, params)).collect(), other.collect())
    assert crowded == alone
    assert await (await single.chat(MESSAGES, params)).collect() == alone
    unseeded = await (
        await batch.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0.9, n=2))
    ).collect()
    assert unseeded != alone


async def test_more_choices_than_the_model_ever_takes_is_a_400_not_a_429(manager):
    backend = await manager.get("chat")  # capacity: 16 running + 16 queued
    with pytest.raises(BadRequest) as info:
        await backend.chat(MESSAGES, SamplingParams(max_tokens=2, n=backend.capacity + 1))
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_value", "n")
    assert f"at most {backend.capacity}" in info.value.message
    with pytest.raises(BadRequest) as info:
        await backend.complete(["a"] * (backend.capacity + 1), SamplingParams(max_tokens=2))
    assert info.value.param == "prompt"
    gen = await backend.complete(["a"] * 4, SamplingParams(max_tokens=2, n=backend.capacity // 4))
    assert len(await gen.collect()) == backend.capacity  # exactly the capacity is served

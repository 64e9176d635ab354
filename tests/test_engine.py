"""The engine without HTTP: registry validation, continuous batching, cancellation, queue limits, quantisation,
embeddings. Real models throughout (a tiny random Llama built offline and the packaged MiniLM); the output is
gibberish, so the assertions are about tokens, counts and behaviour, never about what the text says."""

from __future__ import annotations

import asyncio
import threading

import pytest
from engine_fixtures import model_config_file, tiny_model_dir  # noqa: F401

from hub_extension.engine import ConfigError, ModelManager, SamplingParams, load_registry, parse_registry
from hub_extension.engine.textstream import IncrementalDetokenizer, StopMatcher
from hub_extension.errors import BadRequest, ModelNotFound, RateLimited

MESSAGES = [{"role": "user", "content": "Tell me about the json module."}]


@pytest.fixture(scope="module")
async def manager(model_config_file):  # noqa: F811
    mgr = ModelManager.from_config(model_config_file)
    await mgr.start()
    yield mgr
    await mgr.close()


async def wait_idle(backend, timeout: float = 5.0) -> None:
    """Until neither our bookkeeping nor the engine itself holds a request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while backend.in_flight() or backend.runner.engine_pending():
        assert loop.time() < deadline, (backend.in_flight(), backend.runner.engine_pending())
        await asyncio.sleep(0.02)


# -- registry ---------------------------------------------------------------------------------------

BAD_ENTRIES = [
    ({"name": "m", "source": "./nope-not-here", "task": "chat"}, "m", "source"),
    ({"name": "m", "source": "org/model", "task": "poetry"}, "m", "task"),
    ({"name": "m", "source": "org/model"}, "m", "task"),
    ({"name": "m", "task": "chat"}, "m", "source"),
    ({"name": "m", "source": "org/model", "task": "chat", "quantization": "int3"}, "m", "quantization"),
    ({"name": "m", "source": "org/model", "task": "chat", "dtype": "float8"}, "m", "dtype"),
    ({"name": "m", "source": "org/model", "task": "chat", "max_concurrency": 0}, "m", "max_concurrency"),
    ({"name": "m", "source": "org/model", "task": "chat", "max_queue": "many"}, "m", "max_queue"),
    ({"name": "m", "source": "org/model", "task": "chat", "context_length": True}, "m", "context_length"),
    ({"name": "m", "source": "org/model", "task": "chat", "kv_cache_bytes": "lots"}, "m", "kv_cache_bytes"),
    (
        {"name": "m", "source": "org/model", "task": "chat", "kv_cache_bytes": "1GiB", "kv_cache_tokens": 10},
        "m",
        "kv_cache_bytes",
    ),
    ({"name": "m", "source": "org/model", "task": "chat", "load": "lazy"}, "m", "load"),
    (
        {"name": "m", "source": "org/model", "task": "chat", "idle_unload_seconds": -1},
        "m",
        "idle_unload_seconds",
    ),
    ({"name": "m", "source": "org/model", "task": "chat", "engine": "vllm"}, "m", "engine"),
    ({"name": "m", "source": "org/model", "task": "chat", "temprature": 1}, "m", "temprature"),
    ({"name": "m", "source": "builtin:gpt5", "task": "chat"}, "m", "source"),
    ({"name": "m", "source": "org/model", "task": "embedding", "quantization": "nf4"}, "m", "quantization"),
    ({"name": "m", "task": "chat", "upstream": {"base_url": "ftp://x"}}, "m", "upstream.base_url"),
    (
        {"name": "m", "task": "chat", "upstream": {"base_url": "http://x", "api_key_env": "NO_SUCH_VAR_42"}},
        "m",
        "upstream.api_key_env",
    ),
    (
        {"name": "m", "task": "chat", "source": "org/model", "upstream": {"base_url": "http://x"}},
        "m",
        "source",
    ),
    ({"name": "bad name!", "source": "org/model", "task": "chat"}, None, "name"),
]


@pytest.mark.parametrize(("entry", "model", "field"), BAD_ENTRIES)
def test_bad_registry_entry_names_model_and_field(entry, model, field):
    with pytest.raises(ConfigError) as info:
        parse_registry({"models": [entry]})
    assert info.value.field == field
    assert info.value.model == model
    assert f"field {field!r}" in str(info.value)
    if model:
        assert f"model {model!r}" in str(info.value)


def test_duplicate_names_are_refused():
    entry = {"name": "m", "source": "org/model", "task": "chat"}
    with pytest.raises(ConfigError, match="model 'm', field 'name'.*twice"):
        parse_registry({"models": [entry, entry]})


def test_registry_file(tmp_path, tiny_model_dir):  # noqa: F811
    (tmp_path / "models.yaml").write_text(
        f"models:\n  - name: a\n    source: {tiny_model_dir}\n    task: chat\n    kv_cache_bytes: 16MiB\n"
        "  - name: up\n    task: chat\n    upstream: {base_url: 'http://127.0.0.1:9/v1/', api_key: sk-x}\n"
    )
    reg = load_registry(tmp_path / "models.yaml")
    assert reg.names() == ["a", "up"]
    assert reg.models["a"].kv_cache_bytes == 16 * 2**20
    assert reg.models["up"].upstream.base_url == "http://127.0.0.1:9/v1"
    assert "sk-x" not in repr(reg.models["up"])
    (tmp_path / "bad.yaml").write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")


# -- text streaming -----------------------------------------------------------------------------------


def test_stop_matcher_never_emits_past_a_stop_and_holds_back_prefixes():
    m = StopMatcher(["</end>", "STOP"])
    out = [m.push(p) for p in ["Hello </", "en", "d> after"]]
    assert out == ["Hello ", "", ""]
    assert m.stopped
    m = StopMatcher(["STOP"])
    assert m.push("aST") == "a"
    assert m.push("x") == "STx"  # the held prefix did not become a stop: released
    assert m.push("S") == ""
    assert m.flush() == "S"


def test_incremental_detokenizer_matches_full_decode(manager):
    backend = manager._slots["tiny-chat"].backend
    tok = backend.tokenizer
    text = "Ünïcödé ✓ and emoji 🎉 survive byte-level BPE, split anywhere."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok)
    streamed = "".join(d.push([i]) for i in ids) + d.flush()
    assert streamed == tok.decode(ids) == text


# -- generation ---------------------------------------------------------------------------------------


async def test_sixteen_concurrent_greedy_streams_equal_sequential(manager):
    backend = await manager.get("tiny-chat")
    prompts = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(16)]
    params = SamplingParams(max_tokens=32, temperature=0)

    sequential = []
    for msgs in prompts:
        gen = await backend.chat(msgs, params)
        sequential.append(((await gen.collect())[0], gen.completion_tokens, gen.prompt_tokens))

    async def stream(msgs):
        gen = await backend.chat(msgs, params)
        text = ""
        async for delta in gen:
            text += delta.text
        return text, gen.completion_tokens, gen.prompt_tokens

    concurrent = await asyncio.gather(*(stream(m) for m in prompts))
    assert concurrent == sequential
    assert all(n == 32 for _, n, _ in concurrent)  # random weights rarely say EOS within 32 tokens

    # The plain generate() path gives the same greedy tokens.
    fallback = await manager.get("tiny-generate")
    gen = await fallback.chat(prompts[3], params)
    assert (await gen.collect())[0] == sequential[3][0]
    await wait_idle(backend)


async def test_generation_never_runs_on_the_event_loop_thread(manager):
    loop_thread = threading.get_ident()
    for name in ("tiny-chat", "tiny-generate"):
        backend = await manager.get(name)
        gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=4, temperature=0))
        await gen.collect()
        assert backend.runner.step_threads, "no forward pass recorded"
        assert loop_thread not in backend.runner.step_threads
    emb = await manager.get("minilm")
    await emb.embed(["hello"])
    assert emb.step_threads and loop_thread not in emb.step_threads


async def test_a_stopped_engine_starts_again_on_the_pool_and_a_failed_start_is_an_error(manager, monkeypatch):
    """The batching engine's thread dies with an error inside a batch (test_faults drives that through HTTP): the
    next request starts it again off the event loop (it joins a thread and builds tensors: seconds), and if it
    cannot start, the waiting requests end with an error instead of waiting for ever."""
    from hub_extension.engine.generation import EngineError

    backend = await manager.get("tiny-chat")
    runner = backend.runner
    params = SamplingParams(max_tokens=4, temperature=0)
    runner.manager.stop(block=True, timeout=5)
    assert runner.needs_restart()

    def cannot_start() -> None:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(runner, "restart", cannot_start)
    gen = await backend.chat(MESSAGES, params)
    with pytest.raises(EngineError):
        await gen.collect()
    assert backend.in_flight() == 0
    monkeypatch.undo()
    gen = await backend.chat(MESSAGES, params)  # the next request tries again, and it starts
    await gen.collect()
    assert gen.completion_tokens > 0
    assert not runner.needs_restart()
    assert runner.restart_threads and threading.get_ident() not in runner.restart_threads
    await wait_idle(backend)


async def test_disconnect_frees_the_slot_and_nothing_is_left_behind(manager):
    backend = await manager.get("tiny-chat")
    gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=400, temperature=0.8))
    got = 0
    async for _ in gen:
        got += 1
        if got == 3:
            break
    gen.cancel()  # what the handler does on on_connection_close
    await wait_idle(backend)
    assert gen.completion_tokens < 400
    # and the next request is served
    gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=8, temperature=0))
    await gen.collect()
    assert gen.completion_tokens == 8
    await wait_idle(backend)


async def test_cancel_in_generate_fallback(manager):
    backend = await manager.get("tiny-generate")
    gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=400, temperature=0))
    async for _ in gen:
        break
    gen.cancel()
    await wait_idle(backend)
    gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=5, temperature=0))
    await gen.collect()
    assert gen.completion_tokens == 5


async def test_full_queue_answers_429_without_blocking(manager):
    backend = await manager.get("tiny-generate")  # capacity: 1 running + 16 queued
    gens = [await backend.chat(MESSAGES, SamplingParams(max_tokens=300, temperature=0)) for _ in range(17)]
    with pytest.raises(RateLimited) as info:
        await backend.chat(MESSAGES, SamplingParams(max_tokens=5, temperature=0))
    assert info.value.status == 429 and "Retry-After" in info.value.headers
    for g in gens:
        g.cancel()
    await wait_idle(backend)
    gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=3, temperature=0))
    await gen.collect()


async def test_n_stop_seed_and_context_bounds(manager):
    backend = await manager.get("tiny-chat")
    greedy = await backend.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0))
    full = (await greedy.collect())[0]
    stop = full[6:9]
    gen = await backend.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    cut = (await gen.collect())[0]
    assert gen.finish_reasons == ["stop"] and stop not in cut and full.startswith(cut)

    # n > 1 fans out; a seed makes sampling repeatable, on both engines
    for name in ("tiny-chat", "tiny-generate"):
        b = await manager.get(name)
        runs = []
        for _ in range(2):
            g = await b.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3))
            runs.append(await g.collect())
        assert runs[0] == runs[1] and len(runs[0]) == 3 and len(set(runs[0])) > 1

    # max_tokens is bounded by the context; a prompt that fills it is a 400
    long_prompt = " ".join(["word"] * 200)
    gen = await backend.complete([long_prompt], SamplingParams(max_tokens=10_000, temperature=0))
    await gen.collect()
    assert gen.prompt_tokens + gen.completion_tokens <= backend.context_length
    with pytest.raises(BadRequest) as info:
        await backend.complete([" ".join(["word"] * 2000)], SamplingParams(max_tokens=5))
    assert info.value.code == "context_length_exceeded"
    await wait_idle(backend)


async def test_unknown_model_and_first_use_loading(model_config_file):  # noqa: F811
    reg = load_registry(model_config_file)
    reg.models = {
        "tiny-chat": reg.models["tiny-chat"].__class__(
            **{**reg.models["tiny-chat"].__dict__, "load": "first_use", "idle_unload_seconds": 0.2}
        )
    }
    mgr = ModelManager(reg, reap_interval=0.1)
    await mgr.start()
    try:
        assert not mgr.info("tiny-chat").loaded
        with pytest.raises(ModelNotFound):
            await mgr.get("nope")
        backends = await asyncio.gather(*(mgr.get("tiny-chat") for _ in range(3)))
        assert backends[0] is backends[1] is backends[2]
        await asyncio.sleep(0.6)
        assert not mgr.info("tiny-chat").loaded  # unloaded when idle
    finally:
        await mgr.close()


@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp4"])
async def test_bitsandbytes_models_load_on_cpu_and_answer(tiny_model_dir, quantization):  # noqa: F811
    reg = parse_registry(
        {
            "models": [
                {
                    "name": f"tiny-{quantization}",
                    "source": str(tiny_model_dir),
                    "task": "chat",
                    "quantization": quantization,
                    "context_length": 256,
                    "kv_cache_tokens": 1024,
                    "page_size": 32,
                }
            ]
        }
    )
    mgr = ModelManager(reg)
    await mgr.start()
    try:
        backend = await mgr.get(f"tiny-{quantization}")
        linear = backend.model.model.layers[0].self_attn.q_proj
        assert type(linear).__module__.startswith("bitsandbytes")
        if quantization != "int8":  # the 4-bit type asked for, not bitsandbytes' default
            assert linear.weight.quant_state.quant_type == quantization
        gens = [await backend.chat(MESSAGES, SamplingParams(max_tokens=6, temperature=0)) for _ in range(2)]
        outs = [await g.collect() for g in gens]
        assert all(g.completion_tokens == 6 for g in gens) and outs[0] == outs[1]
    finally:
        await mgr.close()


# -- embeddings -----------------------------------------------------------------------------------------


async def test_minilm_embeddings_related_pair_scores_higher(manager):
    backend = await manager.get("minilm")
    texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    result, *_ = await asyncio.gather(backend.embed(texts), backend.embed(["batched with the other request"]))
    v = result.vectors
    assert v.shape == (3, 384)
    assert abs(float((v[0] ** 2).sum()) - 1) < 1e-5
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    assert result.prompt_tokens == sum(backend.count_tokens(t) for t in texts)
    with pytest.raises(BadRequest):
        await backend.embed(["word " * 600])


# -- upstream backend, against a second instance of our own /v1 handlers ------------------------------


def serve_v1(manager, prefix: str = "") -> tuple[str, list, object]:
    """Our own /v1 handlers on loopback in identity mode `none`: what an upstream instance of the service answers."""
    from types import SimpleNamespace

    from tornado import httpserver, testing, web

    from hub_extension.handlers import openai as v1
    from hub_extension.identity import IdentityProvider
    from hub_extension.permissions import PermissionPolicy
    from hub_extension.quotas import QuotaPolicy

    events: list[dict] = []
    services = SimpleNamespace(
        identity=IdentityProvider(mode="none"),
        permissions=PermissionPolicy(),
        quotas=QuotaPolicy(),
        models=manager,
        max_body_bytes=1 << 20,
        record_usage=events.append,
    )
    app = web.Application([(prefix + path, handler) for path, handler in v1.routes], services=services)
    sock, port = testing.bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    return f"http://127.0.0.1:{port}{prefix}/v1", events, server


async def test_upstream_backend_forwards_to_another_instance(manager):
    from hub_extension.engine.upstream import UpstreamError

    base_url, events, server = serve_v1(manager, "/services/inference")
    front = ModelManager(
        parse_registry(
            {
                "models": [
                    {
                        "name": "remote-chat",
                        "task": "chat",
                        "upstream": {"base_url": base_url, "api_key": "k", "model": "tiny-chat"},
                    },
                    {
                        "name": "remote-embed",
                        "task": "embedding",
                        "upstream": {"base_url": base_url, "model": "minilm"},
                    },
                    {
                        "name": "remote-missing",
                        "task": "chat",
                        "upstream": {"base_url": base_url, "model": "no-such-model"},
                    },
                ]
            }
        )
    )
    await front.start()
    try:
        local = await manager.get("tiny-chat")
        remote = await front.get("remote-chat")
        params = SamplingParams(max_tokens=12, temperature=0)
        expected = await local.chat(MESSAGES, params)
        expected_text = (await expected.collect())[0]

        gen = await remote.chat(MESSAGES, params)
        deltas = [d async for d in gen]
        assert "".join(d.text for d in deltas) == expected_text and len(deltas) > 1
        assert (gen.prompt_tokens, gen.completion_tokens) == (expected.prompt_tokens, 12)
        assert gen.finish_reasons == ["length"]

        gen = await remote.complete(["one", "two"], SamplingParams(max_tokens=3, temperature=0, n=2))
        assert len(await gen.collect()) == 4 and gen.completion_tokens == 12

        emb = await (await front.get("remote-embed")).embed(["a cat", "a kitten"])
        direct = await (await manager.get("minilm")).embed(["a cat", "a kitten"])
        assert abs(emb.vectors - direct.vectors).max() < 1e-6 and emb.prompt_tokens == direct.prompt_tokens

        with pytest.raises(UpstreamError):  # our config's fault, not the caller's: 502, never a 404/401
            await (await front.get("remote-missing")).chat(MESSAGES, params)
        with pytest.raises(BadRequest) as info:  # the caller's fault: the upstream's 400 comes through
            await remote.complete([" ".join(["word"] * 2000)], params)
        assert info.value.param == "prompt"

        # a disconnect upstream-side frees the upstream's slot too
        gen = await remote.chat(MESSAGES, SamplingParams(max_tokens=400, temperature=0.7))
        async for _ in gen:
            break
        gen.cancel()
        await wait_idle(local)
        assert remote.in_flight() == 0
        assert {e["endpoint"] for e in events} >= {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
        }
    finally:
        await front.close()
        server.stop()


async def test_openai_sdk_against_the_v1_handlers(manager):
    """The wire format as the real openai SDK reads it (the Hub-proxied path is covered by the service tests)."""
    import httpx
    import openai

    base_url, events, server = serve_v1(manager)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused-in-mode-none", max_retries=0)
    try:
        assert {m.id for m in (await client.models.list()).data} >= {"tiny-chat", "tiny-generate", "minilm"}
        assert (await client.models.retrieve("minilm")).id == "minilm"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-nope")

        chat = dict(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0)
        whole = await client.chat.completions.create(**chat)
        assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
        text, usage = "", None
        async for chunk in await client.chat.completions.create(
            **chat, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == whole.choices[0].message.content and usage == whole.usage

        comp = await client.completions.create(
            model="tiny-chat", prompt=["a", "b"], max_tokens=4, n=2, temperature=0
        )
        assert [c.index for c in comp.choices] == [0, 1, 2, 3] and comp.usage.completion_tokens == 16
        emb = await client.embeddings.create(model="minilm", input=["a cat", "a kitten"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384

        for kwargs, error, param in [
            (dict(model="nope"), openai.NotFoundError, "model"),
            (
                dict(model="tiny-chat", tools=[{"type": "function", "function": {"name": "f"}}]),
                openai.BadRequestError,
                "tools",
            ),
            (dict(model="tiny-chat", logprobs=True), openai.BadRequestError, "logprobs"),
            (dict(model="tiny-chat", temperature="hot"), openai.BadRequestError, "temperature"),
            (dict(model="tiny-chat", extra_body={"mystery": 1}), openai.BadRequestError, "mystery"),
            (dict(model="minilm"), openai.BadRequestError, "model"),
        ]:
            with pytest.raises(error) as info:
                await client.chat.completions.create(messages=MESSAGES, **kwargs)
            assert info.value.body["param"] == param
        harmless = await client.chat.completions.create(
            **chat, user="u1", metadata={"a": "b"}, presence_penalty=0
        )
        assert harmless.usage.completion_tokens == 10

        async with httpx.AsyncClient() as http:
            r = await http.post(base_url + "/chat/completions", json={"messages": MESSAGES})
            assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # never a default model

        # a full queue is a 429 the SDK maps to RateLimitError, with Retry-After
        busy = await manager.get("tiny-generate")
        held = [await busy.chat(MESSAGES, SamplingParams(max_tokens=300, temperature=0)) for _ in range(17)]
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**{**chat, "model": "tiny-generate"})
        assert info.value.response.headers["retry-after"]
        for g in held:
            g.cancel()
        await wait_idle(busy)

        # a client that disconnects mid-stream frees its slot
        local = await manager.get("tiny-chat")
        async with httpx.AsyncClient() as http:
            body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 400, "stream": True}
            async with http.stream("POST", base_url + "/chat/completions", json=body) as r:
                assert r.headers["x-accel-buffering"] == "no"
                async for _ in r.aiter_lines():
                    break
        await wait_idle(local)
        statuses = [e["status"] for e in events if e["endpoint"] == "/v1/chat/completions"]
        assert 499 in statuses and 429 in statuses and 404 in statuses
    finally:
        await client.close()
        server.stop()

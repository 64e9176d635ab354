"""The upstream backend against a real, misbehaving HTTP server on loopback (no Hub): answers that are not
JSON, bodies and streams cut off, and one slot per request, taken before the first await."""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado import httpserver, testing, web

from hub_extension.engine import SamplingParams
from hub_extension.engine.registry import ModelSpec, UpstreamSpec
from hub_extension.engine.upstream import UpstreamBackend, UpstreamError
from hub_extension.errors import RateLimited

CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]})
HTML = "<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


class Misbehaving(web.RequestHandler):
    """An OpenAI-compatible server; the first path segment says how it misbehaves."""

    async def post(self, mode: str, endpoint: str) -> None:
        stream = endpoint != "embeddings"
        if mode == "html":  # an error page from a proxy in front of the upstream
            self.set_status(500)
            self.set_header("Content-Type", "text/html")
            self.finish(HTML)
        elif mode == "html200":
            self.set_header("Content-Type", "text/html")
            self.finish(HTML)
        elif mode == "cut" and not stream:  # a complete HTTP answer whose JSON stops mid-way
            self.set_header("Content-Type", "application/json")
            self.finish('{"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.')
        elif mode == "short":  # promises 1000 bytes, sends 17 and hangs up
            conn = self.detach()
            await conn.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"object": "list"'
            )
            conn.close()
        else:
            self.set_header("Content-Type", "text/event-stream")
            if mode == "garbage":
                self.finish("data: <html>oops</html>\n\n")
                return
            self.write(f"data: {CHUNK}\n\n")
            if mode == "cut":  # the stream ends without [DONE]
                self.finish()
                return
            await self.flush()  # "slow": holds the stream open until the client leaves
            self.settings["left"].append(await self.settings["gone"].get())

    def on_connection_close(self) -> None:
        self.settings["gone"].put_nowait(self.request.path)


class Upstream:
    """The misbehaving server on loopback, and the backends pointed at it."""

    def __init__(self):
        self.left: list[str] = []  # paths of the streams whose client hung up
        app = web.Application([(r"/(\w+)/v1/(.*)", Misbehaving)], left=self.left, gone=asyncio.Queue())
        sock, self.port = testing.bind_unused_port()
        self.server = httpserver.HTTPServer(app)
        self.server.add_sockets([sock])
        self.backends: list[UpstreamBackend] = []

    def backend(self, mode: str, task: str = "embedding", **spec) -> UpstreamBackend:
        up = UpstreamSpec(base_url=f"http://127.0.0.1:{self.port}/{mode}/v1", timeout=30)
        self.backends.append(UpstreamBackend(ModelSpec(name="remote", task=task, upstream=up, **spec)))
        return self.backends[-1]

    async def until_left(self, n: int) -> None:
        while len(self.left) < n:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for backend in self.backends:
            await backend.aclose()
        self.server.stop()


@pytest.fixture
async def upstream():
    server = Upstream()
    yield server
    await server.close()


def assert_502(error: UpstreamError, status: int) -> None:
    assert error.status == 502 and f"HTTP {status}" in error.message
    body = error.to_json()["error"]
    assert body["type"] == "server_error" and body["code"] == "upstream_error"


@pytest.mark.parametrize(("mode", "status"), [("html", 500), ("html200", 200), ("cut", 200), ("short", 200)])
async def test_embeddings_answer_that_is_not_json_is_a_502(upstream, mode, status):
    backend = upstream.backend(mode)
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(backend.embed(["a cat"]), 20)
    assert_502(info.value, status)
    assert backend.in_flight() == 0


@pytest.mark.parametrize(
    ("mode", "status"), [("html", 500), ("html200", 200), ("garbage", 200), ("cut", 200)]
)
async def test_chat_answer_that_is_not_an_event_stream_is_a_502(upstream, mode, status):
    backend = upstream.backend(mode, task="chat")

    async def chat():
        return await (await backend.chat([{"role": "user", "content": "hi"}], SamplingParams())).collect()

    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(chat(), 20)
    assert_502(info.value, status)
    assert backend.in_flight() == 0


async def test_one_slot_per_request_taken_before_the_first_await(upstream):
    backend = upstream.backend("slow", task="chat", max_concurrency=1, max_queue=1)  # capacity 2
    messages = [{"role": "user", "content": "hi"}]
    results = await asyncio.gather(
        *(backend.chat(messages, SamplingParams()) for _ in range(3)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, RateLimited)]
    gens = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 1 and len(gens) == 2 and backend.in_flight() == 2
    for gen in gens:
        gen.cancel()
    assert backend.in_flight() == 0
    await asyncio.wait_for(upstream.until_left(2), 20)  # the upstream saw both streams closed

    # a request with several choices is still one request: 2 prompts x n=2 fit in 2 slots
    gen = await backend.complete(["a", "b"], SamplingParams(n=2))
    assert backend.in_flight() == 1 and len(gen.finish_reasons) == 4
    gen.cancel()
    assert backend.in_flight() == 0


async def test_idle_connections_are_dropped_before_the_upstream_drops_them(upstream):
    """uvicorn (vLLM) and Node close connections idle for 5 s, httpx's own default: ours stop sooner."""
    from hub_extension.engine.upstream import KEEPALIVE_SECONDS

    backend = upstream.backend("html")
    assert KEEPALIVE_SECONDS < 5 and backend.client._transport._pool._keepalive_expiry == KEEPALIVE_SECONDS

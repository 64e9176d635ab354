"""An upstream backend (E6): another OpenAI-compatible server (vLLM, TGI, llama.cpp, or another instance of
this service) answers for a model, behind the same interface as a local model.

Our identity, permission and usage layers still apply on our side; the upstream sees only our key. Requests go
upstream as streams (even when our client did not ask for one) so a disconnect can stop them, and the upstream's
usage chunk gives the token counts. Upstream errors are translated: a bad request stays the caller's 400, a
429 stays a 429 with its Retry-After, and anything that is our configuration's fault (a wrong upstream key, a
missing model) or the upstream's (5xx, unreachable) is a 502/503, never a 401 the caller could mistake for theirs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import numpy as np

from ..errors import ApiError, BadRequest, RateLimited, ServiceUnavailable
from .embeddings import EmbeddingResult
from .generation import Delta, SamplingParams
from .registry import ModelSpec

log = logging.getLogger("hub_extension.engine")


# A connection idle this long is not reused: servers close idle ones after a few seconds (uvicorn, so vLLM: 5 s;
# Node: 5 s), and a request sent on one just as it closes fails ("unreachable") without being retried.
KEEPALIVE_SECONDS = 2.0


class UpstreamError(ApiError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamGeneration:
    """Same surface as `generation.Generation`: iterate for `Delta`s, `cancel()`, token counts at the end.

    Holds one of the backend's slots from the moment the upstream answered until the stream ends, fails or is
    cancelled, and gives it back exactly once."""

    def __init__(self, backend: UpstreamBackend, response: httpx.Response, choices: int, field: str):
        self._backend = backend
        self._response = response
        self._field = field  # "delta" (chat) or "text" (completions)
        self.finish_reasons: list[str | None] = [None] * choices
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._open = True

    async def __aiter__(self) -> AsyncIterator[Delta]:
        status = self._response.status_code
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                for delta in self._deltas(data):
                    yield delta
            if self._open:  # the stream ended without our own cancel() closing it
                raise self._backend._fault(status, "an event stream that ended before [DONE]")
        except (httpx.HTTPError, httpx.StreamError) as e:
            if self._open:
                raise self._backend._fault(status, f"an event stream cut off ({type(e).__name__})") from None
        finally:
            self._release()
            await self._response.aclose()

    def _deltas(self, data: str) -> list[Delta]:
        """One `data:` event's deltas; an event that is not a completion chunk is the upstream's fault."""
        try:
            chunk = json.loads(data)
            if chunk.get("error"):
                err = chunk["error"]
                message = err.get("message", err) if isinstance(err, dict) else err
                raise UpstreamError(f"The upstream for '{self._backend.name}' failed mid-stream: {message}")
            if chunk.get("usage"):
                self.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                self.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            deltas = []
            for choice in chunk.get("choices") or []:
                index = int(choice.get("index", 0))
                if self._field == "delta":
                    text = (choice.get("delta") or {}).get("content") or ""
                else:
                    text = choice.get("text") or ""
                reason = choice.get("finish_reason")
                if 0 <= index < len(self.finish_reasons) and reason:
                    self.finish_reasons[index] = reason
                if text or reason:
                    deltas.append(Delta(index, text, reason))
            return deltas
        except (ValueError, TypeError, AttributeError, KeyError):
            raise self._backend._fault(
                self._response.status_code, "an event that is not a completion chunk", data
            ) from None

    async def collect(self) -> list[str]:
        texts = [""] * len(self.finish_reasons)
        async for delta in self:
            if 0 <= delta.index < len(texts):
                texts[delta.index] += delta.text
        return texts

    def cancel(self) -> None:
        """The caller left: give the slot back now and close the stream, which stops the upstream's work."""
        if self._open:
            self._release()
            self._backend._close_soon(self._response)

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._backend._release()


class UpstreamBackend:
    """`capacity` (max_concurrency + max_queue) counts requests open to the upstream, whatever their `n` or
    number of inputs: a slot is taken before the first await and given back once the answer is read, the
    stream ends, fails or is cancelled."""

    kind = "upstream"

    def __init__(self, spec: ModelSpec):
        up = spec.upstream
        assert up is not None
        self.spec = spec
        self.name = spec.name
        self.task = spec.task
        self.remote_model = up.model or spec.name
        self.context_length = spec.context_length
        self.capacity = spec.max_concurrency + spec.max_queue
        headers = {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=up.base_url + "/", headers=headers, timeout=httpx.Timeout(up.timeout, connect=10.0),
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS),
        )
        self._inflight = 0
        self._closing: set[asyncio.Task] = set()  # streams cancel() is closing, kept until closed

    def in_flight(self) -> int:
        """Requests open to the upstream."""
        return self._inflight

    def _body(self, params: SamplingParams) -> dict:
        body = {
            "model": self.remote_model,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def chat(self, messages, params: SamplingParams) -> UpstreamGeneration:
        body = self._body(params) | {"messages": list(messages)}
        return await self._start("chat/completions", body, params.n, "delta")

    async def complete(self, prompts, params: SamplingParams) -> UpstreamGeneration:
        body = self._body(params) | {"prompt": list(prompts)}
        return await self._start("completions", body, len(prompts) * params.n, "text")

    async def embed(self, texts: list[str]) -> EmbeddingResult:
        self._reserve()
        try:
            response = await self._send(
                "embeddings", {"model": self.remote_model, "input": list(texts), "encoding_format": "float"}
            )
            try:
                content = await response.aread()
            except httpx.HTTPError as e:
                raise self._fault(response.status_code, f"a body cut off ({type(e).__name__})") from None
            finally:
                await response.aclose()
        finally:
            self._release()
        try:
            data = json.loads(content)
            rows = sorted(data["data"], key=lambda d: d["index"])
            vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
            prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        except (ValueError, TypeError, AttributeError, KeyError):
            raise self._fault(
                response.status_code, "a body that is not a list of embeddings", content
            ) from None
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise self._fault(response.status_code, f"{len(vectors)} embeddings for {len(texts)} inputs")
        return EmbeddingResult(vectors=vectors, prompt_tokens=prompt_tokens)

    # -- slots and the HTTP exchange -------------------------------------------------------------

    def _reserve(self) -> None:
        if self._inflight >= self.capacity:
            raise RateLimited(
                f"The model '{self.name}' is at capacity ({self.capacity} requests in flight); retry shortly.",
                retry_after=1.0,
            )
        self._inflight += 1

    def _release(self) -> None:
        self._inflight -= 1

    async def _start(self, path: str, body: dict, choices: int, field: str) -> UpstreamGeneration:
        self._reserve()
        try:
            response = await self._send(path, body)
            content_type = response.headers.get("content-type", "")
            if "text/event-stream" not in content_type:
                await response.aclose()
                raise self._fault(
                    response.status_code, f"{content_type or 'no content type'}, not an event stream"
                )
        except BaseException:  # cancelled included: the slot is only kept with a stream to read
            self._release()
            raise
        return UpstreamGeneration(self, response, choices, field)

    async def _send(self, path: str, body: dict) -> httpx.Response:
        """POST `body`; the response once its status (below 400) is in, its body still to read."""
        request = self.client.build_request("POST", path, json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise ServiceUnavailable(
                f"The upstream for '{self.name}' is unreachable ({type(e).__name__}).", retry_after=5
            ) from None
        if response.status_code < 400:
            return response
        try:
            content = await response.aread()
        except httpx.HTTPError:
            content = b""  # the status says enough
        finally:
            await response.aclose()
        raise self._error(response.status_code, content, response.headers)

    def _error(self, status: int, content: bytes, headers) -> ApiError:
        try:
            err = json.loads(content).get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
        message = err.get("message")
        if status in (400, 413, 422):
            return BadRequest(message or "The upstream refused the request.", param=err.get("param"))
        if status == 429:
            try:
                retry = float(headers.get("retry-after", "1"))
            except ValueError:
                retry = 1.0
            return RateLimited(message or "The upstream is busy.", retry_after=retry)
        what = "an error" if message else "an answer that is not an OpenAI error"
        return self._fault(status, what, detail=message or content)

    def _fault(self, status: int, what: str, detail: str | bytes = "") -> UpstreamError:
        """The upstream's (or our configuration's) fault: a 502 naming its status, the details in our log."""
        log.warning(
            "upstream %s for model %r answered %d with %s: %r",
            self.client.base_url,
            self.name,
            status,
            what,
            detail[:200],
        )
        return UpstreamError(f"The upstream for '{self.name}' answered HTTP {status} with {what}.")

    def _close_soon(self, response: httpx.Response) -> None:
        task = asyncio.ensure_future(response.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.client.aclose()

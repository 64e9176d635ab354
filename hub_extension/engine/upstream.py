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
from .generation import Delta, EngineError, SamplingParams
from .registry import ModelSpec

log = logging.getLogger("hub_extension.engine")


class UpstreamError(ApiError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamGeneration:
    """Same surface as `generation.Generation`: iterate for `Delta`s, `cancel()`, token counts at the end."""

    def __init__(self, backend: UpstreamBackend, response: httpx.Response, choices: int, field: str):
        self._backend = backend
        self._response = response
        self._field = field  # "delta" (chat) or "text" (completions)
        self.finish_reasons: list[str | None] = [None] * choices
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._done = False

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"] or {}
                    raise EngineError(f"Upstream error: {err.get('message', err)}")
                if chunk.get("usage"):
                    self.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                    self.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    index = int(choice.get("index", 0))
                    if self._field == "delta":
                        text = (choice.get("delta") or {}).get("content") or ""
                    else:
                        text = choice.get("text") or ""
                    reason = choice.get("finish_reason")
                    if index < len(self.finish_reasons) and reason:
                        self.finish_reasons[index] = reason
                    if text or reason:
                        yield Delta(index, text, reason)
        except httpx.HTTPError as e:
            raise EngineError(f"Upstream connection failed mid-stream: {type(e).__name__}") from None
        finally:
            self._close()
            await self._response.aclose()

    async def collect(self) -> list[str]:
        texts = [""] * len(self.finish_reasons)
        async for delta in self:
            if delta.index < len(texts):
                texts[delta.index] += delta.text
        return texts

    def cancel(self) -> None:
        if not self._done:
            self._close()
            asyncio.ensure_future(self._response.aclose())

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._backend._inflight -= 1


class UpstreamBackend:
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
            base_url=up.base_url + "/", headers=headers, timeout=httpx.Timeout(up.timeout, connect=10.0)
        )
        self._inflight = 0

    def in_flight(self) -> int:
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
        self._admit(1)
        self._inflight += 1
        try:
            response = await self.client.post(
                "embeddings",
                json={"model": self.remote_model, "input": list(texts), "encoding_format": "float"},
            )
            if response.status_code >= 400:
                raise self._error(response.status_code, response.content, response.headers)
            data = response.json()
        except httpx.HTTPError as e:
            raise ServiceUnavailable(
                f"The upstream for '{self.name}' is unreachable ({type(e).__name__}).", retry_after=5
            ) from None
        finally:
            self._inflight -= 1
        rows = sorted(data["data"], key=lambda d: d["index"])
        vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        return EmbeddingResult(
            vectors=vectors, prompt_tokens=int((data.get("usage") or {}).get("prompt_tokens", 0))
        )

    def _admit(self, n: int) -> None:
        if self._inflight + n > self.capacity:
            raise RateLimited(f"The model '{self.name}' is at capacity; retry shortly.", retry_after=1.0)

    async def _start(self, path: str, body: dict, choices: int, field: str) -> UpstreamGeneration:
        self._admit(choices)
        request = self.client.build_request("POST", path, json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise ServiceUnavailable(
                f"The upstream for '{self.name}' is unreachable ({type(e).__name__}).", retry_after=5
            ) from None
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise self._error(response.status_code, content, response.headers)
        self._inflight += 1
        return UpstreamGeneration(self, response, choices, field)

    def _error(self, status: int, content: bytes, headers) -> ApiError:
        try:
            err = json.loads(content).get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        message = err.get("message") if isinstance(err, dict) else None
        if status in (400, 413, 422):
            return BadRequest(
                message or "The upstream refused the request.",
                param=err.get("param") if isinstance(err, dict) else None,
            )
        if status == 429:
            try:
                retry = float(headers.get("retry-after", "1"))
            except ValueError:
                retry = 1.0
            return RateLimited(message or "The upstream is busy.", retry_after=retry)
        log.warning(
            "upstream %s for model %r answered %d: %s", self.client.base_url, self.name, status, message
        )
        return UpstreamError(f"The upstream for '{self.name}' failed ({status}).")

    async def aclose(self) -> None:
        await self.client.aclose()

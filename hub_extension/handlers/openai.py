"""The OpenAI-compatible API under `/v1`: models, chat completions, completions, embeddings.

Thin on purpose: parse the request with `protocol` (which also shapes the answers), ask the one permission
hook, call the engine, write OpenAI's JSON or server-sent events. A model the caller may not use answers
exactly like a model that does not exist. Streams flush every chunk so they pass the Hub's proxy unbuffered;
a client that goes away cancels its engine work and its request is recorded with status 499.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

from tornado.iostream import StreamClosedError

from .. import protocol
from ..errors import ApiError, BadRequest, Forbidden, ModelNotFound, NotFound
from ..presets import PRESET_PREFIX, apply_preset
from ..quotas import Reservation, estimate_tokens
from .base import OpenAIHandler

log = logging.getLogger("hub_extension.openai")

CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the answer


class _V1Handler(OpenAIHandler):
    """What every /v1 handler shares: the body, the model look-up behind the permission hook, disconnects,
    usage."""

    feature: str = ""
    endpoint: str = ""

    def initialize(self) -> None:
        self._t0 = time.perf_counter()
        self._arrived = time.time()
        self._streamed = False
        self._inflight: Any = None  # engine work (a Generation or a Task): cancel() when the client leaves
        self._client_gone = False
        self._recorded = False
        self._model: str | None = None
        self._tokens = (0, 0)
        self._reservation = Reservation(None)  # the caller's quota held for this request

    async def _backend(self, model: str, tasks: tuple[str, ...]):
        """The backend for `model`, or the error the caller should see."""
        permissions = self.services.permissions
        if not permissions.allowed(self.identity, self.feature):
            raise Forbidden(f"You do not have access to the '{self.feature}' feature.")
        manager = self.services.models
        spec = manager.spec(model) if manager is not None else None
        if spec is None or not permissions.allowed(self.identity, self.feature, model):
            raise ModelNotFound(model)  # "not yours" answers like "no such model"
        self._model = model
        if spec.task not in tasks:
            raise BadRequest(
                f"The model '{model}' serves {spec.task} requests, not {self.endpoint}.",
                param="model",
                code="model_not_supported",
            )
        return await manager.get(model)

    def on_connection_close(self) -> None:
        """The client went away: stop the engine work for it now."""
        self._client_gone = True
        if self._inflight is not None:
            self._inflight.cancel()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._record(CLIENT_CLOSED if self._client_gone else self.get_status())

    def _reserve(self, tokens: int) -> None:
        """Hold the request's worst case against the caller's quota (429 when over a limit), before generating."""
        self._reservation = self.services.quotas.reserve(self.identity, tokens)

    def _record(self, status: int) -> None:
        if self._recorded:
            return
        self._recorded = True
        if self._inflight is None:  # refused or failed before generating: the request never ran
            self._reservation.release()
        else:
            self._reservation.settle(sum(self._counts()))
        try:
            self.services.record_usage(self._usage_event(status))
        except Exception:
            log.exception("usage recording failed")

    def _counts(self) -> tuple[int, int]:
        """Prompt and completion tokens so far."""
        return self._tokens

    def _usage_event(self, status: int) -> dict:
        """One request's usage, errors and refusals included, for the metering seam."""
        identity = getattr(self, "identity", None)
        prompt_tokens, completion_tokens = self._counts()
        return {
            "time": self._arrived,
            "user": identity.name if identity else None,
            "credential": identity.via if identity else None,
            "user_id": identity.user_id if identity else None,
            "key_id": identity.key_id if identity else None,
            "acting_admin": identity.acting_admin if identity else None,
            "model": self._model,
            "endpoint": self.endpoint,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": round((time.perf_counter() - self._t0) * 1000, 3),
            "ttft_ms": self._ttft_ms(),
            "status": status,
            "streamed": self._streamed,
        }

    def _ttft_ms(self) -> float | None:
        """Time to the first token, for generation requests that produced one."""
        first = getattr(self._inflight, "first_token_at", None)
        return round((first - self._t0) * 1000, 3) if first is not None else None


class ModelsHandler(_V1Handler):
    endpoint = "/v1/models"

    def get(self) -> None:
        manager = self.services.models
        infos = manager.list_models() if manager is not None else []
        visible = set(self.services.permissions.visible_models(self.identity, [i.name for i in infos]))
        data = [protocol.model_object(i) for i in infos if i.name in visible]
        self.write_json({"object": "list", "data": data})


class ModelHandler(_V1Handler):
    endpoint = "/v1/models/{model}"

    def get(self, name: str) -> None:
        manager = self.services.models
        info = manager.info(name) if manager is not None else None
        if info is None or name not in self.services.permissions.visible_models(self.identity, [name]):
            raise ModelNotFound(name)
        self.write_json(protocol.model_object(info))


class CompletionsHandler(_V1Handler):
    """Completions, and through `ChatCompletionsHandler` chat completions: one path, streaming or not.
    The chat handler overrides only what differs: the parser, how the engine is asked, the answer's shape."""

    feature = "completions"
    endpoint = "/v1/completions"
    tasks: tuple[str, ...] = ("completion", "chat")
    shape: type[protocol.CompletionShape] = protocol.CompletionShape
    parse = staticmethod(protocol.parse_completion)

    async def generate(self, backend, request: protocol.CompletionRequest):
        return await backend.complete(request.prompts, request.params)

    @staticmethod
    def prompt_texts(request: protocol.CompletionRequest) -> list:
        return request.prompts

    def _admit(self, backend, request: protocol.CompletionRequest):
        """Reserve max_tokens x choices + the prompt against the quota; the request with its fair-share tenant."""
        params = request.params
        prompts = self.prompt_texts(request)
        answer = params.max_tokens or backend.spec.default_max_tokens or backend.context_length or 0
        self._reserve(len(prompts) * params.n * answer + estimate_tokens(prompts))
        weight = self.services.quotas.weight(self.identity)
        return dataclasses.replace(request, params=dataclasses.replace(params, tenant=self.identity.name, weight=weight))

    def _counts(self) -> tuple[int, int]:
        gen = self._inflight
        return (gen.prompt_tokens, gen.completion_tokens) if gen is not None else (0, 0)

    async def with_preset(self, body: dict) -> dict:
        """Completions take no presets: the body as sent."""
        return body

    async def post(self) -> None:
        request = self.parse(await self.with_preset(await self.json_body()))
        backend = await self._backend(request.model, self.tasks)
        request = self._admit(backend, request)
        gen = self._inflight = await self.generate(backend, request)
        if self._client_gone:  # left while the model loaded or the request was admitted
            gen.cancel()
            return
        shape = self.shape(request.model)
        self._streamed = request.stream
        if request.stream:
            await self._stream(gen, shape, request.include_usage)
            return
        texts = await gen.collect()
        if self._client_gone:  # cancelled by on_connection_close: nobody to answer (on_finish records 499)
            return
        usage = protocol.usage(*self._counts())
        self.write_json(shape.answer(texts, gen.finish_reasons, usage))

    async def _stream(self, gen, shape: protocol.CompletionShape, include_usage: bool) -> None:
        """Send every delta as it comes; end with usage (if asked) and `[DONE]`."""
        extra = {"usage": None} if include_usage else {}
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        try:
            for chunk in shape.opening(len(gen.finish_reasons)):
                await self._send(chunk | extra)
            try:
                async for delta in gen:
                    await self._send(shape.chunk(delta.index, delta.text, delta.finish_reason) | extra)
                if include_usage:
                    await self._send(shape.usage_chunk(protocol.usage(*self._counts())))
            except ApiError as e:  # the engine failed mid-stream: the SDK raises APIError on this chunk
                await self._send(e.to_json())
            await self._send("[DONE]")
            self.finish()
        except StreamClosedError:
            gen.cancel()
            self._record(CLIENT_CLOSED)

    async def _send(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        self.write(f"data: {data}\n\n")
        await self.flush()


class ChatCompletionsHandler(CompletionsHandler):
    feature = "chat"
    endpoint = "/v1/chat/completions"
    tasks = ("chat",)
    shape = protocol.ChatShape
    parse = staticmethod(protocol.parse_chat)

    async def generate(self, backend, request: protocol.ChatRequest):
        return await backend.chat(request.messages, request.params)

    async def with_preset(self, body: dict) -> dict:
        """`model: "preset:<name>"`: the caller's own preset, as the plain request it stands for (its model then
        passes the same permission check as one named directly). Anyone else's preset is "no such model"."""
        model = body.get("model")
        if not (isinstance(model, str) and model.startswith(PRESET_PREFIX)):
            return body
        if not self.services.permissions.allowed(self.identity, "resources"):
            raise Forbidden("You do not have access to the 'resources' feature (presets).")
        try:
            if self.services.presets is None:
                raise NotFound(model)
            preset = await self.services.presets.get(self.identity.user_id or 0, model[len(PRESET_PREFIX):])
        except NotFound:
            raise ModelNotFound(model) from None
        return apply_preset(body, preset)

    @staticmethod
    def prompt_texts(request: protocol.ChatRequest) -> list:
        return ["".join(m["content"] for m in request.messages)]


class EmbeddingsHandler(_V1Handler):
    feature = "embeddings"
    endpoint = "/v1/embeddings"

    async def post(self) -> None:
        request = protocol.parse_embedding(await self.json_body())
        backend = await self._backend(request.model, ("embedding",))
        dimensions = getattr(backend, "dimensions", request.dimensions)
        if request.dimensions is not None and request.dimensions != dimensions:
            raise BadRequest(
                f"The model '{request.model}' only produces {dimensions} dimensions.",
                param="dimensions",
                code="unsupported_parameter",
            )
        self._reserve(estimate_tokens(request.texts))
        if self._client_gone:  # left while the model loaded (on_finish records 499)
            return
        work = self._inflight = asyncio.ensure_future(backend.embed(request.texts))
        try:
            result = await work
        except asyncio.CancelledError:
            if self._client_gone:  # cancelled by on_connection_close (on_finish records 499)
                return
            raise
        self._tokens = (result.prompt_tokens, 0)
        # 2,048 x 384 floats are 16 MB of JSON: encoded on a worker thread, row by row.
        self.finish(
            await asyncio.to_thread(
                protocol.embeddings_json,
                request.model,
                result.vectors,
                result.prompt_tokens,
                request.encoding_format,
            )
        )


routes = [
    (r"/v1/models", ModelsHandler),
    (r"/v1/models/(.+)", ModelHandler),
    (r"/v1/chat/completions", ChatCompletionsHandler),
    (r"/v1/completions", CompletionsHandler),
    (r"/v1/embeddings", EmbeddingsHandler),
]

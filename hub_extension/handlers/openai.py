"""The OpenAI-compatible API under `/v1`: models, chat completions, completions, embeddings.

Thin on purpose: parse and validate the request (a wrong type or an unsupported parameter that would change
the answer is a 400 naming it; unknown parameters too, as OpenAI does), ask the one permission hook, call the
engine, write OpenAI's JSON or server-sent events. A model the caller may not use answers exactly like a model
that does not exist. Streams flush every chunk so they pass the Hub's proxy unbuffered, and a client that goes
away cancels its engine request.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from typing import Any

from tornado.iostream import StreamClosedError

from ..engine import Generation, SamplingParams
from ..errors import ApiError, BadRequest, Forbidden, ModelNotFound
from .base import OpenAIHandler

log = logging.getLogger("hub_extension.openai")

MAX_N = 16
MAX_STOP = 4
OWNED_BY = "jupyterhub-inference"

# Parameters accepted and ignored because they cannot change the answer.
HARMLESS = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "stream_options",
    "safety_identifier",
    "prompt_cache_key",
}
# Parameters OpenAI defines that would change the answer and that this server does not do: 400, never ignored.
UNSUPPORTED = {
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "suffix",
    "echo",
    "best_of",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "verbosity",
    "top_k",
}
CHAT_PARAMS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
}
COMPLETION_PARAMS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream"}
EMBEDDING_PARAMS = {"model", "input", "encoding_format", "dimensions"}


# -- validation helpers ---------------------------------------------------------------------------------


def _type_error(param: str, expected: str, value: Any) -> BadRequest:
    got = (
        "null"
        if value is None
        else {
            bool: "a boolean",
            str: "a string",
            int: "an integer",
            float: "a number",
            list: "an array",
            dict: "an object",
        }.get(type(value), type(value).__name__)
    )
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
        param=param,
        code="invalid_type",
    )


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(key, "a number", value)
    if not lo <= value <= hi:
        raise BadRequest(
            f"'{key}' must be between {lo} and {hi}, got {value}.", param=key, code="invalid_value"
        )
    return float(value)


def _integer(body: dict, key: str, lo: int, hi: int | None, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, "an integer", value)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise BadRequest(f"'{key}' must be {bound}, got {value}.", param=key, code="invalid_value")
    return value


def _boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(key, "a boolean", value)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} sequences.", param="stop", code="invalid_value")
    return tuple(s for s in value if s)


def _check_params(body: dict, allowed: set[str]) -> None:
    """Unknown or unsupported parameters are refused by name; harmless ones pass."""
    for key, value in body.items():
        if key in allowed or key in HARMLESS:
            continue
        if key in UNSUPPORTED:
            if _is_default(key, value):
                continue
            raise BadRequest(
                f"The parameter '{key}' is not supported by this server.",
                param=key,
                code="unsupported_parameter",
            )
        raise BadRequest(
            f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter"
        )


def _is_default(key: str, value: Any) -> bool:
    """An unsupported parameter sent with its no-op value (many clients send these) changes nothing."""
    if value is None:
        return True
    if key in ("presence_penalty", "frequency_penalty"):
        return not isinstance(value, bool) and isinstance(value, int | float) and value == 0
    if key in ("logprobs", "echo"):
        return value is False
    if key in ("tools", "functions", "logit_bias"):
        return value in ([], {})
    if key == "tool_choice":
        return value == "none"
    if key == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if key == "modalities":
        return value == ["text"]
    if key == "best_of":
        return value == 1
    return False


def _sampling(body: dict, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 0, 1, 1.0),
        stop=_stop(body),
        seed=_integer(body, "seed", -(2**63), 2**63 - 1, None),
        n=_integer(body, "n", 1, MAX_N, 1),
    )


def _messages(body: dict) -> list[dict[str, str]]:
    value = body.get("messages")
    if value is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(value, list):
        raise _type_error("messages", "an array", value)
    if not value:
        raise BadRequest(
            "'messages' must contain at least one message.", param="messages", code="invalid_value"
        )
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _type_error(where, "an object", msg)
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            if role in ("tool", "function"):
                raise BadRequest(
                    f"'{where}.role' {role!r} needs tools, which this server does not support.",
                    param=f"{where}.role",
                    code="unsupported_parameter",
                )
            raise BadRequest(
                f"Invalid value for '{where}.role': {role!r}.", param=f"{where}.role", code="invalid_value"
            )
        for key in msg:
            if key not in ("role", "content", "name", "refusal"):
                raise BadRequest(
                    f"'{where}.{key}' is not supported by this server.",
                    param=f"{where}.{key}",
                    code="unsupported_parameter",
                )
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise BadRequest(
                        f"'{where}.content[{j}]': only text parts are supported.",
                        param=f"{where}.content",
                        code="unsupported_parameter",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or an array of text parts", content)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompts(body: dict) -> list[str | list[int]]:
    value = body.get("prompt")
    if value is None:
        raise BadRequest(
            "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [list(value)]
        if all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in value
        ):
            return [list(p) for p in value]
    raise _type_error("prompt", "a string, an array of strings, or token arrays", value)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- handlers -------------------------------------------------------------------------------------------


class _V1Handler(OpenAIHandler):
    """What every /v1 handler shares: the model look-up behind the permission hook, disconnects, usage."""

    feature: str = ""
    endpoint: str = ""

    def initialize(self) -> None:
        self._t0 = time.perf_counter()
        self._generation: Generation | None = None
        self._client_gone = False
        self._recorded = False
        self._model: str | None = None
        self._tokens = (0, 0)

    async def _backend(self, body: dict, tasks: tuple[str, ...]):
        """The backend for `body["model"]`, or the error the caller should see."""
        model = body.get("model")
        if model is None or model == "":
            raise BadRequest(
                "You must provide a model parameter.", param="model", code="missing_required_parameter"
            )
        if not isinstance(model, str):
            raise _type_error("model", "a string", model)
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
        """The client went away: stop generating for it now."""
        self._client_gone = True
        if self._generation is not None:
            self._generation.cancel()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._record(self.get_status())

    def _record(self, status: int) -> None:
        if self._recorded:
            return
        self._recorded = True
        try:
            self.services.record_usage(self._usage_event(status))
        except Exception:
            log.exception("usage recording failed")

    def _usage_event(self, status: int) -> dict:
        """One request's usage, errors and refusals included, for the metering seam."""
        identity = getattr(self, "identity", None)
        return {
            "time": time.time(),
            "user": identity.name if identity else None,
            "via": identity.via if identity else None,
            "key_id": identity.key_id if identity else None,
            "acting_admin": identity.acting_admin if identity else None,
            "model": self._model,
            "endpoint": self.endpoint,
            "prompt_tokens": self._tokens[0],
            "completion_tokens": self._tokens[1],
            "latency_ms": round((time.perf_counter() - self._t0) * 1000, 3),
            "status": status,
        }

    # -- streaming ---------------------------------------------------------------------------------

    def _start_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")

    async def _send(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        self.write(f"data: {data}\n\n")
        await self.flush()

    async def _stream(self, gen: Generation, chunk, include_usage: bool, first=None) -> None:
        """Send every delta as it comes; end with usage (if asked) and `[DONE]`."""
        extra = {"usage": None} if include_usage else {}
        self._start_stream()
        try:
            if first is not None:
                for index in range(len(gen.finish_reasons)):
                    await self._send(first(index) | extra)
            try:
                async for delta in gen:
                    await self._send(chunk(delta) | extra)
            except ApiError as e:  # the engine failed mid-stream: the SDK raises APIError on this chunk
                self._tokens = (gen.prompt_tokens, gen.completion_tokens)
                await self._send(e.to_json())
                await self._send("[DONE]")
                self.finish()
                return
            self._tokens = (gen.prompt_tokens, gen.completion_tokens)
            if include_usage:
                await self._send(chunk(None) | {"usage": _usage(*self._tokens)})
            await self._send("[DONE]")
            self.finish()
        except StreamClosedError:
            gen.cancel()
            self._tokens = (gen.prompt_tokens, gen.completion_tokens)
            self._record(499)  # the client closed the connection; nginx's code for it

    def _stream_options(self, body: dict, stream: bool) -> bool:
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict):
            raise _type_error("stream_options", "an object", opts)
        if not stream:
            raise BadRequest(
                "'stream_options' is only allowed when 'stream' is true.",
                param="stream_options",
                code="invalid_value",
            )
        include = opts.get("include_usage", False)
        if not isinstance(include, bool):
            raise _type_error("stream_options.include_usage", "a boolean", include)
        return include


class ModelsHandler(_V1Handler):
    endpoint = "/v1/models"

    def get(self) -> None:
        manager = self.services.models
        infos = manager.list_models() if manager is not None else []
        visible = set(self.services.permissions.visible_models(self.identity, [i.name for i in infos]))
        self.write_json({"object": "list", "data": [model_json(i) for i in infos if i.name in visible]})


class ModelHandler(_V1Handler):
    endpoint = "/v1/models/{model}"

    def get(self, name: str) -> None:
        manager = self.services.models
        info = manager.info(name) if manager is not None else None
        if info is None or name not in self.services.permissions.visible_models(self.identity, [name]):
            raise ModelNotFound(name)
        self.write_json(model_json(info))


def model_json(info) -> dict:
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": OWNED_BY,
        "task": info.task,
    }


class ChatCompletionsHandler(_V1Handler):
    feature = "chat"
    endpoint = "/v1/chat/completions"

    async def post(self) -> None:
        body = self.get_json_body()
        _check_params(body, CHAT_PARAMS)
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise BadRequest("Give 'max_tokens' or 'max_completion_tokens', not both.", param="max_tokens")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = _sampling(body, _integer(body, key, 1, None, None))
        messages = _messages(body)
        stream = _boolean(body, "stream")
        include_usage = self._stream_options(body, stream)
        backend = await self._backend(body, ("chat",))
        gen = self._generation = await backend.chat(messages, params)
        if self._client_gone:
            gen.cancel()
            return
        cid, created, model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), self._model

        def envelope(choices: list) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }

        if stream:

            def first(index: int) -> dict:
                return envelope(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )

            def chunk(delta) -> dict:
                if delta is None:
                    return envelope([])
                content = {"content": delta.text} if delta.text else {}
                return envelope(
                    [
                        {
                            "index": delta.index,
                            "delta": content,
                            "logprobs": None,
                            "finish_reason": delta.finish_reason,
                        }
                    ]
                )

            await self._stream(gen, chunk, include_usage, first)
            return
        texts = await gen.collect()
        if self._client_gone:
            return
        self._tokens = (gen.prompt_tokens, gen.completion_tokens)
        self.write_json(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": t, "refusal": None},
                        "logprobs": None,
                        "finish_reason": r,
                    }
                    for i, (t, r) in enumerate(zip(texts, gen.finish_reasons, strict=True))
                ],
                "usage": _usage(*self._tokens),
            }
        )


class CompletionsHandler(_V1Handler):
    feature = "completions"
    endpoint = "/v1/completions"

    async def post(self) -> None:
        body = self.get_json_body()
        _check_params(body, COMPLETION_PARAMS)
        params = _sampling(body, _integer(body, "max_tokens", 1, None, 16))  # OpenAI's default here is 16
        prompts = _prompts(body)
        stream = _boolean(body, "stream")
        include_usage = self._stream_options(body, stream)
        backend = await self._backend(body, ("completion", "chat"))
        gen = self._generation = await backend.complete(prompts, params)
        if self._client_gone:
            gen.cancel()
            return
        cid, created, model = f"cmpl-{secrets.token_hex(12)}", int(time.time()), self._model

        def envelope(choices: list) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }

        if stream:

            def chunk(delta) -> dict:
                if delta is None:
                    return envelope([])
                return envelope(
                    [
                        {
                            "index": delta.index,
                            "text": delta.text,
                            "logprobs": None,
                            "finish_reason": delta.finish_reason,
                        }
                    ]
                )

            await self._stream(gen, chunk, include_usage)
            return
        texts = await gen.collect()
        if self._client_gone:
            return
        self._tokens = (gen.prompt_tokens, gen.completion_tokens)
        self.write_json(
            envelope(
                [
                    {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                    for i, (t, r) in enumerate(zip(texts, gen.finish_reasons, strict=True))
                ]
            )
            | {"usage": _usage(*self._tokens)}
        )


class EmbeddingsHandler(_V1Handler):
    feature = "embeddings"
    endpoint = "/v1/embeddings"

    async def post(self) -> None:
        body = self.get_json_body()
        _check_params(body, EMBEDDING_PARAMS)
        value = body.get("input")
        if value is None:
            raise BadRequest(
                "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
            )
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _type_error("input", "a string or a non-empty array of strings", value)
        if any(t == "" for t in texts):
            raise BadRequest("'input' must not contain empty strings.", param="input", code="invalid_value")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest(
                f"Invalid value for 'encoding_format': {fmt!r} (float or base64).",
                param="encoding_format",
                code="invalid_value",
            )
        dimensions = _integer(body, "dimensions", 1, None, None)
        backend = await self._backend(body, ("embedding",))
        if dimensions is not None and dimensions != getattr(backend, "dimensions", dimensions):
            raise BadRequest(
                f"The model '{self._model}' only produces {backend.dimensions} dimensions.",
                param="dimensions",
                code="unsupported_parameter",
            )
        result = await backend.embed(texts)
        self._tokens = (result.prompt_tokens, 0)
        if fmt == "base64":
            data = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in result.vectors]
        else:
            data = result.vectors.tolist()
        self.write_json(
            {
                "object": "list",
                "model": self._model,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            }
        )


routes = [
    (r"/v1/models", ModelsHandler),
    (r"/v1/models/(.+)", ModelHandler),
    (r"/v1/chat/completions", ChatCompletionsHandler),
    (r"/v1/completions", CompletionsHandler),
    (r"/v1/embeddings", EmbeddingsHandler),
]

"""OpenAI's wire protocol for `/v1`: request bodies in, typed requests out; answers shaped as OpenAI's JSON.

No Tornado here (like `protocol.py` next to transformers' `serve`), so every rule is testable on its own:
a wrong type or an unsupported parameter that would change the answer is a `BadRequest` naming it, unknown
parameters too (as OpenAI does), and parameters that cannot change the answer are accepted and ignored.
Sizes are bounded here, before the engine sees anything: at most `MAX_INPUTS` texts or prompts per request,
`MAX_INPUT_CHARS` characters of embeddings input and `MAX_PROMPT_TOKEN_IDS` token ids in `prompt`.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .engine import SamplingParams
from .errors import BadRequest

MAX_N = 16
MAX_STOP = 4
MAX_INPUTS = 2048  # OpenAI's limit on embeddings inputs; also the most prompts in one completions request
MAX_INPUT_CHARS = 2_000_000  # about 2,048 inputs of 256 tokens, all a small encoder's context holds
MAX_PROMPT_TOKEN_IDS = 262_144  # token ids across all of `prompt`: more than any served context
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


# -- typed requests ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """What chat completions and completions share."""

    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    messages: list[dict[str, str]]  # roles system, user, assistant; text content only


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]]  # strings or token id arrays


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    encoding_format: str  # "float" or "base64"
    dimensions: int | None


def parse_chat(body: dict) -> ChatRequest:
    """`POST /v1/chat/completions`."""
    check_params(body, CHAT_PARAMS)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise BadRequest("Give 'max_tokens' or 'max_completion_tokens', not both.", param="max_tokens")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = _sampling(body, _integer(body, key, 1, None, None))
    messages = _messages(body)
    stream, include_usage = _stream(body)
    return ChatRequest(_model(body), params, stream, include_usage, messages)


def parse_completion(body: dict) -> CompletionRequest:
    """`POST /v1/completions`."""
    check_params(body, COMPLETION_PARAMS)
    params = _sampling(body, _integer(body, "max_tokens", 1, None, 16))  # OpenAI's default here is 16
    prompts = _prompts(body)
    stream, include_usage = _stream(body)
    return CompletionRequest(_model(body), params, stream, include_usage, prompts)


def parse_embedding(body: dict) -> EmbeddingRequest:
    """`POST /v1/embeddings`."""
    check_params(body, EMBEDDING_PARAMS)
    value = body.get("input")
    if value is None:
        raise BadRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _type_error("input", "a string or a non-empty array of strings", value)
    if len(texts) > MAX_INPUTS:
        raise BadRequest(
            f"'input' may hold at most {MAX_INPUTS} texts, got {len(texts)}; split it across requests.",
            param="input",
            code="invalid_value",
        )
    chars = sum(map(len, texts))
    if chars > MAX_INPUT_CHARS:
        raise BadRequest(
            f"'input' may hold at most {MAX_INPUT_CHARS:,} characters in all, got {chars:,}; split it across "
            "requests.",
            param="input",
            code="invalid_value",
        )
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
    return EmbeddingRequest(_model(body), texts, fmt, dimensions)


def check_params(body: dict, allowed: set[str]) -> None:
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


# -- answers ----------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_object(info) -> dict:
    """One `engine.ModelInfo` as OpenAI's model object (plus its `task`)."""
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": OWNED_BY,
        "task": info.task,
    }


class CompletionShape:
    """OpenAI's JSON for one `/v1/completions` answer, whole or as stream chunks; `ChatShape` overrides the
    names and the choice shapes, so one handler serves both."""

    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, model: str):
        self.id = f"{self.id_prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        return self.choice(index, text, finish_reason)

    def opening(self, choices: int) -> list[dict]:
        """Chunks sent before any text (chat announces each choice's role)."""
        return []

    def answer(self, texts: list[str], finish_reasons: list[str | None], usage: dict) -> dict:
        choices = [self.choice(i, t, r) for i, (t, r) in enumerate(zip(texts, finish_reasons, strict=True))]
        return self._envelope(self.object, choices) | {"usage": usage}

    def chunk(self, index: int, text: str, finish_reason: str | None) -> dict:
        return self._envelope(self.chunk_object, [self.delta_choice(index, text, finish_reason)])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope(self.chunk_object, []) | {"usage": usage}

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }


class ChatShape(CompletionShape):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self, choices: int) -> list[dict]:
        chunks = [self.chunk(i, "", None) for i in range(choices)]
        for chunk in chunks:
            chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return chunks


def embeddings_json(model: str, vectors, prompt_tokens: int, encoding_format: str) -> str:
    """The embeddings list, encoded: `vectors` is a float32 array [inputs, dimensions].

    Built row by row, so a worker thread running this lets the event loop in between rows: one `json.dumps`
    of 2,048 x 384 floats (16 MB) holds the interpreter for about half a second.
    """
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends
        rows = (json.dumps(base64.b64encode(row.astype("<f4").tobytes()).decode()) for row in vectors)
    else:
        rows = (json.dumps(row.tolist()) for row in vectors)
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{row}}}' for i, row in enumerate(rows))
    tokens = json.dumps({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens})
    return f'{{"object":"list","model":{json.dumps(model)},"data":[{data}],"usage":{tokens}}}'


# -- validation helpers -----------------------------------------------------------------------------------


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


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise BadRequest(
            "You must provide a model parameter.", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    return model


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


def _stream(body: dict) -> tuple[bool, bool]:
    """`stream`, and `stream_options.include_usage` (only allowed with a stream)."""
    stream = _boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
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
    return stream, include


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
    return [_message(f"messages[{i}]", msg) for i, msg in enumerate(value)]


def _message(where: str, msg: Any) -> dict[str, str]:
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
    return {"role": "system" if role == "developer" else role, "content": content}


def _prompts(body: dict) -> list[str | list[int]]:
    value = body.get("prompt")
    if value is None:
        raise BadRequest(
            "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    prompts = _prompt_list(value)
    if len(prompts) > MAX_INPUTS:
        raise BadRequest(
            f"'prompt' may hold at most {MAX_INPUTS} prompts, got {len(prompts)}; split it across requests.",
            param="prompt",
            code="invalid_value",
        )
    ids = sum(len(p) for p in prompts if isinstance(p, list))
    if ids > MAX_PROMPT_TOKEN_IDS:
        raise BadRequest(
            f"'prompt' may hold at most {MAX_PROMPT_TOKEN_IDS:,} token ids in all, got {ids:,}.",
            param="prompt",
            code="invalid_value",
        )
    return prompts


def _prompt_list(value: Any) -> list[str | list[int]]:
    """A string, strings, one token array or token arrays, as a list of prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if _is_token_array(value):
            return [list(value)]
        if all(isinstance(p, list) and p and _is_token_array(p) for p in value):
            return [list(p) for p in value]
    raise _type_error("prompt", "a string, an array of strings, or token arrays", value)


def _is_token_array(value: list) -> bool:
    return set(map(type, value)) == {int}  # a C loop; bool is not int here

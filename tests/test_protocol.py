"""The /v1 protocol on its own: which bodies are refused and how, and the JSON of the answers (no Hub)."""

from __future__ import annotations

import base64
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from hub_extension import protocol
from hub_extension.errors import BadRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
EMBEDDING = {"model": "m", "input": "hi"}
PARSERS = {
    "chat": protocol.parse_chat,
    "completion": protocol.parse_completion,
    "embedding": protocol.parse_embedding,
}
BASE = {"chat": CHAT, "completion": COMPLETION, "embedding": EMBEDDING}
DROP = object()  # remove the parameter from the base body


@pytest.mark.parametrize(
    "kind, change, param, code",
    [
        ("chat", {"model": DROP}, "model", "missing_required_parameter"),
        ("chat", {"model": 7}, "model", "invalid_type"),
        ("chat", {"messages": DROP}, "messages", "missing_required_parameter"),
        ("chat", {"messages": "hi"}, "messages", "invalid_type"),
        ("chat", {"messages": []}, "messages", "invalid_value"),
        ("chat", {"messages": ["hi"]}, "messages[0]", "invalid_type"),
        (
            "chat",
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
            "unsupported_parameter",
        ),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
            "unsupported_parameter",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "unsupported_parameter",
        ),
        ("chat", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_type"),
        ("chat", {"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ("chat", {"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
        ("chat", {"best_ever": 1}, "best_ever", "unknown_parameter"),
        ("chat", {"temperature": 2.5}, "temperature", "invalid_value"),
        ("chat", {"temperature": "hot"}, "temperature", "invalid_type"),
        ("chat", {"top_p": True}, "top_p", "invalid_type"),
        ("chat", {"n": 17}, "n", "invalid_value"),
        ("chat", {"seed": 1.5}, "seed", "invalid_type"),
        ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ("chat", {"stop": [1]}, "stop", "invalid_type"),
        ("chat", {"max_tokens": 0}, "max_tokens", "invalid_value"),
        ("chat", {"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens", None),
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ("chat", {"stream": True, "stream_options": []}, "stream_options", "invalid_type"),
        (
            "chat",
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
            "invalid_type",
        ),
        ("chat", {"stream": "yes"}, "stream", "invalid_type"),
        ("completion", {"prompt": DROP}, "prompt", "missing_required_parameter"),
        ("completion", {"prompt": []}, "prompt", "invalid_type"),
        ("completion", {"prompt": ["a", 1]}, "prompt", "invalid_type"),
        ("completion", {"prompt": [True, False]}, "prompt", "invalid_type"),
        ("completion", {"prompt": [[1], []]}, "prompt", "invalid_type"),
        ("completion", {"prompt": ["p"] * (protocol.MAX_INPUTS + 1)}, "prompt", "invalid_value"),
        ("completion", {"prompt": [[1] * 100_000] * 3}, "prompt", "invalid_value"),
        ("completion", {"suffix": "x"}, "suffix", "unsupported_parameter"),
        ("completion", {"max_completion_tokens": 3}, "max_completion_tokens", "unknown_parameter"),
        ("embedding", {"input": DROP}, "input", "missing_required_parameter"),
        ("embedding", {"input": []}, "input", "invalid_type"),
        ("embedding", {"input": [[1, 2]]}, "input", "invalid_type"),
        ("embedding", {"input": ["a"] * (protocol.MAX_INPUTS + 1)}, "input", "invalid_value"),
        ("embedding", {"input": ["x" * 1000] * 2001}, "input", "invalid_value"),
        ("embedding", {"input": ["a", ""]}, "input", "invalid_value"),
        ("embedding", {"encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ("embedding", {"dimensions": 0}, "dimensions", "invalid_value"),
        ("embedding", {"user": 1, "temperature": 1}, "temperature", "unknown_parameter"),
    ],
)
def test_refused_bodies(kind, change, param, code):
    body = {k: v for k, v in (BASE[kind] | change).items() if v is not DROP}
    with pytest.raises(BadRequest) as e:
        PARSERS[kind](body)
    assert (e.value.param, e.value.code, e.value.status) == (param, code, 400), e.value.message


def test_size_limits_say_how_much():
    with pytest.raises(BadRequest) as e:
        protocol.parse_embedding(EMBEDDING | {"input": ["x" * 1000] * 2001})
    assert "at most 2,000,000 characters" in e.value.message and "2,001,000" in e.value.message
    with pytest.raises(BadRequest) as e:
        protocol.parse_embedding(EMBEDDING | {"input": ["a"] * 2049})
    assert "at most 2048 texts, got 2049" in e.value.message


def test_accepted_bodies():
    chat = protocol.parse_chat(
        CHAT
        | {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 9,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "tools": [],  # unsupported parameters with their no-op value, and harmless ones, pass
            "presence_penalty": 0,
            "user": "u",
        }
    )
    assert chat.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]
    assert (chat.model, chat.stream, chat.include_usage) == ("m", True, True)
    assert (chat.params.max_tokens, chat.params.stop, chat.params.n) == (9, ("END",), 1)
    completion = protocol.parse_completion(COMPLETION | {"prompt": [1, 2, 3]})
    assert completion.prompts == [[1, 2, 3]] and completion.params.max_tokens == 16  # OpenAI's default
    assert protocol.parse_completion(COMPLETION | {"prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    embedding = protocol.parse_embedding(EMBEDDING)
    assert (embedding.texts, embedding.encoding_format, embedding.dimensions) == (["hi"], "float", None)


@pytest.mark.parametrize(
    "shape_class, answer_type", [(protocol.ChatShape, ChatCompletion), (protocol.CompletionShape, Completion)]
)
def test_whole_answers_are_what_the_sdk_reads(shape_class, answer_type):
    shape = shape_class("m")
    body = shape.answer(["one", "two"], ["stop", "length"], protocol.usage(5, 3))
    answer = answer_type.model_validate(json.loads(json.dumps(body)))
    assert answer.usage.total_tokens == 8 and [c.finish_reason for c in answer.choices] == ["stop", "length"]
    texts = [c.message.content if shape_class is protocol.ChatShape else c.text for c in answer.choices]
    assert texts == ["one", "two"] and answer.id.startswith(shape.id_prefix + "-")


def test_chat_chunks():
    shape = protocol.ChatShape("m")
    opening = shape.opening(2)
    assert [c["choices"][0]["delta"] for c in opening] == [{"role": "assistant", "content": ""}] * 2
    chunks = [
        *opening,
        shape.chunk(0, "hi", None),
        shape.chunk(1, "", "stop"),
        shape.usage_chunk(protocol.usage(1, 2)),
    ]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert {c.id for c in parsed} == {shape.id} and all(c.object == "chat.completion.chunk" for c in parsed)
    assert parsed[2].choices[0].delta.content == "hi" and parsed[3].choices[0].delta.content is None
    assert parsed[4].choices == [] and parsed[4].usage.completion_tokens == 2
    assert protocol.CompletionShape("m").opening(2) == []  # completions send no role chunk


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_embeddings_json(fmt):
    vectors = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    body = json.loads(protocol.embeddings_json("m", vectors, 7, fmt))
    for row, data in zip(vectors, body["data"], strict=True):
        if fmt == "base64":  # little-endian float32, decoded as the SDK does
            data["embedding"] = list(struct.unpack("<4f", base64.b64decode(data["embedding"])))
        assert data["embedding"] == pytest.approx(row.tolist(), abs=0)  # exactly the float32 values
    parsed = CreateEmbeddingResponse.model_validate(body)
    assert (
        parsed.model == "m"
        and parsed.usage.prompt_tokens == 7
        and [d.index for d in parsed.data] == [0, 1, 2]
    )


def test_model_object():
    info = SimpleNamespace(name="m", created=1, task="chat")
    model = Model.model_validate(protocol.model_object(info))
    assert (model.id, model.owned_by) == ("m", protocol.OWNED_BY)

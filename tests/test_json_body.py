"""Request bodies: hostile JSON is a 400 naming the problem, never an exception further on (fast, no Hub)."""

from __future__ import annotations

import json

import pytest

from hub_extension.errors import BadRequest
from hub_extension.json_body import MAX_DEPTH, parse_object


def nested(depth: int, kind: str) -> bytes:
    """An object nesting arrays or objects `depth` levels in all (the outer object is level 1)."""
    if kind == "arrays":
        inner = "[" * (depth - 1) + "]" * (depth - 1)
    else:
        inner = '{"a":' * (depth - 1) + "1" + "}" * (depth - 1)
    return ('{"a":' + inner + "}").encode()


def test_a_plain_object_comes_back():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 😀"}], "n": 2, "x": None}
    assert parse_object(json.dumps(body, ensure_ascii=False).encode()) == body
    assert parse_object(json.dumps(body).encode()) == body  # \u escapes, the emoji as a surrogate pair


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"", "A JSON object is required"),
        (b"{", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b'{"temperature": NaN}', "NaN is not a JSON value"),
        (b'{"temperature": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": "\xff"}', "not valid JSON"),  # not UTF-8
        (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),  # past Python's int-string limit
    ],
)
def test_malformed_bodies(raw, says):
    with pytest.raises(BadRequest) as e:
        parse_object(raw)
    assert says in e.value.message and e.value.status == 400


@pytest.mark.parametrize("kind", ["arrays", "objects"])
def test_depth_limit(kind):
    parse_object(nested(MAX_DEPTH, kind))
    for depth in (MAX_DEPTH + 1, 1000, 100_000):  # 1,000 and more exhaust the recursion limit of json.loads
        with pytest.raises(BadRequest) as e:
            parse_object(nested(depth, kind))
        assert f"more than {MAX_DEPTH} levels deep" in e.value.message


@pytest.mark.parametrize(
    "raw, param, where",
    [
        (rb'{"model": "\ud800"}', "model", ""),
        (
            rb'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "x\udfffy"}]}',
            "messages[1].content",
            "",
        ),
        (
            rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\uDBFF"}]}]}',
            "messages[0].content[0].text",
            "",
        ),
        (rb'{"input": ["a", "b", "\udc00\ud800"]}', "input[2]", ""),  # a pair in the wrong order
        (rb'{"prompt": [[1, 2], ["\ud800"]]}', "prompt[1][0]", ""),
        (rb'{"\ud800": 1}', None, "a key in the request body"),
        (rb'{"metadata": {"ok": 1, "k\ud800": "v"}}', "metadata", "a key in 'metadata'"),
        (
            b'{"input": "\xed\xa0\x80"}',
            "input",
            "",
        ),  # a surrogate as raw bytes, which json.loads lets through
    ],
)
def test_lone_surrogates_anywhere(raw, param, where):
    with pytest.raises(BadRequest) as e:
        parse_object(raw)
    assert e.value.param == param
    assert "lone UTF-16 surrogate" in e.value.message and where in e.value.message
    e.value.message.encode()  # the message itself is valid text (logs, JSON)


def test_wide_bodies_are_walked_without_recursion():
    """Many items at a legal depth: fine, and a surrogate at the very end is still found."""
    items = [[i, [i, {"t": "é"}]] for i in range(20_000)]
    body = {"prompt": items}
    assert parse_object(json.dumps(body).encode()) == body
    items[-1][1][1]["t"] = "\ud800"
    with pytest.raises(BadRequest) as e:
        parse_object(json.dumps(body).encode())
    assert e.value.param == "prompt[19999][1][1].t"

"""Request bodies as JSON objects, with hostile input refused as a 400 before any handler sees it.

`json.loads` accepts things that fail later, far from the request: nesting deep enough to exhaust the
recursion limit in whatever walks the value next, and lone UTF-16 surrogates (`"\\ud800"`, or raw
surrogate bytes, which `json.loads` lets through) that raise `UnicodeEncodeError` when the text is
tokenised, logged or stored. Both are checked here, once, for every body: keys and values, at any depth.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import BadRequest

MAX_DEPTH = 64  # arrays and objects inside each other; real requests use fewer than 10
LARGE_BODY_BYTES = 256 * 1024  # bodies above this are parsed on a worker thread (handlers/base.py)

_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; `BadRequest` naming the problem for anything else."""
    if not raw:
        raise BadRequest("A JSON object is required in the request body.")
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"The request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object.")
    check_value(value)
    return value


def check_value(value: dict | list) -> None:
    """Refuse nesting past `MAX_DEPTH` and lone surrogates in any key or string, without recursion.

    An explicit stack instead of recursion; a path to each container is kept as a linked pair, turned into
    a name only for the error. ASCII text (`isascii()` is a flag look-up) skips the search.
    """
    stack: list[tuple[dict | list, int, tuple]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if type(node) is dict:
            for key in node:
                if not key.isascii() and _SURROGATE.search(key):
                    raise _surrogate(path, "a key in ")
            pairs = node.items()
        else:
            pairs = enumerate(node)
        for key, item in pairs:
            kind = type(item)
            if kind is str:
                if not item.isascii() and _SURROGATE.search(item):
                    raise _surrogate((path, key))
            elif kind is dict or kind is list:
                stack.append((item, depth + 1, (path, key)))


def _surrogate(path: tuple, where: str = "") -> BadRequest:
    name = _path(path)
    field = f"'{name}'" if name else "the request body"
    return BadRequest(
        f"Invalid text in {where}{field}: it contains a lone UTF-16 surrogate (such as \\ud800), which is "
        "not a character. Send valid Unicode.",
        param=name or None,
        code="invalid_value",
    )


def _path(path: tuple) -> str:
    """`((((), "messages"), 0), "content")` -> `messages[0].content`, as OpenAI names parameters."""
    keys = []
    while path:
        path, key = path
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def _too_deep() -> BadRequest:
    return BadRequest(f"The request body nests arrays and objects more than {MAX_DEPTH} levels deep.")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")

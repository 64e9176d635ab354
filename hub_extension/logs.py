"""Logging: one line per event, as text or JSON, with every credential redacted.

Our handlers never log headers or query strings, but Tornado does (a refused `GET /?token=...` is logged
with its URI), JupyterHub's HubOAuth logs through the application's logger, and messages quote user input
(a user name from the path, a model name from the body). So every line goes through `Formatter`: the root
handler's and traitlets' own (`Application._log_formatter_cls`). It redacts credentials and, in text mode,
escapes control characters so that a newline in user input cannot forge a log line (JSON escapes them anyway).
"""

from __future__ import annotations

import json
import logging
import re
import sys

TEXT_FORMAT = "[%(levelname).1s %(asctime)s %(name)s] %(message)s"
REDACTED = "[redacted]"
# Exact secrets shorter than this are not redacted: every occurrence of a short string would be.
MIN_SECRET_LENGTH = 8

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_KEY = re.compile(r"jhi_[0-9A-Za-z]{8,}")
_CREDENTIALS = [
    # A query value in a URL, also inside a percent-encoded URL (`next=%2F%3Ftoken%3D...`).
    (
        re.compile(r"(?i)([?&;]|%3F|%26)(token|api_key|access_token|code|state)(=|%3D)(?:(?!%26)[^&#\s'\"\\<>])*"),
        r"\1\2\3" + REDACTED,
    ),
    # A header or a field: `Authorization: token ...`, `{'Cookie': '...'}`, `"api_token": "..."`.
    (
        re.compile(
            r"(?i)\b(authorization|proxy-authorization|x-api-key|cookie|set-cookie|token|api_token|api_key"
            r"|access_token|password|client_secret|cookie_secret)(['\"]?\s*:\s*['\"]?)[^'\"\\\r\n]+"
        ),
        r"\1\2" + REDACTED,
    ),
    # HubOAuth's warning on a mismatched login: "oauth state argument 'X' != cookie NAME='Y'".
    (re.compile(r"(?i)\b(state argument\s+|cookie\s+[\w.-]+=)(['\"]?)[^\s'\"\\]*\2"), r"\1\2" + REDACTED + r"\2"),
    # An authorization scheme: `Bearer ...` always; `token ...` when it looks like one (has a digit).
    (re.compile(r"(?i)\b(bearer)\s+[^\s'\"\\]+"), r"\1 " + REDACTED),
    (re.compile(r"(?i)\b(token)\s+(?=[\w.~+/=-]*\d)[\w.~+/=-]{8,}"), r"\1 " + REDACTED),
]
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Libraries' loggers that add a handler of their own when they find `propagate` on: they get ours beforehand.
SELF_HANDLED = ("ContinuousBatchingLogger",)  # transformers' continuous batching

_secrets: set[str] = set()
_secret_pattern: re.Pattern | None = None
_json = False


def add_secret(secret: str) -> None:
    """Redact this exact string wherever it appears (configured static keys, the Hub API token)."""
    global _secret_pattern
    if len(secret) < MIN_SECRET_LENGTH:
        return
    _secrets.add(secret)
    _secret_pattern = re.compile("|".join(map(re.escape, sorted(_secrets, key=len, reverse=True))))


def redact(text: str) -> str:
    """Every credential form we know of replaced; one of our keys keeps its listed prefix (`jhi_AbCd1234`)."""
    if _secret_pattern is not None:
        text = _secret_pattern.sub(REDACTED, text)
    text = _KEY.sub(lambda m: m.group(0)[:12] + "…" + REDACTED, text)
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


def one_line(text: str) -> str:
    """Control characters escaped (`\\n`, `\\x1b`, `\\u2028`), so that one event is one line."""

    def escape(m: re.Match) -> str:
        c = m.group(0)
        return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(escape, text)


def _clean(value):
    """An extra field of a JSON line, with its strings redacted."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    return redact(str(value))


class Formatter(logging.Formatter):
    """Text (`TEXT_FORMAT`) or JSON (`{"time", "level", "logger", "message", ...extra fields}`) per line.

    Also traitlets' formatter class, which is handed traitlets' format string: ignored, so that the
    application's own lines look like every other line.
    """

    def __init__(self, *_traitlets_args, **_traitlets_kwargs) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        details = []
        if record.exc_info:
            details.append(self.formatException(record.exc_info))
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        if _json:
            out = {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname,
                "logger": record.name,
                "message": redact(message),
            }
            out.update({k: _clean(v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
            if details:
                out["exception"] = redact("\n".join(details))
            return json.dumps(out)
        head = f"[{record.levelname[:1]} {self.formatTime(record)} {record.name}] "
        return head + one_line(redact("\n".join([message, *details])))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each line (a test runner swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(fmt: str = "text", level: int | str = logging.INFO) -> None:
    """Set up logging for the service process: `fmt` is `text` or `json`, for every line."""
    global _json
    _json = fmt == "json"
    handler = _StderrHandler()
    handler.setFormatter(Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in SELF_HANDLED:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.propagate = False

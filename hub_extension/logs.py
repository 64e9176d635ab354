"""Logging: one line per event, as text or JSON, with anything shaped like one of our keys redacted.

Handlers never log headers or query strings; the redaction is a second line of defence for the odd message
that quotes user input.
"""

from __future__ import annotations

import json
import logging
import re

_KEY = re.compile(r"jhi_[0-9A-Za-z]{8,}")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    return _KEY.sub(lambda m: m.group(0)[:12] + "…[redacted]", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...extra fields}` per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def configure(fmt: str = "text", level: int | str = logging.INFO) -> None:
    """Set up the root logger once for the service process."""
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(levelname).1s %(asctime)s %(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

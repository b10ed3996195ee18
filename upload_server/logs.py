"""Logs: one JSON object a line (or plain text at a terminal), with the request id on every line.

The request id comes from the client's `X-Request-ID` when it is sane, else a new one; it is echoed
in the response and carried in a context variable, so every log line written while the request is
handled says which request it belongs to. Every JSON line has the field: lines that belong to no
request (start-up, writer supervision, the sweeper) say "-". Writers add their index and the
session id.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_FIELDS = ("session_id", "writer", "method", "path", "status", "duration_ms", "bytes", "client")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry["request_id"] = getattr(record, "request_id", None) or request_id.get() or "-"
        for name in _FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None) or request_id.get()
        return f"{text} [{rid}]" if rid else text


def configure(level: str, fmt: str) -> None:
    """Send upload_server's logs to stderr as `fmt` ("json", "text" or "auto": text on a TTY)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("upload_server")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False

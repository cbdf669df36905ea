"""Log formatting for the proxy: plain text for people, one JSON object per line for machines.

``setup_logging(format, level)`` installs a single stderr handler on the root logger (calling it
again replaces it, so SIGHUP-style re-configuration and tests do not stack handlers). Every line
the proxy writes is an *event*: ``log.info("connection closed", extra=event("close", peer=...))``
gives the record a stable ``event`` name and its structured fields; the message is a constant
short phrase that never carries the fields again. In JSON the fields are merged into one flat
object next to ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``; in text they are
appended once as ``key=value`` pairs (strings with spaces, quotes, ``=`` or unprintable
characters JSON-quoted, other values as compact JSON, so a certificate value cannot forge a
line). Severity: a client's fault
(bad certificate, refused identity, a close) is ``info``; what an operator must look at (a limit
reached, an upstream failure, a reload that failed) is ``warning`` or ``error``. The proxy logs
under three names: ``beanstalk_proxy`` (general), ``beanstalk_proxy.conn`` (connections:
handshakes, refusals, open/close) and ``beanstalk_proxy.audit`` (denials: a burst per
connection and window one line each, then one summary per window; see ``proxy.logsummary``).
README.md ("Logs") lists every event; tests/test_events.py keeps that table and the code equal.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = [
    "AUDIT_LOGGER",
    "CONN_LOGGER",
    "LOGGER",
    "JsonFormatter",
    "TextFormatter",
    "event",
    "render_text",
    "setup_logging",
]

LOGGER = "beanstalk_proxy"
CONN_LOGGER = "beanstalk_proxy.conn"
AUDIT_LOGGER = "beanstalk_proxy.audit"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_CORE_KEYS = ("time", "level", "logger", "message")
#: A character that makes a printable text value JSON-quoted: whitespace (``str.isspace``, as
#: ``\s`` matches in a str pattern), a double quote or ``=``.
_NEEDS_QUOTES = re.compile(r'[\s"=]')
#: ``json.dumps(value, default=str, separators=(",", ":"))`` without building an encoder per
#: call.
_COMPACT = json.JSONEncoder(default=str, separators=(",", ":"))
#: The JSON formatter's encoder (``json.dumps`` with these arguments builds one per call).
_JSON_LINE = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))


def event(name: str, **fields: object) -> dict[str, dict[str, object]]:
    """The ``extra`` of a log call recording the event ``name`` with ``fields``."""
    return {"fields": {"event": name, **fields}}


def _fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def render_text(record: logging.LogRecord) -> str:
    """The record's message followed by its fields as ``key=value`` (the text line without
    time, level and logger); a pair the message already shows word for word is not repeated."""
    message = record.getMessage()
    fields = _fields(record)
    if not fields:
        return message
    parts = [message]
    said = set(message.split())
    for key, value in fields.items():
        if isinstance(value, str):
            text = value
            if text == "" or not text.isprintable() or _NEEDS_QUOTES.search(text):
                text = json.dumps(text)
        elif type(value) is int or (type(value) is float and math.isfinite(value)):
            text = repr(value)  # what JSON writes for them
        elif value is None:
            text = "null"
        else:  # other numbers, booleans, lists and maps as compact JSON (non-ASCII escaped)
            text = _COMPACT.encode(value)
        pair = f"{key}={text}"
        if pair not in said:  # said once: not again as a field
            parts.append(pair)
    return " ".join(parts)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with structured ``fields`` appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if not _fields(record):
            return line
        pairs = render_text(record)[len(record.getMessage()) :]
        first, newline, rest = line.partition("\n")  # keep tracebacks after the fields
        return f"{first}{pairs}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's fields.

    A field named like a core key is kept under ``field_<name>`` rather than overwriting it.
    Exceptions are included as ``exception`` (the formatted traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        obj: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            obj[f"field_{key}" if key in _CORE_KEYS else str(key)] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exception"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return _JSON_LINE.encode(obj)


class _Handler(logging.StreamHandler[TextIO]):
    """Marker subclass so ``setup_logging`` can find and replace its own handler."""


def setup_logging(format: str, level: str, stream: TextIO | None = None) -> None:
    """Send log records to ``stream`` (stderr by default) as ``"text"`` or ``"json"`` at
    ``level`` (debug, info, warning, error). Idempotent: replaces a previous setup."""
    if format not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {format!r}")
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}") from None
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger(LOGGER).setLevel(numeric)

"""Log formatting for the proxy: plain text for people, one JSON object per line for machines.

``setup_logging(format, level)`` installs a single stderr handler on the root logger (calling it
again replaces it, so SIGHUP-style re-configuration and tests do not stack handlers). Records
may carry structured data as ``extra={"fields": {...}}``: in JSON those keys are merged into
the object next to ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``; in text
they are appended as ``key=value`` pairs, except a pair the message already shows word for
word. Such a record's message is a short phrase, never the record again. The proxy logs under
three names: ``beanstalk_proxy`` (general), ``beanstalk_proxy.conn`` (one line per connection
open/close) and ``beanstalk_proxy.audit`` (denials: a burst per connection and window one line
each, then one "denials suppressed" summary line per window; see ``proxy.logsummary``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = [
    "AUDIT_LOGGER",
    "CONN_LOGGER",
    "LOGGER",
    "JsonFormatter",
    "TextFormatter",
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


def _fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class TextFormatter(logging.Formatter):
    """The classic one-line format, with structured ``fields`` appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        parts = []
        said = set(record.getMessage().split())
        for key, value in fields.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if text == "" or any(c.isspace() or c in '"=' for c in text):
                text = json.dumps(text)
            pair = f"{key}={text}"
            if pair not in said:  # said once: not again as a field
                parts.append(pair)
        if not parts:
            return line
        first, newline, rest = line.partition("\n")  # keep tracebacks after the fields
        return f"{first} {' '.join(parts)}{newline}{rest}"


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
        return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


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

"""The ``status`` command's side of ``/connections``: fetching the document from a running
proxy's status listener and rendering it as the table ``status`` prints.

``fetch_sessions`` turns every way of not getting the document (the endpoint is off, the proxy
unreachable, an answer that is not a ``/connections`` document) into a ``StatusError`` whose
message says what to do. ``render_table`` prints only printable ASCII (subjects and names come
from certificates). The server side of the document is ``proxy.sessions_view``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = ["STATUS_COLUMNS", "StatusError", "fetch_sessions", "render_table"]

STATUS_COLUMNS = (
    "PEER", "PRINCIPAL", "STATE", "AGE", "IDLE", "IN", "OUT", "CMDS", "DENIED", "USED",
    "WATCHED", "RSV", "FINGERPRINT", "SUBJECT",
)  # fmt: skip


class StatusError(Exception):
    """``status`` could not get the sessions; the message says what to do about it."""


def fetch_sessions(url: str, timeout: float) -> dict[str, Any]:
    """GET ``url``/connections and return the parsed document; ``StatusError`` with a
    message an operator can act on when it is off, unreachable or not what we expect."""
    base = url if "://" in url else f"http://{url}"
    if not base.startswith(("http://", "https://")):
        raise StatusError(f"{url}: only http:// and https:// URLs are supported")
    base = base.rstrip("/")
    target = base if base.endswith("/connections") else f"{base}/connections"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            body = response.read(256 * 1024 * 1024)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise StatusError(
                f"{target}: 404 Not Found: the proxy does not serve /connections; set "
                "'metrics.connections: true' in its config (and restart it) to enable it"
            ) from None
        raise StatusError(f"{target}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise StatusError(
            f"cannot reach {target}: {reason} (is the proxy running, and is this its "
            "metrics.listen address?)"
        ) from None
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("connections"), list):
            raise ValueError("no 'connections' list")
    except ValueError as exc:
        raise StatusError(f"{target}: not a /connections document: {exc}") from None
    return doc


def _cell(value: object) -> str:
    """A table cell: printable ASCII only (subjects and names come from certificates)."""
    text = "-" if value is None or value == "" else str(value)
    return "".join(c if " " < c < "\x7f" else f"\\x{ord(c):02x}" for c in text)


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if s < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _session_row(entry: dict[str, Any]) -> list[str]:
    watched = entry.get("watched") or []
    more = int(entry.get("watched_count") or 0) - len(watched)
    watch_text = ",".join(str(t) for t in watched) + (f",+{more}" if more > 0 else "")
    fingerprint = entry.get("fingerprint")
    if isinstance(fingerprint, str) and len(fingerprint) > 19:
        fingerprint = fingerprint[:19]  # "sha256:" and 12 hex digits
    values = (
        entry.get("peer"), entry.get("principal"), entry.get("state"),
        _duration(entry.get("age")), _duration(entry.get("idle")), entry.get("bytes_in"),
        entry.get("bytes_out"), entry.get("commands"), entry.get("denied"), entry.get("used"),
        watch_text, entry.get("reserved"), fingerprint, entry.get("subject"),
    )  # fmt: skip
    return [_cell(v) for v in values]


def render_table(docs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The ``status`` table for the ``/connections`` documents of ``(url, document)``: a
    header and one row per session (a PID column first with several documents, or entries
    that carry their worker's pid), the total, and a note per truncated document."""
    out: list[str] = []
    header = list(STATUS_COLUMNS)
    # Several listeners, or one serve --workers N whose entries each carry their worker's pid.
    with_pid = len(docs) > 1 or any(
        isinstance(e, dict) and "pid" in e for _, doc in docs for e in doc["connections"]
    )
    if with_pid:
        header.insert(0, "PID")
    rows: list[list[str]] = []
    notes: list[str] = []
    for url, doc in docs:
        entries = [e for e in doc["connections"] if isinstance(e, dict)]
        for entry in entries:
            row = _session_row(entry)
            rows.append([_cell(entry.get("pid", doc.get("pid"))), *row] if with_pid else row)
        if doc.get("truncated"):
            notes.append(
                f"{url}: {doc.get('count')} connections, only the oldest {len(entries)} listed"
            )
    if not rows:
        out.append("no client connections")
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    total = sum(int(doc.get("count") or 0) for _, doc in docs)
    out.append(f"{total} connection{'' if total == 1 else 's'}")
    out.extend(notes)
    return out

"""A read-only snapshot of the live sessions, built when ``/connections`` is requested.

``snapshot(server)`` walks ``ProxyServer.connections`` (connections past the handshake with a
principal and a ``Session``) once and returns plain, JSON-ready dicts: peer, principal,
certificate subject and fingerprint, when the connection started (``since``, ISO 8601 UTC, and
``age`` in seconds), seconds since the last byte either way (``idle``), bytes and commands
(``commands`` parsed, of which ``denied``; ``rate_limited`` answered without running;
``pending`` awaiting their reply), the used tube, the watched tubes, how many jobs the
connection holds reserved, and its ``state``. Nothing is kept or counted per command for it: it
reads the counters the relay and the session already keep. The list is bounded (``limit``
entries, the oldest first, with ``truncated`` set when more exist) and so is each entry's list
of watched tubes (``watched_count`` has the full number). ``render`` encodes the same document
to JSON a slice of ``CHUNK`` sessions at a time and lets the event loop run between slices, so
listing thousands of sessions does not stall the relay for the whole build.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from operator import attrgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.relay import Connection, ProxyServer

#: At most this many sessions in one response.
MAX_SESSIONS = 10_000
#: At most this many watched tube names per session (``watched_count`` has them all).
MAX_WATCHED = 20
#: Sessions described and encoded between two returns to the event loop in ``render``.
CHUNK = 200

_STARTED = attrgetter("started")

#: Values of ``state``, in the order they are tested.
STATES = ("connecting", "draining", "blocked", "waiting", "relaying", "idle")


def state_of(conn: Connection) -> str:
    """``connecting``: the upstream connection is being opened; ``draining``: closing after the
    replies still due (quit, EOF, shutdown, protocol error); ``blocked``: the proxy is asking
    beanstalkd which tube a job is in before deciding a command; ``waiting``: in a blocking
    ``reserve``; ``relaying``: commands in flight; ``idle``: nothing in flight."""
    session = conn.session
    if session is None or conn.upstream is None:
        return "connecting"
    if session.draining or session.ended or conn.closed:
        return "draining"
    if session.blocked:
        return "blocked"
    if session.waiting:
        return "waiting"
    return "relaying" if session.pending else "idle"


def describe(conn: Connection, now_mono: float, now_wall: float) -> dict[str, Any]:
    """One connection as a plain dict (see the module docstring for the fields)."""
    session = conn.session
    identity = conn.identity
    since = now_wall - (now_mono - conn.started)
    entry: dict[str, Any] = {
        "peer": conn.peer,
        "principal": conn.principal,
        "subject": identity.subject if identity else None,
        "fingerprint": identity.fingerprint if identity else None,
        "since": datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds"),
        "age": round(now_mono - conn.started, 3),
        "idle": round(now_mono - conn.last_active, 3),
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "state": state_of(conn),
    }
    if session is None:
        entry.update(
            commands=0, denied=0, rate_limited=0, pending=0, used=None, watched=[],
            watched_count=0, reserved=0,
        )  # fmt: skip
        return entry
    watched = session.watched
    entry.update(
        commands=sum(session.op_counts),
        denied=sum(session.denied_counts),
        rate_limited=session.rate_limited,
        pending=len(session.pending),
        used=session.used,
        watched=[tube for _, tube in zip(range(MAX_WATCHED), watched, strict=False)],
        watched_count=len(watched),
        reserved=len(session.reserved),
    )
    return entry


def _header(conns: list[Connection], chosen: list[Connection], now_wall: float) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "time": datetime.fromtimestamp(now_wall, UTC).isoformat(timespec="seconds"),
        "count": len(conns),
        "truncated": len(conns) > len(chosen),
    }


def _choose(server: ProxyServer, limit: int) -> tuple[list[Connection], list[Connection]]:
    conns = list(server.connections)
    return conns, sorted(conns, key=_STARTED)[:limit]  # C-level sort: ~10 ms for 50,000


def snapshot(server: ProxyServer, limit: int = MAX_SESSIONS) -> dict[str, Any]:
    """The live sessions of ``server``, oldest first, at most ``limit`` of them."""
    now_mono, now_wall = time.monotonic(), time.time()
    conns, chosen = _choose(server, limit)
    doc = _header(conns, chosen, now_wall)
    doc["connections"] = [describe(c, now_mono, now_wall) for c in chosen]
    return doc


async def render(server: ProxyServer, limit: int = MAX_SESSIONS, chunk: int = CHUNK) -> bytes:
    """``snapshot(server, limit)`` as JSON bytes, built ``chunk`` sessions at a time with the
    event loop free in between (a session that closes meanwhile is still listed, as
    ``draining``: the list is what was connected when the request came)."""
    now_mono, now_wall = time.monotonic(), time.time()
    conns, chosen = _choose(server, limit)
    head = json.dumps(_header(conns, chosen, now_wall), separators=(",", ":"))
    parts = [head[:-1].encode(), b',"connections":[']
    for start in range(0, len(chosen), chunk):
        if start:
            await asyncio.sleep(0)
            parts.append(b",")
        entries = [describe(c, now_mono, now_wall) for c in chosen[start : start + chunk]]
        parts.append(json.dumps(entries, separators=(",", ":"))[1:-1].encode())
    parts.append(b"]}\n")
    return b"".join(parts)

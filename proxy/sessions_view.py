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
of watched tubes (``watched_count`` has the full number).
"""

from __future__ import annotations

import heapq
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.relay import Connection, ProxyServer

#: At most this many sessions in one response.
MAX_SESSIONS = 10_000
#: At most this many watched tube names per session (``watched_count`` has them all).
MAX_WATCHED = 20

#: Values of ``state``, in the order they are tested.
STATES = ("connecting", "draining", "blocked", "waiting", "relaying", "idle")


def state_of(conn: Connection) -> str:
    """``connecting``: the upstream connection is being opened; ``draining``: closing after the
    replies still due (quit, EOF, shutdown, protocol error); ``blocked``: the proxy is asking
    beanstalkd which tube a job is in before deciding a command; ``waiting``: in a blocking
    ``reserve``; ``relaying``: commands in flight; ``idle``: nothing in flight."""
    session = conn.session
    if session is None or conn.starting or conn.upstream is None:
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


def snapshot(server: ProxyServer, limit: int = MAX_SESSIONS) -> dict[str, Any]:
    """The live sessions of ``server``, oldest first, at most ``limit`` of them."""
    conns = list(server.connections)
    now_mono, now_wall = time.monotonic(), time.time()
    chosen = heapq.nsmallest(limit, conns, key=lambda c: c.started)
    return {
        "pid": os.getpid(),
        "time": datetime.fromtimestamp(now_wall, UTC).isoformat(timespec="seconds"),
        "count": len(conns),
        "truncated": len(conns) > len(chosen),
        "connections": [describe(c, now_mono, now_wall) for c in chosen],
    }

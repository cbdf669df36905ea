"""The asyncio shell: accept, TLS handshake, principal lookup, one upstream per client, pump.

``ProxyServer`` accepts plain TCP (or unix) sockets itself and hands each to
``loop.connect_accepted_socket(ssl=...)`` (or, with ``tls.transport: builtin``, to
``proxy.tlsbio.accept_tls``) under the handshake timeout, so every failed handshake is logged
with its reason. Only after the client certificate verified and mapped to a principal does it open
exactly one upstream connection for that client. ``Connection`` then carries bytes between
the two transports through a ``Session`` (the pure state machine) and nothing else: it never
looks at command bytes itself. Backpressure: the client is not read while the upstream
transport's buffer is full, while the session waits for a lookup, or while too many replies
are pending; upstream is not read while the client's buffer is full. A client that
half-closes is drained (upstream is half-closed, beanstalkd answers what it has and closes),
even if it closed before its upstream connection was open; after ``quit`` upstream is left to
close by itself, as beanstalkd does once everything before the ``quit`` is answered (a
half-close would turn a blocking ``reserve`` into ``TIMED_OUT``), and the client is still read
only to notice its EOF; a client that vanishes closes its upstream connection so beanstalkd
releases its reservations; an upstream that vanishes closes the client with a logged reason.
Limits: a client socket counts against ``max_connections`` from the end of its handshake until
``connection_lost`` (closing waits ``close_timeout`` for the peer's close_notify, then aborts);
handshakes in progress have their own budget (``max_handshakes``, oldest dropped when full)
and a per-source cap, which also count a refused handshake's socket until it is closed (the
builtin transport lingers after the alert; such sockets are dropped first); refusals and
failed handshakes are logged at most ``PEER_LOG_LINES`` per source address per window, the
rest summarised. Put bodies in flight are bounded per process
(``limits.max_buffered_bytes``, a pure ``Budget``): a put reserves its size at its command
line, a client whose put must wait is not read until its reservation is granted (in arrival
order), and the relay gives the bytes back once the body was handed to the upstream transport,
or when the connection closes. With ``serve --workers N`` (a ``SharedCounts``)
``max_connections``, ``max_handshakes``, ``max_connections_per_principal`` and
``max_handshakes_per_source`` are checked against the whole proxy's counts (a lingering refused
socket counts only in its own worker for ``max_handshakes``, and in the shared per-source count;
an address for which the shared source table has no free slot meets the cap per worker), and
each principal's rate bucket holds 1/N of its rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from enum import Enum
from typing import Any, cast

from proxy.acl import Policy
from proxy.budget import Budget
from proxy.config import Config, Endpoint
from proxy.deadlines import Deadline, Deadlines
from proxy.identity import Identity
from proxy.listen import bind_listener, bound_port
from proxy.logs import event
from proxy.logsummary import AUDIT_BURST, AUDIT_WINDOW, Suppressed, WindowCounter
from proxy.metrics import Metrics
from proxy.ratelimit import TokenBucket, worker_share
from proxy.session import EMPTY, Session
from proxy.shadow import ShadowView, shadow_principal
from proxy.shadowreport import ShadowReporter
from proxy.sharedlimits import SharedCounts
from proxy.tlsbio import TLSTransport, accept_tls, use_builtin
from proxy.tlsctx import peer_identity

log = logging.getLogger("beanstalk_proxy")
conn_log = logging.getLogger("beanstalk_proxy.conn")
audit_log = logging.getLogger("beanstalk_proxy.audit")

#: Time one burst of commands in this many per connection for the latency histogram (a
#: histogram observation costs about as much as relaying a small command).
LATENCY_SAMPLE_EVERY = 16
#: At shutdown, how long to wait for client TLS transports to finish closing.
CLOSE_WAIT = 2.0
#: How long a draining connection may wait for upstream to finish before it is cut.
DRAIN_TIMEOUT = 30.0
#: Log lines about refusals and failed handshakes per source address and window; the rest of a
#: burst is summarised in one line per window (an unauthenticated peer must not be able to
#: write the log at the rate it can open sockets).
PEER_LOG_LINES = 10
PEER_LOG_WINDOW = 10.0


class PolicyHolder:
    """Holds the current policy; replaced as a whole on reload (readers see old or new)."""

    __slots__ = ("current",)

    def __init__(self, policy: Policy) -> None:
        self.current = policy


def _bucket_limiter(bucket: TokenBucket) -> Callable[[], bool]:
    """The session's ``limiter``: take a token from ``bucket`` now."""
    take, clock = bucket.take, time.monotonic
    return lambda: take(clock())


def _timed_out(exc: BaseException) -> bool:
    # asyncio's (and uvloop's) ssl_handshake_timeout fails the handshake with
    # ConnectionAbortedError("SSL handshake is taking longer than N seconds: ..."), not
    # TimeoutError.
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer than" in str(exc)
    )


def _ssl_reason(exc: BaseException) -> str:
    if _unreadable(exc):
        return f"unparseable_certificate ({type(exc).__name__}: {str(exc)[:200]!r})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"tls error: {exc.reason or exc}"
    if _timed_out(exc):
        return f"tls handshake timed out ({exc})"
    return f"tls handshake failed: {type(exc).__name__}: {exc}"


def _unreadable(exc: BaseException) -> bool:
    # The stock SSL transports decode the peer certificate (``getpeercert()``) when the
    # handshake completes; a URI SAN that is not valid UTF-8 fails there with a
    # UnicodeDecodeError, which fails the handshake. (ssl.SSLCertVerificationError is a
    # ValueError too: a certificate that failed verification is not this case.)
    return isinstance(exc, ValueError) and not isinstance(exc, ssl.SSLError)


def _failure_kind(exc: BaseException) -> str:
    """A low-cardinality label for a failed handshake."""
    if _unreadable(exc):
        return "unparseable_certificate"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "verify_failed"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower()
        if "did_not_return" in reason or "no_certificate" in reason:
            return "no_certificate"
        if "certificate" in reason:
            return "bad_certificate"
        if "version" in reason or "protocol" in reason:
            return "protocol_version"
        return "tls_error"
    if _timed_out(exc):
        return "timeout"
    return "connection_error"


class _Upstream(asyncio.Protocol):
    """Protocol for the upstream (beanstalkd) side of one connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.conn.upstream_data(data)

    def eof_received(self) -> bool:
        self.conn.upstream_gone("upstream closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_gone(f"upstream lost: {exc}" if exc else "upstream closed")

    def pause_writing(self) -> None:
        self.conn.upstream_full = True
        self.conn.update_reading()

    def resume_writing(self) -> None:
        self.conn.upstream_full = False
        self.conn.update_reading()


class Phase(Enum):
    """A connection's lifecycle, in order (``Connection.phase``; it only moves forward).

    ``HANDSHAKING``: TLS handshake and the certificate's principal, no session yet;
    ``CONNECTING``: the session exists, its upstream connection is being opened;
    ``RELAYING``: both sides open; ``DRAINING``: upstream half-closed (the session's
    ``Output.half_close``), its close ends the connection (or ``DRAIN_TIMEOUT``); ``CLOSED``:
    closed and logged (or refused). A handshake that made no session and did not close (it
    failed, or raised) leaves ``HANDSHAKING`` for ``RELAYING``: the client transport's end
    then closes it.
    Backpressure (``upstream_full``, ``client_full``, ``reading``) is independent of it."""

    HANDSHAKING = 1
    CONNECTING = 2
    RELAYING = 3
    DRAINING = 4
    CLOSED = 5


#: ``Phase.CLOSED`` as a module global: ``closed`` is read several times per relayed read, and
#: an Enum member costs a metaclass attribute lookup each time.
_CLOSED = Phase.CLOSED


class Connection(asyncio.Protocol):
    """One client connection after its TLS handshake: the pump around a ``Session``."""

    __slots__ = (
        "_abort_timer",
        "_drain_timer",
        "_sample_skip",
        "_sample_t0",
        "_turn",
        "bytes_in",
        "bytes_out",
        "client",
        "client_ended",
        "client_full",
        "counted_as",
        "counted_shared",
        "early",
        "expiry",
        "finishing",
        "identity",
        "last_active",
        "lost",
        "over_limit",
        "peer",
        "phase",
        "principal",
        "reading",
        "reason",
        "server",
        "session",
        "source",
        "started",
        "tls_started",
        "upstream",
        "upstream_full",
    )

    def __init__(self, server: ProxyServer, peer: str, source: str | None = None) -> None:
        self.server = server
        self.peer = peer
        self.source = source  # the client's IP address (None for unix sockets)
        self.started = time.monotonic()
        self.last_active = self.started
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.session: Session | None = None
        self.identity: Identity | None = None
        self.principal = "-"
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_full = False
        self.client_full = False
        self.reading = True
        self.phase = Phase.HANDSHAKING
        self.client_ended = False  # the client sent EOF (TLS close_notify or FIN)
        self.reason = ""
        self._drain_timer: asyncio.TimerHandle | None = None
        self._sample_t0 = -1.0  # start of the timed burst of commands, or -1 when none
        self._sample_skip = 0  # bursts to let pass untimed before timing the next one
        self.early = b""  # bytes that arrived between handshake and session creation
        self.counted_as: str | None = None  # principal this connection counts against
        self.counted_shared = False  # ... in the workers' shared table too (--workers N)
        self.over_limit = False  # past max_connections when its socket was counted
        #: this connection's entry in the server's certificate-expiry schedule (``expiries``)
        self.expiry: Deadline | None = None
        self.tls_started = False  # the socket was handed to the TLS layer, which now owns it
        self.lost = False  # the client transport reported connection_lost: its socket is closed
        self._abort_timer: asyncio.TimerHandle | None = None
        self._turn: asyncio.Handle | None = None  # the session's next turn, when scheduled
        self.finishing = False  # the client is gone; the session runs what it sent, then closes

    @property
    def closed(self) -> bool:
        return self.phase is _CLOSED

    def peer_der(self) -> bytes | None:
        """The client certificate (DER) for a revocation re-check, read back from the TLS
        layer, which holds it anyway (a copy kept here cost 0.5 to 2 KiB per connection);
        ``None`` when the TLS layer no longer has it."""
        client = self.client
        ssl_object = client.get_extra_info("ssl_object") if client is not None else None
        if ssl_object is None:
            return None
        try:
            der: bytes | None = ssl_object.getpeercert(binary_form=True)
        except ValueError:  # "handshake not done yet"
            return None
        return der

    # --- client transport callbacks ---------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports do not subclass it
        self.client = transport
        # From here until connection_lost the socket counts against max_connections.
        self.server.transport_made(self)

    def data_received(self, data: bytes) -> None:
        session = self.session
        self.bytes_in += len(data)
        self.last_active = time.monotonic()
        if session is None:
            # TLS 1.3 clients send commands right after their Finished message; the SSL layer
            # may hand them over before the principal is known. Keep them for the session.
            self.early += data
            return
        session.feed_client(data)
        self.flush()

    def eof_received(self) -> bool:
        self.client_ended = True
        if self.session is not None:
            self.session.client_eof()
            self.flush()
        # The builtin TLS transport stays open for the replies (TLS 1.3 half-close) until
        # ``close`` once the session drained; the stock ones close, connection_lost follows.
        return isinstance(self.client, TLSTransport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        session = self.session
        if (
            exc is None
            and self.client_ended
            and not self.closed
            and session is not None
            and session.has_unrun_commands()
        ):
            # The client closed cleanly behind commands not run yet (a put waiting for the
            # budget, a backlog of turns): beanstalkd would run them, so the session finishes
            # and drains, then closes. It keeps counting against the limits until then, as it
            # still holds its upstream connection.
            self.finishing = True
            self.client_full = False
            return
        self.server.transport_gone(self)
        if self.closed:
            return
        if exc is None and self.client_ended and self.phase.value < Phase.RELAYING.value:
            # The client sent its commands and closed before its upstream connection was open
            # (a fire-and-forget producer). beanstalkd would still run what it received, so
            # the commands are kept: the handshake task drains them upstream, then closes.
            return
        self.close(f"client lost: {exc}" if exc else "client closed", by="client")

    def pause_writing(self) -> None:
        self.client_full = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        self.update_reading()

    def resume_writing(self) -> None:
        self.client_full = False
        if self.upstream is not None and not self.closed:
            self.upstream.resume_reading()
        self.update_reading()

    # --- upstream side ------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        self.last_active = time.monotonic()  # idle means no traffic either way
        session.feed_upstream(data)
        self.flush()

    def upstream_gone(self, reason: str) -> None:
        if self.closed:
            return
        session = self.session
        by = "upstream"
        ending = session.upstream_closed(reason) if session is not None else None
        if ending is not None:
            reason, by = ending
        else:
            self.server.metrics.upstream_lost.inc()
            log.warning(
                "upstream connection ended",
                extra=event(
                    "upstream_lost", peer=self.peer, principal=self.principal, error=reason
                ),
            )
        self.close(reason, by=by)

    # --- pump ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Carry out the session's ``Output`` after a step: write, audit, close, release the
        budget, half-close, pause/resume. Nothing here reads the session's state."""
        session = self.session
        if session is None or self.phase is _CLOSED:  # (``closed`` inlined: the hot path)
            return
        upstream = self.upstream
        out = session.output(upstream is not None)
        if self._sample_t0 >= 0 and not out.pending:
            self.server.metrics.latency.observe(time.monotonic() - self._sample_t0)
            self._sample_t0 = -1.0
        data = out.to_client
        if data:
            out.to_client = EMPTY  # written: the object outlives the step, keep no payload
            self.bytes_out += len(data)
            assert self.client is not None
            self.client.write(data)
        if out.denials:
            self._audit(out.denials)
            out.denials = ()  # audited: keep no records past the step
        if out.close is not None:
            self.close(out.close)
            return
        if upstream is None:  # connecting: hold what was read, read no more until it is open
            self.update_reading()
            return
        data = out.to_upstream
        if data:
            out.to_upstream = EMPTY
            upstream.write(data)
            if self._sample_t0 < 0 and out.pending:
                if self._sample_skip:
                    self._sample_skip -= 1
                else:
                    self._sample_skip = LATENCY_SAMPLE_EVERY - 1
                    self._sample_t0 = time.monotonic()
        if out.release:
            # Put bodies handed to the upstream transport (or dropped): their budget is free.
            self.server.grant(self.server.budget.release(out.release))
        if out.half_close and self.phase is Phase.RELAYING:
            self.phase = Phase.DRAINING
            if upstream.can_write_eof():
                upstream.write_eof()
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(
                DRAIN_TIMEOUT, self.close, "drain timed out waiting for upstream"
            )
        self.update_reading()

    def update_reading(self) -> None:
        """Read the client only while both transports have room and the session's last
        ``Output`` allows it (``read``), and it has no ``backlog``: commands it already holds
        run first, one ``TURN_BUDGET`` per event-loop turn (fair turns), and only then is more
        read."""
        session = self.session
        client = self.client
        if session is None or client is None or self.phase is _CLOSED:
            return
        out = session.out
        # ``_may_run(session)`` inlined (this runs after every step)
        want = (
            not self.upstream_full
            and not self.client_full
            and self.upstream is not None
            and out.read
        )
        if want and out.backlog:
            want = False
            if self._turn is None:
                self._turn = asyncio.get_running_loop().call_soon(self._next_turn)
        if want != self.reading and not self.lost:
            self.reading = want
            if want:
                client.resume_reading()
            else:
                client.pause_reading()

    def _next_turn(self) -> None:
        """Run the session's next turn of buffered commands (scheduled by ``update_reading``)."""
        self._turn = None
        session = self.session
        if session is None or self.closed or not session.out.backlog:
            return
        if self._may_run(session):
            session.resume()
            self.flush()
        else:
            self.update_reading()  # backpressure: wait for resume_writing and friends

    def _may_run(self, session: Session) -> bool:
        # a client that does not read its replies is not read either: replies the proxy makes
        # itself (denials, errors) would otherwise pile up without bound
        # (``update_reading`` inlines this predicate: change both together)
        return (
            not self.upstream_full
            and not self.client_full
            and self.upstream is not None
            and session.out.read
        )

    def budget_granted(self) -> None:
        """This connection's waiting put got its share of ``limits.max_buffered_bytes``."""
        session = self.session
        if session is None:
            return
        session.budget_granted()
        if self.closed:  # (close cancels a waiting put, so this is only a safety net)
            self._release_budget(session)
            return
        self.flush()  # its update_reading schedules the turn that reads the body

    def _release_budget(self, session: Session) -> None:
        """Give back everything this connection holds of the budget (closing)."""
        budget = self.server.budget
        stalled, held = session.take_budget()
        granted: list[Any] = budget.cancel(self) if stalled else []
        if held:
            granted += budget.release(held)
        self.server.grant(granted)

    def drain(self, reason: str) -> None:
        """Stop reading the client; let upstream answer what it was sent, then close."""
        session = self.session
        if self.closed:
            return
        if session is None or self.upstream is None:
            self.close(reason)
            return
        session.stop(reason)
        self.flush()

    def _audit(self, denials: Sequence[dict[str, Any]]) -> None:
        """Count every denial; log the first ``AUDIT_BURST`` per window of this connection,
        one line each, and leave the rest to a "denials suppressed" summary."""
        fingerprint = self.identity.fingerprint if self.identity else None
        server = self.server
        metrics = server.metrics
        counter = server.denial_audit
        now = time.monotonic()
        for record in denials:
            metrics.denied(record["principal"], record["tube"], record["command"])
            if counter.hit(self, record["command"], now):
                record["peer"] = self.peer
                record["fingerprint"] = fingerprint
                audit_log.info("denied", extra=event("denied", **record))
        if counter.suppressed(self):
            server.schedule_audit()

    def close(self, reason: str, by: str = "proxy") -> None:
        """Close both sides (flushing what is buffered) and log the connection once: why
        (``reason``) and who ended it (``by``: ``client``, ``upstream`` or ``proxy``)."""
        if self.closed:
            return
        self.phase = Phase.CLOSED
        self.reason = reason
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self.expiry is not None:
            self.server.expiries.discard(self.expiry)
            self.expiry = None
        self.server.audit_summary(self.server.denial_audit.pop(self, time.monotonic()))
        if self.session is not None and self.session.to_client and self.client is not None:
            data = self.session.take_client()
            self.client.write(data)
            self.bytes_out += len(data)
        if self.upstream is not None:
            self.upstream.close()
        if self.session is not None:
            self._release_budget(self.session)
        self.close_transport()
        if self.finishing:
            self.server.transport_gone(self)
        self.server.forget(self)
        self.server.metrics.connection_closed(self)
        conn_log.info(
            "close",
            extra=event(
                "close",
                peer=self.peer,
                principal=self.principal,
                subject=self.identity.subject if self.identity else None,
                fingerprint=self.identity.fingerprint if self.identity else None,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                duration=round(time.monotonic() - self.started, 3),
                reason=reason,
                closed_by=by,
            ),
        )

    def close_transport(self) -> None:
        """Close the client transport: flush it, send the TLS close_notify and wait for the
        peer's at most ``limits.close_timeout``, then abort. Until ``connection_lost`` the
        socket still counts against the limits, so a peer that never answers the close cannot
        make the proxy hold more sockets than it counts."""
        client = self.client
        if client is None or self.lost:
            return
        client.close()
        if self._abort_timer is None and not self.lost:
            self._abort_timer = asyncio.get_running_loop().call_later(
                self.server.config.limits.close_timeout, self._abort_client
            )

    def _abort_client(self) -> None:
        if self.client is not None and not self.lost:
            self.client.abort()


def _certificate_expired(conn: Connection) -> None:
    conn.expiry = None  # (fired: off the schedule)
    conn.close("client certificate expired")


class ProxyServer:
    """The listening proxy. See the module docstring."""

    def __init__(
        self,
        config: Config,
        ssl_context: ssl.SSLContext,
        policy: PolicyHolder,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        shared: SharedCounts | None = None,
    ) -> None:
        self.config = config
        self.reuse_port = reuse_port
        # With --workers N: the whole proxy's counts (connections, handshakes, per principal)
        # shared by the workers; the limits hold for their sum. None: this process alone.
        self.shared = shared
        self.workers = shared.workers if shared is not None else 1
        self.metrics = metrics or Metrics()
        self.ssl_context = ssl_context
        self.policy = policy
        self.connections: set[Connection] = set()
        # Handshakes in progress, oldest first (the one dropped when max_handshakes is full),
        # and how many of them each source address has (with --workers: in ``shared``).
        self._pending: dict[Connection, asyncio.Task[None]] = {}
        self._pending_per_source: dict[str, int] = {}
        # Sockets of failed handshakes still open after their alert (builtin transport, up to
        # close_timeout), oldest first, with their source address: they count against
        # max_handshakes (and per source) until really closed, and are the first dropped.
        self._lingering: dict[TLSTransport, str | None] = {}
        self._peer_log = WindowCounter(PEER_LOG_LINES, PEER_LOG_WINDOW, max_keys=10_000)
        self._peer_log_timer: asyncio.TimerHandle | None = None
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._per_principal: dict[str, int] = {}
        # One command-rate bucket per rate-limited principal, shared by all its connections.
        # Kept while the principal has no connection (reconnecting must not refill it);
        # bounded by the principals of the ACL, pruned on reload.
        self._buckets: dict[str, TokenBucket] = {}
        # Client TLS transports not yet lost: what counts against max_connections.
        self._open_transports: set[Connection] = set()
        self._transports_gone = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        # Each connection's close at its client certificate's expiry, on one timer.
        self.expiries: Deadlines[Connection] = Deadlines(_certificate_expired)
        self.metrics.track(self.connections)
        self.metrics.track_sockets(lambda: len(self._open_transports), lambda: self.handshaking)
        # Per connection, a burst of denial lines per window; the rest summarised.
        self.denial_audit = WindowCounter(AUDIT_BURST, AUDIT_WINDOW)
        self._audit_timer: asyncio.TimerHandle | None = None
        # Put bodies in flight, proxy-wide (limits.max_buffered_bytes); keys are Connections.
        self.budget = Budget(config.limits.max_buffered_bytes)
        self.metrics.track_budget(self.budget)
        self.shadow: Policy | None = None  # acl_shadow, decided next to the policy
        self._shadow_report: ShadowReporter | None = None

    @property
    def handshaking(self) -> int:
        """Connections in the TLS handshake now, and failed ones whose socket is not closed yet
        (what counts against ``max_handshakes``)."""
        return len(self._pending) + len(self._lingering)

    @property
    def client_sockets(self) -> int:
        """Client sockets past the handshake and not yet closed (relayed, refused or closing):
        what counts against ``max_connections``."""
        return len(self._open_transports)

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0), or None for unix listeners."""
        return bound_port(self._listener)

    async def start(self) -> None:
        """Bind the listener and start accepting.

        The proxy accepts raw sockets itself and hands each to
        ``loop.connect_accepted_socket(ssl=...)``, which reports a failed handshake as an
        exception (so every failure is logged with its reason) and never loses the bytes a
        client sends before the TLS layer is in place, on asyncio and uvloop alike."""
        loop = asyncio.get_running_loop()
        _quiet_unreadable_certificates(loop)
        self._listener = bind_listener(self.config.listen, self.reuse_port)
        self._acceptor = loop.create_task(self._accept_loop(self._listener))
        log.debug(
            "listening",
            extra=event(
                "listening", listen=str(self.config.listen), upstream=str(self.config.upstream)
            ),
        )
        limits = self.config.limits
        periods = [t for t in (limits.idle_timeout, limits.max_connection_lifetime) if t]
        if periods:
            interval = min(max(min(periods) / 4, 0.05), 5.0)
            self._sweeper = loop.create_task(self._sweep(interval))

    async def _sweep(self, interval: float) -> None:
        """Enforce idle_timeout (never on a connection with a command outstanding, such as a
        blocked reserve) and max_connection_lifetime."""
        limits = self.config.limits
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                session = conn.session
                if session is None or conn.closed:
                    continue
                lifetime = limits.max_connection_lifetime
                if lifetime and now - conn.started > lifetime:
                    why, limit = "max connection lifetime reached", "max_connection_lifetime"
                elif (
                    limits.idle_timeout
                    and now - conn.last_active > limits.idle_timeout
                    and not session.pending
                    and not session.draining
                ):
                    why, limit = "idle timeout", "idle_timeout"
                else:
                    continue
                if not session.draining:
                    conn_log.info(
                        "draining",
                        extra=event(
                            "drain",
                            peer=conn.peer,
                            principal=conn.principal,
                            reason=why,
                            limit=f"limits.{limit}",
                        ),
                    )
                conn.drain(why)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: log, back off, keep serving
                log.error(
                    "accept failed",
                    extra=event("accept_failed", listen=str(self.config.listen), error=str(exc)),
                )
                await asyncio.sleep(0.1)
                continue
            if self.accepted(sock, addr):
                # sock_accept does not yield while connections are queued: let the handshake
                # dropped to make room run its cancellation (which closes its socket) before
                # the next accept, so dropped sockets cannot pile up during a burst.
                await asyncio.sleep(0)

    def accepted(self, sock: socket.socket, addr: Any) -> bool:
        """Start the handshake of an accepted socket, or refuse it; True when a pending
        handshake was dropped to make room."""
        tcp = isinstance(addr, tuple)
        peer = f"{addr[0]}:{addr[1]}" if tcp else "unix"
        source: str | None = addr[0] if tcp else None
        limits = self.config.limits
        self.metrics.connections_total.inc()
        shared = self.shared
        open_now = len(self._open_transports) if shared is None else shared.connections()
        if open_now >= limits.max_connections:
            self._refused_at_accept(sock, peer, source, "max_connections", limits.max_connections)
            return False
        per_source = limits.max_handshakes_per_source
        if source is not None and per_source is not None:
            if (
                self._pending_per_source.get(source, 0) >= per_source
                if shared is None
                else not shared.try_add_source(source, per_source)  # counted from here on
            ):
                self._refused_at_accept(sock, peer, source, "max_handshakes_per_source", per_source)
                return False
        elif source is not None and shared is not None:
            shared.add_source(source)  # no cap: counted all the same
        if shared is None:
            dropped = self.handshaking >= limits.handshake_limit()
            if dropped:
                self._drop_oldest_handshake()
        else:
            dropped = False
            while not shared.try_add_handshake(limits.handshake_limit()):
                # The whole proxy's budget is full: drop this worker's oldest pending
                # handshake; a worker with none of its own refuses the newcomer instead.
                # (a lingering refused socket goes first; it is not in the shared count)
                if not self._pending:
                    if source is not None:
                        shared.remove_source(source)
                    self._refused_at_accept(
                        sock, peer, source, "max_handshakes", limits.handshake_limit()
                    )
                    return dropped
                self._drop_oldest_handshake()
                dropped = True
        if tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, peer, source)
        task = asyncio.get_running_loop().create_task(self._handshake(conn, sock))
        self._pending[conn] = task
        if source is not None and shared is None:
            self._pending_per_source[source] = self._pending_per_source.get(source, 0) + 1
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._handshake_task_done(t, conn, sock))
        return dropped

    def _refused_at_accept(
        self, sock: socket.socket, peer: str, source: str | None, kind: str, limit: int
    ) -> None:
        sock.close()
        self.metrics.handshake_failures.labels(kind).inc()
        self._peer_event(
            source,
            kind,
            logging.WARNING,
            "refused",
            event("refused", peer=peer, reason=kind, limit=f"limits.{kind}", max=limit),
        )

    def _drop_oldest_handshake(self) -> None:
        """max_handshakes is full: drop the oldest pending handshake (its task is cancelled,
        which closes its socket) so sockets that never finish cannot hold the door shut. The
        socket of a failed handshake still lingering after its alert goes first (aborted)."""
        if self._lingering:
            tls = next(iter(self._lingering))
            self._linger_done(tls)
            tls.abort()
            return
        conn, task = next(iter(self._pending.items()))
        self._leave_pending(conn)
        task.cancel()
        self.metrics.handshake_failures.labels("dropped").inc()
        self._peer_event(
            conn.source,
            "dropped",
            logging.WARNING,
            "refused: oldest pending handshake dropped",
            event(
                "refused",
                peer=conn.peer,
                reason="dropped",
                limit="limits.max_handshakes",
                max=self.config.limits.handshake_limit(),
            ),
        )

    def _leave_pending(self, conn: Connection) -> None:
        if self._pending.pop(conn, None) is None:
            return
        if self.shared is not None:
            self.shared.remove_handshake()
        self._leave_source(conn.source)

    def _leave_source(self, source: str | None) -> None:
        if source is not None and self.shared is not None:
            self.shared.remove_source(source)
        elif source is not None:
            left = self._pending_per_source.get(source, 1) - 1
            if left > 0:
                self._pending_per_source[source] = left
            else:
                self._pending_per_source.pop(source, None)

    def _lingers(self, tls: TLSTransport, source: str | None) -> None:
        """``accept_tls``'s ``on_linger``: a failed handshake's socket stays open after the
        alert; it keeps counting (as a handshake, and for its source) until it is closed."""
        self._lingering[tls] = source
        if source is not None and self.shared is not None:
            self.shared.add_source(source)
        elif source is not None:
            self._pending_per_source[source] = self._pending_per_source.get(source, 0) + 1
        tls.on_closed = lambda: self._linger_done(tls)

    def _linger_done(self, tls: TLSTransport) -> None:
        if tls in self._lingering:
            self._leave_source(self._lingering.pop(tls))

    def _handshake_task_done(
        self, task: asyncio.Task[None], conn: Connection, sock: socket.socket
    ) -> None:
        self._tasks.discard(task)
        self._leave_pending(conn)
        if not conn.tls_started:
            sock.close()  # cancelled before the TLS layer took the socket over
        if not task.cancelled() and task.exception() is not None:
            # A bug, never a client's doing: logged once (never "exception never retrieved")
            # and the connection closed like any other.
            exc = task.exception()
            log.error(
                "internal error",
                exc_info=exc,
                extra=event("internal_error", peer=conn.peer, error=repr(exc)),
            )
            conn.close(f"internal error: {type(exc).__name__}")

    def _peer_event(
        self, source: str | None, kind: str, level: int, message: str, extra: dict[str, Any]
    ) -> None:
        """Log one refusal or failed handshake (``extra``: its ``event``), unless its source
        address already had its ``PEER_LOG_LINES`` in this window: then it is only counted,
        and summarised later."""
        if self._peer_log.hit(source or "unix", kind, time.monotonic()):
            conn_log.log(level, message, extra=extra)
        elif self._peer_log_timer is None:
            self._peer_log_timer = asyncio.get_running_loop().call_later(
                PEER_LOG_WINDOW, self._report_suppressed
            )

    def _report_suppressed(self, now: float | None = None) -> None:
        self._peer_log_timer = None
        for s in self._peer_log.expired(time.monotonic() if now is None else now):
            _log_suppressed(s)
        if now is None and self._peer_log.deadline() is not None:
            self._peer_log_timer = asyncio.get_running_loop().call_later(
                PEER_LOG_WINDOW, self._report_suppressed
            )

    def _refuse(
        self, conn: Connection, kind: str, level: int, message: str, extra: dict[str, Any]
    ) -> None:
        """Refuse a connection whose handshake completed: counted, logged (summarised per
        source; the ``refused`` event is the only line: no ``close`` follows), and closed like
        every other connection (counted until its socket is)."""
        self.metrics.handshake_failures.labels(kind).inc()
        self._peer_event(conn.source, kind, level, message, extra)
        conn.phase = Phase.CLOSED
        conn.reason = kind
        conn.close_transport()

    async def _handshake(self, conn: Connection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer = conn.peer
        limits = self.config.limits
        try:
            try:
                conn.tls_started = True
                transport: asyncio.Transport
                if use_builtin(self.config.tls.transport):
                    transport, _ = await accept_tls(
                        loop,
                        lambda: conn,
                        sock,
                        self.ssl_context,
                        ssl_handshake_timeout=limits.handshake_timeout,
                        close_timeout=limits.close_timeout,
                        on_linger=lambda tls: self._lingers(tls, conn.source),
                    )
                else:
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: conn,
                        sock,
                        ssl=self.ssl_context,
                        ssl_handshake_timeout=limits.handshake_timeout,
                    )
            except asyncio.CancelledError:
                # Dropped for a newer handshake, or the proxy is closing. Had the handshake
                # just completed, the transport is open: close it like any other.
                conn.phase = Phase.CLOSED
                conn.close_transport()
                raise
            except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
                kind = _failure_kind(exc)
                self.metrics.handshake_failures.labels(kind).inc()
                self._peer_event(
                    conn.source,
                    kind,
                    logging.INFO,
                    "handshake failed",
                    event("handshake_failed", peer=peer, reason=kind, error=_ssl_reason(exc)),
                )
                sock.close()
                return
            finally:
                self._leave_pending(conn)
            tls = transport
            conn.client = tls
            tls.pause_reading()
            conn.reading = False
            if (
                conn.over_limit
                if self.shared is not None
                else len(self._open_transports) > limits.max_connections
            ):
                # Handshakes that completed together overshot the limit: cut this one at once.
                self.metrics.handshake_failures.labels("max_connections").inc()
                self._peer_event(
                    conn.source,
                    "max_connections",
                    logging.WARNING,
                    "refused",
                    event(
                        "refused",
                        peer=peer,
                        reason="max_connections",
                        limit="limits.max_connections",
                        max=limits.max_connections,
                    ),
                )
                conn.phase = Phase.CLOSED
                tls.abort()
                return
            ssl_object = tls.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            if not der:
                self._refuse(
                    conn,
                    "no_certificate",
                    logging.INFO,
                    "refused",
                    event("refused", peer=peer, reason="no_certificate"),
                )
                return
            try:
                identity = peer_identity(ssl_object, der)  # issuer, EKU and CN checks: tlsctx
                principal = self.policy.current.principal_for(identity)
            except Exception as exc:  # a certificate OpenSSL accepted but we cannot read
                self._refuse(
                    conn,
                    "unparseable_certificate",
                    logging.INFO,
                    "refused",
                    event(
                        "refused",
                        peer=peer,
                        reason="unparseable_certificate",
                        error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    ),
                )
                return
            conn.identity = identity
            if principal is None:
                self._refuse(
                    conn,
                    "no_principal",
                    logging.INFO,
                    "refused",
                    event(
                        "refused",
                        peer=peer,
                        reason="no_principal",
                        detail=identity.refusal or "no principal matches",
                        subject=identity.subject,
                        cn=identity.cn,
                        ou=list(identity.ous),
                        dns=list(identity.dns),
                        uri=list(identity.uris),
                        ip=list(identity.ips),
                        fingerprint=identity.fingerprint,
                        issuer=identity.issuer,
                    ),
                )
                return
            cap = limits.max_connections_per_principal
            if cap is not None:
                scope = None
                if self._per_principal.get(principal, 0) >= cap:
                    scope = "process"
                elif self.shared is not None:
                    if self.shared.try_add_principal(principal, cap):
                        conn.counted_shared = True
                    else:
                        scope = "whole proxy"
                if scope is not None:
                    self._refuse(
                        conn,
                        "max_connections_per_principal",
                        logging.WARNING,
                        "refused",
                        event(
                            "refused",
                            peer=peer,
                            principal=principal,
                            reason="max_connections_per_principal",
                            limit="limits.max_connections_per_principal",
                            max=cap,
                            scope=scope,
                        ),
                    )
                    return
            self._per_principal[principal] = self._per_principal.get(principal, 0) + 1
            conn.counted_as = principal
            conn.principal = principal
            conn.session = Session(
                self.policy,
                principal,
                limits.max_job_size,
                self._limiter_for(principal),
                self.config.denial_reply,
                self.budget,
                conn,
            )
            conn.phase = Phase.CONNECTING
            if self.shadow is not None:
                self._shadow_view(conn)
            if conn.early:
                conn.session.feed_client(conn.early)
                conn.early = b""
            if conn.client_ended:
                conn.session.client_eof()
        finally:
            if conn.session is None and not conn.closed:
                if conn.lost:  # the client closed cleanly while handshaking (connection_lost)
                    conn.close("client closed", by="client")
                else:
                    conn.phase = Phase.RELAYING
        self.connections.add(conn)
        # A connection lives no longer than its client certificate.
        left = conn.identity.not_after.timestamp() - time.time() if conn.identity else 0.0
        conn.expiry = self.expiries.add(conn, left)
        await self._connect_upstream(conn)

    async def _connect_upstream(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        up: Endpoint = self.config.upstream
        try:
            async with asyncio.timeout(self.config.limits.upstream_connect_timeout):
                if up.path is not None:
                    transport, _ = await loop.create_unix_connection(
                        lambda: _Upstream(conn), up.path
                    )
                else:
                    assert up.host is not None and up.port is not None
                    transport, _ = await loop.create_connection(
                        lambda: _Upstream(conn), up.host, up.port
                    )
        except (OSError, TimeoutError) as exc:
            self.metrics.upstream_failures.inc()
            why = str(exc) or type(exc).__name__  # a TimeoutError has no message
            if isinstance(exc, TimeoutError):
                why = f"timed out after {self.config.limits.upstream_connect_timeout}s"
            log.error(
                "upstream unreachable",
                extra=event("upstream_unreachable", upstream=str(up), peer=conn.peer, error=why),
            )
            conn.close(f"upstream unreachable: {why}")
            return
        if conn.closed:
            transport.close()
            return
        conn.upstream = transport
        conn.phase = Phase.RELAYING
        identity = conn.identity
        conn_log.info(
            "open",
            extra=event(
                "open",
                peer=conn.peer,
                principal=conn.principal,
                subject=identity.subject if identity else None,
                fingerprint=identity.fingerprint if identity else None,
            ),
        )
        conn.flush()

    def grant(self, granted: list[Any]) -> None:
        """Resume the connections whose waiting puts ``Budget`` granted."""
        for conn in granted:
            conn.budget_granted()

    def transport_made(self, conn: Connection) -> None:
        self._open_transports.add(conn)
        if self.shared is not None:
            conn.over_limit = self.shared.add_connection() > self.config.limits.max_connections

    def schedule_audit(self) -> None:
        """Log the denial summaries when the earliest suppressing window ends."""
        if self._audit_timer is not None:
            return
        deadline = self.denial_audit.deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._audit_timer = loop.call_at(
                loop.time() + max(deadline - time.monotonic(), 0.0), self._audit_tick
            )

    def _audit_tick(self) -> None:
        self._audit_timer = None
        for summary in self.denial_audit.expired(time.monotonic()):
            self.audit_summary(summary)
        self.schedule_audit()

    def audit_summary(self, summary: Suppressed | None) -> None:
        """One line for the denials a connection's window did not log."""
        if summary is None:
            return
        conn = summary.key
        fields: dict[str, Any] = {
            "event": "denials_suppressed",
            "suppressed": summary.total,
            "by_command": summary.by_kind,
        }
        if isinstance(conn, Connection):
            fields["principal"] = conn.principal
            fields["peer"] = conn.peer
            fields["fingerprint"] = conn.identity.fingerprint if conn.identity else None
        fields["seconds"] = round(summary.end - summary.start, 3)
        audit_log.info("denials suppressed", extra={"fields": fields})

    def transport_gone(self, conn: Connection) -> None:
        """The client's socket is closed: only now does it stop counting against
        max_connections and max_connections_per_principal."""
        if conn in self._open_transports:
            self._open_transports.discard(conn)
            if self.shared is not None:
                self.shared.remove_connection()
        if conn.counted_as is not None:
            if conn.counted_shared and self.shared is not None:
                self.shared.remove_principal(conn.counted_as)
                conn.counted_shared = False
            left = self._per_principal.get(conn.counted_as, 1) - 1
            if left > 0:
                self._per_principal[conn.counted_as] = left
            else:
                self._per_principal.pop(conn.counted_as, None)
            conn.counted_as = None
        if not self._open_transports:
            self._transports_gone.set()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    def _limiter_for(self, principal: str) -> Callable[[], bool] | None:
        """The session limiter for ``principal`` under the current policy (``None`` when it
        has no rate). Its bucket is shared, and replaced only when (rate, burst) changed."""
        rate = self.policy.current.rate_for(principal)
        if rate is None:
            return None
        rate = worker_share(rate, self.workers)
        bucket = self._buckets.get(principal)
        if bucket is None or (bucket.rate, bucket.burst) != rate:
            bucket = self._buckets[principal] = TokenBucket(rate[0], rate[1], time.monotonic())
        return _bucket_limiter(bucket)

    def reload_policy(self, policy: Policy, changed: Collection[str] = ()) -> int:
        """Swap the policy; live connections follow it from their next command. A connection
        whose certificate no longer maps to any principal is closed. Rate limits follow too:
        an unchanged (rate, burst) keeps its bucket, a changed one starts a full new bucket,
        a removed one lifts the limit. Returns the number of live connections whose principal
        changed (or was removed) or whose principal is in ``changed`` (rights changed)."""
        affected = 0
        self.policy.current = policy
        for name, bucket in list(self._buckets.items()):
            rate = policy.rate_for(name)
            if rate is None or worker_share(rate, self.workers) != (bucket.rate, bucket.burst):
                del self._buckets[name]
        for conn in list(self.connections):
            if conn.identity is None or conn.session is None:
                continue
            principal = policy.principal_for(conn.identity)
            if principal is None:
                affected += 1
                conn.close("principal removed by ACL reload")
                continue
            if principal != conn.principal or principal in changed:
                affected += 1
            if principal != conn.principal:
                self.metrics.principal_changed(conn.principal, conn.session)
                conn.principal = principal
                conn.session.set_principal(principal)
            conn.session.limiter = self._limiter_for(principal)
            if not conn.session.may_keep_waiting():
                # A reserve waiting on a tube the principal may no longer consume: closing
                # the upstream connection ends it (beanstalkd puts back anything it reserved);
                # a release or ignore on the client's behalf would be a command it never sent.
                conn.close("consume revoked while waiting in reserve")  # logged by close
        return affected

    def reload_shadow(self, shadow: Policy | None) -> None:
        """Load (or with ``None`` drop) the shadow policy; live connections follow it from
        their next command, their certificate mapped again by its principals."""
        self.shadow = shadow
        for conn in list(self.connections):
            if conn.session is not None and conn.identity is not None:
                if shadow is None:
                    conn.session.set_shadow(None)
                else:
                    self._shadow_view(conn)

    def _shadow_view(self, conn: Connection) -> None:
        """Give ``conn``'s session a view of the current shadow (keeping its shadow state)."""
        shadow, session = self.shadow, conn.session
        assert shadow is not None and session is not None and conn.identity is not None
        if self._shadow_report is None:
            self._shadow_report = ShadowReporter(self.metrics)
        name = shadow_principal(shadow, conn.identity)
        old = session.shadow
        if old is None:
            view = ShadowView(shadow, name, self.policy, self._shadow_report, session.used)
        else:
            view = old.successor(shadow, name)
        if name != conn.principal and (old is None or old.principal != name):
            self._shadow_report.principal_differs(conn.principal, name)
        session.set_shadow(view)

    def reload_tls(
        self, ctx: ssl.SSLContext, revoked: Callable[[bytes], bool] | None = None
    ) -> None:
        """New handshakes use ``ctx``; established connections keep theirs, except those whose
        client certificate ``revoked`` (a check against the new CRLs) reports revoked."""
        self.ssl_context = ctx
        if revoked is None:
            return
        for conn in list(self.connections):
            if conn.closed:
                continue
            try:
                der = conn.peer_der()
                if der is None:  # fail closed: a certificate that cannot be re-checked
                    conn.close("client certificate unavailable for the revocation re-check")
                elif revoked(der):
                    conn.close("client certificate revoked")  # logged by close
            except Exception as exc:  # one connection's failure must not skip the others
                log.error(
                    "revocation re-check failed",
                    extra=event("crl_recheck_failed", error=f"{type(exc).__name__}: {exc}"),
                )
                conn.close("client certificate unavailable for the revocation re-check")

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; with ``grace`` > 0, drain every connection first (in-flight commands
        get their replies, a blocked reserve answers TIMED_OUT once upstream is half-closed),
        then close whatever is left."""
        if self._acceptor is not None:
            self._acceptor.cancel()
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if grace > 0 and self.connections:
            self._idle.clear()
            draining, started = len(self.connections), time.monotonic()
            for conn in list(self.connections):
                conn.drain("proxy shutting down")
            if self.connections:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await self._idle.wait()
            log.info(
                "shutdown drain finished",
                extra=event(
                    "shutdown_drained",
                    drained=draining - len(self.connections),
                    cut=len(self.connections),
                    seconds=round(time.monotonic() - started, 3),
                ),
            )
        for conn in list(self.connections):
            conn.close("proxy shutting down")
        self.expiries.cancel()
        for task in list(self._pending.values()):
            task.cancel()
        for tls in list(self._lingering):
            tls.abort()
        if self._peer_log_timer is not None:
            self._peer_log_timer.cancel()
        self._report_suppressed(now=float("inf"))
        if self._open_transports:
            # Let the TLS layers finish closing (close_notify, reading the client's last
            # bytes) before the process exits: a socket torn down with unread input is
            # reset, which can destroy replies the client has not read yet.
            self._transports_gone.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(CLOSE_WAIT, self.config.limits.close_timeout)):
                    await self._transports_gone.wait()
        for task in list(self._tasks):
            task.cancel()
        if self._acceptor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor


def _log_suppressed(s: Suppressed) -> None:
    conn_log.warning(
        "suppressed refusals and failed handshakes",
        extra=event(
            "refusals_suppressed",
            source=s.key,
            count=s.total,
            by_reason=s.by_kind,
            window=PEER_LOG_WINDOW,
        ),
    )


def _quiet_unreadable_certificates(loop: asyncio.AbstractEventLoop) -> None:
    """The stock SSL transports report a handshake that failed on an unreadable client
    certificate (a ValueError, see ``_unreadable``) to the loop's exception handler, which logs
    a traceback per connection. The proxy counts and logs those itself (summarised per source),
    so they are dropped here; every other report goes to the previous handler."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("SSL handshake failed") and _unreadable(
            context.get("exception") or Exception()
        ):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

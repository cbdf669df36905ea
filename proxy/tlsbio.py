"""A server-side TLS transport of the proxy's own: ``ssl.SSLObject`` over two ``MemoryBIO``s,
driven by a ``BufferedProtocol`` on the raw accepted socket (asyncio and uvloop alike).

``accept_tls`` replaces ``loop.connect_accepted_socket(factory, sock, ssl=...)`` and hands the
app protocol a transport with the same methods. It differs from the stock SSL transports where
they lose things: a handshake OpenSSL refuses flushes OpenSSL's alert (certificate required,
unknown CA, certificate revoked or expired, bad certificate) to the client before the socket
closes, and the awaitable raises the ``ssl.SSLError`` naming the reason; a TLS 1.3 client's
close_notify (or a bare TCP FIN on any version) calls the app's ``eof_received`` and, when it
returns True, the transport stays open for writing until the app calls ``close()``; a TLS 1.2
close_notify is answered with ours at once and the socket closes (RFC 5246 7.2.1), but the app
gets ``eof_received`` and, only once it calls ``close()``, ``connection_lost``, so it can
finish what the client sent (the relay drains it upstream); its writes are dropped. Closing
sends close_notify and a FIN, then waits at most ``close_timeout`` seconds for the client's
close_notify or FIN before aborting. Reads go through one 64 KiB buffer per thread (reads are
synchronous), fed to OpenSSL 16 KiB at a time, and writes are encrypted 16 KiB at a time, so
nothing large is allocated or kept per connection (CPython's ``SSL_MODE_RELEASE_BUFFERS`` frees
OpenSSL's record buffers when idle).
A refused handshake's socket lingers the same way after the alert (at most ``close_timeout``);
``accept_tls``'s caller learns of it through ``on_linger``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["READ_BUFFER", "TLSTransport", "accept_tls", "use_builtin"]

#: Size of the per-thread read buffer every connection reads into.
READ_BUFFER = 64 * 1024
#: Bytes fed to OpenSSL (and encrypted) per step: one TLS record's worth, which also bounds
#: what the memory BIOs keep allocated after a burst.
CHUNK = 16 * 1024

_local = threading.local()
#: The ``extra`` of every ``TLSTransport`` (``BaseTransport`` would make a dict per connection).
_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})

#: _ENDED: a TLS 1.2 client sent close_notify; ours is sent and the socket closed, while the
#: app still drains (its writes are dropped) until it calls ``close()``.
_HANDSHAKE, _OPEN, _LINGER, _DEAD, _ENDED = range(5)


def use_builtin(setting: str) -> bool:
    """``tls.transport``: "builtin" (the default, on every loop), "stock", or "auto", kept as
    an alias of "builtin" for configurations written when it meant "stock on uvloop" (a quiet
    A/B found builtin no slower there: bench/README.md)."""
    return setting != "stock"


def _read_buffer() -> memoryview:
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER))
    return view


class TLSTransport(asyncio.Transport, asyncio.BufferedProtocol):
    """Both halves of one TLS connection: the ``BufferedProtocol`` of the raw socket transport
    and the ``Transport`` its app protocol sees. See the module docstring."""

    __slots__ = (
        "_app",
        "_app_reading",
        "_c",
        "_closing",
        "_eof_in",
        "_exc",
        "_factory",
        "_fin",
        "_incoming",
        "_loop",
        "_outgoing",
        "_raw",
        "_sslobj",
        "_state",
        "_timer",
        "_view",
        "_waiter",
        "close_timeout",
        "on_closed",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        waiter: asyncio.Future[None],
        close_timeout: float,
    ) -> None:
        super().__init__(_NO_EXTRA)  # get_extra_info below never reads it
        self._loop = loop
        self._factory: Callable[[], asyncio.BaseProtocol] | None = factory
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject = context.wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        # The C object whose read, write and pending ``ssl.SSLObject``'s Python methods call
        # (private ``_sslobj``, as tlsctx reads it for the chain): the per-record path calls it
        # directly, one Python call fewer each time. The SSLObject itself if it is not there.
        self._c: Any = getattr(self._sslobj, "_sslobj", self._sslobj)
        self._waiter: asyncio.Future[None] | None = waiter
        self._raw: asyncio.Transport | None = None
        self._app: Any = None  # the app protocol once the handshake is done
        self._app_reading = True
        self._closing = False
        self._eof_in = False  # the client will send nothing more (close_notify or FIN)
        self._fin = False  # the raw socket reached EOF
        self._exc: BaseException | None = None
        self._state = _HANDSHAKE
        self._timer: asyncio.TimerHandle | None = None
        self._view = _read_buffer()
        self.close_timeout = close_timeout
        #: Called once when the socket is really closed (``accept_tls``'s ``on_linger``).
        self.on_closed: Callable[[], None] | None = None

    # --- raw side: BufferedProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]  # uvloop's do not subclass it

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        view = self._view
        incoming = self._incoming
        state = self._state
        if state == _OPEN and self._app_reading and nbytes > CHUNK:
            # Feed OpenSSL a record's worth at a time, so the BIO stays small.
            chunks: list[bytes] = []
            for off in range(0, nbytes, CHUNK):
                incoming.write(view[off : min(off + CHUNK, nbytes)])
                if not self._decrypt(chunks):
                    incoming.write(view[off + CHUNK : nbytes])  # keep the rest for later
                    break
            self._deliver(chunks)
            return
        incoming.write(view[:nbytes])
        if state == _OPEN:
            if self._app_reading:
                chunks = []
                if self._decrypt(chunks) and chunks:  # still open: deliver (else delivered)
                    self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        elif state == _HANDSHAKE:
            self._do_handshake()
        elif state == _LINGER:
            self._drain_linger()

    def eof_received(self) -> bool:
        self._fin = True
        state = self._state
        if state == _HANDSHAKE:
            self._incoming.write_eof()
            self._do_handshake()
        elif state == _OPEN:
            # OpenSSL is not told: a FIN without close_notify would be a fatal "unexpected
            # EOF" there, and the connection could not be written to any more. A FIN is a TCP
            # half-close; ``_decrypt`` reports it once everything before it is delivered.
            if self._app_reading:
                chunks: list[bytes] = []
                self._decrypt(chunks)
                self._deliver(chunks)
        elif state == _LINGER:
            self._state = _DEAD
        # False: the raw transport closes itself; True keeps it open for writing (half-close)
        return self._state == _OPEN or self._state == _HANDSHAKE

    def connection_lost(self, exc: Exception | None) -> None:
        on_closed = self.on_closed
        if on_closed is not None:
            self.on_closed = None
            on_closed()
        ended = self._state == _ENDED and not self._closing
        self._raw = None
        self._state = _DEAD
        if not ended:
            self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                exc or ConnectionResetError("connection lost during TLS handshake")
            )
        self._waiter = None
        app = self._app
        self._app = None
        self._factory = None
        if app is not None:
            reason = self._exc if self._exc is not None else exc
            if self._eof_in and isinstance(reason, ConnectionResetError):
                # The client finished cleanly (close_notify or FIN), then closed its socket with
                # our bytes unread (a session ticket, replies): its TCP reset is no error.
                reason = None
            if ended:
                self._app = app  # told in close(): the app is still draining upstream
                return
            app.connection_lost(reason)

    def _app_lost(self) -> None:
        app = self._app
        self._app = None
        if app is not None:
            app.connection_lost(None)

    def pause_writing(self) -> None:
        if self._app is not None and self._state == _OPEN:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None and self._state == _OPEN:
            self._app.resume_writing()

    # --- TLS state machine --------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())

    def _do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._handshake_failed(exc)
            return
        self._flush()  # our Finished, session tickets
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self._factory is not None
        app = self._app = self._factory()
        self._factory = None
        self._state = _OPEN
        app.connection_made(self)
        if self._state == _OPEN and self._app_reading:
            chunks: list[bytes] = []
            self._decrypt(chunks)  # commands sent right after the client's Finished
            self._deliver(chunks)
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _handshake_failed(self, exc: BaseException) -> None:
        """Send OpenSSL's alert, half-close and linger; the awaitable raises ``exc``."""
        if isinstance(exc, ssl.SSLEOFError):
            exc = ConnectionResetError("connection closed during TLS handshake")
        self._flush()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._closing = True
        self._linger()

    def handshake_timed_out(self) -> None:
        self._timer = None
        if self._state != _HANDSHAKE:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError("TLS handshake timed out"))
        self.give_up()

    def give_up(self) -> None:
        """The handshake is abandoned (timed out, or the caller was cancelled): abort. After a
        failed handshake (lingering after the alert) the linger's own deadline stays."""
        self._waiter = None
        if self._state == _HANDSHAKE:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._closing = True
            self._state = _DEAD
            if self._raw is not None:
                self._raw.abort()

    def _decrypt(self, chunks: list[bytes]) -> bool:
        """Decrypt what the BIO holds into ``chunks``; False once the client sent its last byte
        (close_notify, FIN) or the connection failed."""
        c = self._c
        read = c.read
        pending = c.pending
        incoming = self._incoming
        try:
            while True:
                n = incoming.pending  # no more plaintext than that: allocate no more
                data = read(n if 0 < n < CHUNK else CHUNK)
                if not data:  # close_notify
                    self._deliver(chunks)
                    chunks.clear()
                    self._peer_closed(notified=True)
                    return False
                chunks.append(data)
                if not incoming.pending and not pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify (read raises it once ours was sent)
            self._deliver(chunks)
            chunks.clear()
            self._peer_closed(notified=True)
            return False
        except ssl.SSLError as exc:
            self._deliver(chunks)
            chunks.clear()
            self._fatal(exc)
            return False
        if self._outgoing.pending:
            self._flush()  # e.g. a KeyUpdate answer
        if self._fin:  # a FIN without close_notify: a TCP half-close (a partial record is lost)
            self._deliver(chunks)
            chunks.clear()
            self._peer_closed(notified=False)
            return False
        return True

    def _deliver(self, chunks: list[bytes]) -> None:
        if not chunks or self._state != _OPEN or self._closing:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._app.data_received(data)

    def _peer_closed(self, notified: bool) -> None:
        if self._eof_in:
            return
        self._eof_in = True
        keep = False
        if self._state == _OPEN and not self._closing:
            keep = bool(self._app.eof_received())
        if notified and self._sslobj.version() != "TLSv1.3":
            # TLS 1.2 has no half-close (RFC 5246 7.2.1): answer with our close_notify and
            # close the socket now. The app is not told the connection is lost until it
            # closes, so it can still drain what the client sent upstream; its writes are
            # dropped.
            if self._state == _OPEN and not self._closing:
                self._state = _ENDED
                self._app_reading = False
                with contextlib.suppress(ssl.SSLError):
                    self._sslobj.unwrap()
                self._flush()
                if self._raw is not None:
                    self._raw.close()
                return
            keep = False
        if not keep:
            self.close()

    def _fatal(self, exc: BaseException) -> None:
        self._exc = exc
        self._flush()  # OpenSSL's alert
        self._closing = True
        self._state = _DEAD
        if self._raw is not None:
            self._raw.close()

    def _linger(self) -> None:
        """Half-close our side and wait (bounded) for the client's close_notify or FIN."""
        raw = self._raw
        if raw is None:
            return
        if self._eof_in or self._fin:
            self._state = _DEAD
            raw.close()
            return
        self._state = _LINGER
        if raw.can_write_eof():
            try:
                raw.write_eof()
            except OSError:  # the client is already gone (asyncio shuts down at once)
                self._state = _DEAD
                raw.abort()
                return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.close_timeout, raw.abort)

    def _drain_linger(self) -> None:
        """While lingering, read and discard until the client's close_notify or FIN."""
        read = self._sslobj.read
        try:
            while read(CHUNK):
                pass
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError:
            pass
        self._state = _DEAD
        if self._raw is not None:
            self._raw.close()

    # --- app side: Transport ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._state != _OPEN:
            return
        n = len(data)
        if not n:
            return
        raw = self._raw
        assert raw is not None
        sslwrite = self._c.write
        out = self._outgoing
        try:
            if n <= CHUNK:
                sslwrite(data)
                raw.write(out.read())
                return
            view = memoryview(data)
            parts = []
            for off in range(0, n, CHUNK):
                sslwrite(view[off : off + CHUNK])
                parts.append(out.read())
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        raw.write(b"".join(parts))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close from the server side here")

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send close_notify after everything written, then close (see ``_linger``)."""
        if self._closing:
            return
        self._closing = True
        self._app_reading = False
        if self._state == _ENDED or self._state == _DEAD:  # (TLS 1.2 close_notify, see above)
            if self._raw is None:
                self._loop.call_soon(self._app_lost)
            return
        # SSLWantReadError: the client's close_notify has not come (yet)
        with contextlib.suppress(ssl.SSLError):
            self._sslobj.unwrap()
        self._flush()
        self._linger()

    def abort(self) -> None:
        was_closing = self._closing
        self._closing = True
        self._state = _DEAD
        if self._raw is not None:
            self._raw.abort()
        elif not was_closing:
            self._loop.call_soon(self._app_lost)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        if self._app_reading:
            self._app_reading = False
            if self._raw is not None and self._state == _OPEN and not self._closing:
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._app_reading or self._closing or self._state != _OPEN:
            return
        self._app_reading = True
        raw = self._raw
        if raw is None:
            return
        if self._incoming.pending or self._fin or self._sslobj.pending():
            self._loop.call_soon(self._resume)
        raw.resume_reading()

    def _resume(self) -> None:
        if self._state == _OPEN and self._app_reading:
            chunks: list[bytes] = []
            self._decrypt(chunks)
            self._deliver(chunks)

    def is_reading(self) -> bool:
        return self._app_reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._raw
        return (raw.get_write_buffer_size() if raw is not None else 0) + self._outgoing.pending

    def get_write_buffer_limits(self) -> tuple[int, int]:
        if self._raw is None:
            return (0, 0)
        return self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[no-any-return]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "compression":
            return self._sslobj.compression()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)


async def accept_tls(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    *,
    ssl_handshake_timeout: float,
    close_timeout: float = 2.0,
    on_linger: Callable[[TLSTransport], None] | None = None,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """Like ``loop.connect_accepted_socket(protocol_factory, sock, ssl=ssl_context,
    ssl_handshake_timeout=...)`` on the transport of this module. On failure it raises the
    ``ssl.SSLError`` (after sending OpenSSL's alert), ``TimeoutError`` or ``OSError``.
    A failed handshake's socket may stay open after that (up to ``close_timeout``, waiting
    for the client to read the alert and close): then ``on_linger`` is called with the
    transport first, whose ``on_closed`` the caller may set to learn when the socket is really
    closed (or ``abort()`` it). Not called when the caller was cancelled.

    The transport takes the socket's file descriptor over (``sock`` is detached), so a caller
    that closes ``sock`` after a failure does not close the descriptor the transport is still
    using to finish its close."""
    own = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    waiter: asyncio.Future[None] = loop.create_future()
    tls = TLSTransport(loop, protocol_factory, ssl_context, waiter, close_timeout)
    tls._timer = loop.call_later(ssl_handshake_timeout, tls.handshake_timed_out)
    try:
        await loop.connect_accepted_socket(lambda: tls, own)
        await waiter
    except BaseException as exc:
        tls.give_up()
        if tls._raw is None:
            own.close()
        elif on_linger is not None and not isinstance(exc, asyncio.CancelledError):
            on_linger(tls)
        raise
    app = tls._app
    assert app is not None
    return tls, app

"""Client mode: a plain local listener whose connections are carried over mutual TLS.

Most beanstalkd client libraries cannot speak TLS. ``TunnelServer`` listens on a local TCP
port or unix socket (loopback by default) and, for each accepted connection, opens one TLS
connection to the proxy, presenting the producer's client certificate and verifying the
proxy's certificate and host name. Bytes are piped unchanged both ways (the proxy on the far
side does all protocol checking), with backpressure in both directions; what a client sends
before the TLS connection is up is kept and delivered, also if it has already closed. A local
half-close cannot be carried over TLS: the tunnel keeps relaying replies to the half-closed
client until the proxy closes or replies stop (``linger``). A failed TLS connection closes the
local connection and logs why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from proxy.config import Endpoint
from proxy.listen import bind_listener, bound_port
from proxy.logs import event

log = logging.getLogger("beanstalk_proxy")
conn_log = logging.getLogger("beanstalk_proxy.conn")


class _Side(asyncio.Protocol):
    """One end of a pipe; forwards what it reads to its peer transport."""

    def __init__(self, pipe: _Pipe, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports do not subclass it
        self.transport = transport
        if self is self.pipe.local:
            transport.pause_reading()  # until the TLS connection (uvloop ignores it here)
            self.pipe.on_local(transport)

    def data_received(self, data: bytes) -> None:
        self.pipe.carry(self, data)

    def eof_received(self) -> bool:
        return self.pipe.eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self, exc)

    def pause_writing(self) -> None:
        other = self.pipe.other(self).transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        if self is self.pipe.remote and not self.pipe.reading_local:
            return  # local is not read (TLS not up yet, or it ended)
        other = self.pipe.other(self).transport
        if other is not None and not self.pipe.closed:
            other.resume_reading()


class _Pipe:
    """A local connection and its TLS connection to the proxy.

    Bytes the local client sends before the TLS leg is up are kept (uvloop delivers them, and
    the client's EOF, even though reading is paused) and written once it is up, also when the
    client has already gone. TLS cannot carry a half-close, so a local EOF is not passed on:
    the local socket stays open for the replies until the proxy closes (after ``quit``) or no
    reply has come for ``linger`` seconds; if every byte the client sent was sent before the
    last reply arrived, nothing is outstanding and the pipe closes at once."""

    def __init__(
        self,
        on_local: Callable[[asyncio.Transport], None],
        on_close: Callable[[_Pipe], None],
        linger: float,
    ) -> None:
        self.on_local = on_local
        self.on_close = on_close
        self.linger = linger
        self.peer = "-"
        self.local = _Side(self, "local")
        self.remote = _Side(self, "remote")
        self.early = bytearray()
        self.remote_up = False  # the TLS leg is up and ``early`` was written to it
        self.local_eof = False
        self.local_gone: str | None = None  # why, when the client left before the TLS leg
        self.closed = False
        self.started = time.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0
        self.unanswered = 0  # bytes sent up since the last bytes came down
        self._linger: asyncio.TimerHandle | None = None

    @property
    def reading_local(self) -> bool:
        return self.remote_up and not self.local_eof and not self.closed

    def other(self, side: _Side) -> _Side:
        return self.remote if side is self.local else self.local

    def carry(self, side: _Side, data: bytes) -> None:
        if side is self.local:
            self.bytes_up += len(data)
            self.unanswered += len(data)
            remote = self.remote.transport
            if not self.remote_up or remote is None:
                self.early += data  # TLS not up yet: keep it, and pause (effective now)
                if side.transport is not None:
                    side.transport.pause_reading()
                return
            remote.write(data)
            return
        self.bytes_down += len(data)
        self.unanswered = 0
        local = self.local.transport
        if local is not None and self.local_gone is None:
            local.write(data)
        if self._linger is not None:
            self._start_linger()  # a reply came: wait a full period for the next one

    def eof(self, side: _Side) -> bool:
        if side is self.remote:  # the proxy closed: local gets the rest, then its close
            self.close("remote closed")
            return False
        self.local_eof = True
        if self.remote_up:
            self._local_ended()
        return True  # keep the local socket open for the replies

    def lost(self, side: _Side, exc: Exception | None) -> None:
        reason = f"{side.name} closed" if exc is None else f"{side.name} lost: {exc}"
        if side is self.local and not self.remote_up and not self.closed:
            self.local_gone = reason  # deliver what it sent first (see remote_ready)
            return
        self.close(reason)

    def remote_ready(self) -> None:
        """The TLS leg is up: write what came early, then carry on, linger or close."""
        remote = self.remote.transport
        local = self.local.transport
        assert remote is not None and local is not None
        self.remote_up = True
        if self.early:
            remote.write(bytes(self.early))
            self.early.clear()
        if self.local_gone is not None:
            self.close(self.local_gone)  # closing the TLS leg flushes what was written
        elif self.local_eof:
            self._local_ended()
        else:
            local.resume_reading()

    def _local_ended(self) -> None:
        if self.unanswered:
            self._start_linger()
        else:
            self.close("local closed")

    def _start_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._linger = asyncio.get_running_loop().call_later(
            self.linger, self.close, f"local half-closed, no reply for {self.linger:g}s"
        )

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        self.on_close(self)
        for side in (self.local, self.remote):
            if side.transport is not None:
                side.transport.close()
        conn_log.info(
            "tunnel close",
            extra=event(
                "tunnel_close",
                peer=self.peer,
                bytes_up=self.bytes_up,
                bytes_down=self.bytes_down,
                duration=round(time.monotonic() - self.started, 3),
                reason=reason,
            ),
        )


class TunnelServer:
    """Listens on ``listen`` and tunnels each connection over mutual TLS to ``connect``."""

    def __init__(
        self,
        listen: Endpoint,
        connect: Endpoint,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        linger: float = 2.0,
    ) -> None:
        self.listen = listen
        self.connect = connect
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or connect.host or "localhost"
        self.connect_timeout = connect_timeout
        self.linger = linger
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int | None:
        return bound_port(self._sock)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sock = bind_listener(self.listen)
        if self._sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(self._accept, sock=self._sock)
        else:
            self._server = await loop.create_server(self._accept, sock=self._sock)
        log.debug(
            "tunnel listening",
            extra=event("tunnel_listening", listen=str(self.listen), proxy=str(self.connect)),
        )

    def _accept(self) -> _Side:
        pipe = _Pipe(
            lambda transport: self._spawn(pipe, transport), self._pipes.discard, self.linger
        )
        self._pipes.add(pipe)
        return pipe.local

    def _spawn(self, pipe: _Pipe, local: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._open(pipe, local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, pipe: _Pipe, local: asyncio.Transport) -> None:
        peer = local.get_extra_info("peername")
        pipe.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        loop = asyncio.get_running_loop()
        target = self.connect
        try:
            async with asyncio.timeout(self.connect_timeout):
                assert target.host is not None and target.port is not None
                remote, _ = await loop.create_connection(
                    lambda: pipe.remote,
                    target.host,
                    target.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
        except (OSError, TimeoutError) as exc:
            log.error(
                "tunnel to the proxy failed",
                extra=event(
                    "tunnel_failed", peer=pipe.peer, proxy=str(target), error=str(exc) or "timeout"
                ),
            )
            pipe.close(f"proxy unreachable: {exc or 'timeout'}")
            return
        conn_log.info("tunnel open", extra=event("tunnel_open", peer=pipe.peer, proxy=str(target)))
        if pipe.closed:  # the proxy refused at once, or the tunnel is shutting down
            remote.close()
            return
        pipe.remote_ready()

    def reload_tls(self, ctx: ssl.SSLContext) -> None:
        """New tunnels use ``ctx``; open ones keep theirs."""
        self.ssl_context = ctx

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.close("tunnel shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

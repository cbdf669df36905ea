"""Client mode: a plain local listener whose connections are carried over mutual TLS.

Most beanstalkd client libraries cannot speak TLS. ``TunnelServer`` listens on a local TCP
port or unix socket (loopback by default) and, for each accepted connection, opens one TLS
connection to the proxy, presenting the producer's client certificate and verifying the
proxy's certificate and host name. Bytes are piped unchanged both ways (the proxy on the far
side does all protocol checking), with backpressure in both directions and half-close
propagated. A failed TLS connection closes the local connection and logs why.
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
            transport.pause_reading()  # until the TLS connection to the proxy is up
            self.pipe.on_local(transport)

    def data_received(self, data: bytes) -> None:
        self.pipe.carry(self, data)

    def eof_received(self) -> bool:
        return self.pipe.eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.close(f"{self.name} closed" if exc is None else f"{self.name} lost: {exc}")

    def pause_writing(self) -> None:
        other = self.pipe.other(self).transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.pipe.other(self).transport
        if other is not None and not self.pipe.closed:
            other.resume_reading()


class _Pipe:
    """A local connection and its TLS connection to the proxy."""

    def __init__(
        self,
        on_local: Callable[[asyncio.Transport], None],
        on_close: Callable[[_Pipe], None],
    ) -> None:
        self.on_local = on_local
        self.on_close = on_close
        self.peer = "-"
        self.local = _Side(self, "local")
        self.remote = _Side(self, "remote")
        self.early = bytearray()
        self.eofs = 0
        self.closed = False
        self.started = time.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0

    def other(self, side: _Side) -> _Side:
        return self.remote if side is self.local else self.local

    def carry(self, side: _Side, data: bytes) -> None:
        target = self.other(side).transport
        if side is self.local:
            self.bytes_up += len(data)
            if target is None:  # TLS not up yet: keep it (local reading is paused meanwhile)
                self.early += data
                return
        else:
            self.bytes_down += len(data)
        if target is not None:
            target.write(data)

    def eof(self, side: _Side) -> bool:
        """Half-close: pass the EOF on where the other transport can carry it (plain TCP);
        TLS transports in asyncio cannot half-close, so an EOF there closes the pipe."""
        target = self.other(side).transport
        self.eofs += 1
        if (
            self.eofs < 2
            and target is not None
            and not target.is_closing()
            and target.can_write_eof()
        ):
            target.write_eof()
            return True  # keep the other direction open
        self.close(f"{side.name} closed")
        return False

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_close(self)
        for side in (self.local, self.remote):
            if side.transport is not None:
                side.transport.close()
        conn_log.info(
            "tunnel close peer=%s up=%d down=%d duration=%.3fs reason=%s",
            self.peer,
            self.bytes_up,
            self.bytes_down,
            time.monotonic() - self.started,
            reason,
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
    ) -> None:
        self.listen = listen
        self.connect = connect
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or connect.host or "localhost"
        self.connect_timeout = connect_timeout
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
        log.info("client tunnel listening on %s, proxy %s", self.listen, self.connect)

    def _accept(self) -> _Side:
        pipe = _Pipe(lambda transport: self._spawn(pipe, transport), self._pipes.discard)
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
                await loop.create_connection(
                    lambda: pipe.remote,
                    target.host,
                    target.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
        except (OSError, TimeoutError) as exc:
            log.error("tunnel to %s failed for %s: %s", target, pipe.peer, exc or "timeout")
            pipe.close(f"proxy unreachable: {exc or 'timeout'}")
            return
        conn_log.info("tunnel open peer=%s proxy=%s", pipe.peer, target)
        remote = pipe.remote.transport
        if pipe.closed or remote is None:
            return
        if pipe.early:
            remote.write(bytes(pipe.early))
            pipe.early.clear()
        local.resume_reading()

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

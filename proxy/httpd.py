"""The status listener: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz`` and, when
enabled, ``/connections``.

A deliberately tiny HTTP/1.0 responder on its own listener (loopback by default, off unless
``metrics.listen`` is set). ``/healthz`` answers 200 while the process runs. ``/readyz`` opens
a fresh connection to the upstream beanstalkd, sends ``stats`` and answers 200 only if the
reply is a well-formed ``OK`` body that does not say ``draining: true``; otherwise 503 with the
reason. ``/connections`` (only when ``metrics.connections: true``, else 404) is the JSON list
of live sessions that ``proxy.sessions_view.render`` builds at request time. Requests are capped in
size and time; only GET and HEAD are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.config import Endpoint
from proxy.listen import bind_listener, bound_port
from proxy.logs import event
from proxy.metrics import Metrics
from proxy.protocol import NEED_DATA, ReplyParser

log = logging.getLogger("beanstalk_proxy")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0


async def check_upstream(upstream: Endpoint, timeout: float) -> tuple[bool, str]:
    """(ready, reason): does beanstalkd answer ``stats`` and is it not draining?"""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            if upstream.path is not None:
                reader, writer = await asyncio.open_unix_connection(upstream.path)
            else:
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.write(b"stats\r\n")
            parser = ReplyParser()
            while True:
                data = await reader.read(65536)
                if not data:
                    return False, "upstream closed the connection"
                parser.feed(data)
                reply = parser.next_reply()
                if reply is not NEED_DATA:
                    break
    except TimeoutError:
        return False, f"upstream unreachable: timed out after {timeout}s"
    except OSError as exc:
        return False, f"upstream unreachable: {exc or type(exc).__name__}"
    except Exception as exc:  # a ProtocolError from a garbled reply
        return False, f"upstream reply unusable: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    line, body = reply
    if not line.startswith(b"OK ") or body is None:
        return False, f"unexpected reply to stats: {line[:40]!r}"
    if b"\ndraining: true" in body:
        return False, "upstream is draining"
    return True, "ok"


class StatusServer:
    """Serves the status endpoints on ``listen``."""

    def __init__(
        self,
        listen: Endpoint,
        metrics: Metrics,
        upstream: Endpoint,
        timeout: float = 2.0,
        connections: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.listen = listen
        self.metrics = metrics
        self.upstream = upstream
        self.timeout = timeout
        self.connections = connections  # builds the /connections JSON; None: not served
        self._one_build = asyncio.Lock()  # one /connections document in memory at a time
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int | None:
        return bound_port(self._sock)

    async def start(self) -> None:
        self._sock = bind_listener(self.listen, backlog=64)
        if self._sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(self._handle, sock=self._sock)
        else:
            self._server = await asyncio.start_server(self._handle, sock=self._sock)
        paths = "/metrics, /healthz, /readyz" + (", /connections" if self.connections else "")
        log.info(
            "status endpoints listening",
            extra=event("status_listening", listen=str(self.listen), paths=paths),
        )
        if self.connections is not None and not self.listen.is_loopback:
            log.warning(
                "/connections is served on an address that is not loopback: whoever reaches it "
                "sees every client's address, principal and certificate subject",
                extra=event("connections_exposed", listen=str(self.listen)),
            )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = await self._route(head)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, OSError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        method = head.split(b" ", 1)[0] if "head" in locals() else b""
        writer.write(
            b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, _REASONS.get(status, b"OK"), ctype.encode(), len(body))
        )
        if method != b"HEAD":
            writer.write(body)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _route(self, head: bytes) -> tuple[int, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if path == b"/readyz":
            ready, reason = await check_upstream(self.upstream, self.timeout)
            return (200 if ready else 503), "text/plain", reason.encode() + b"\n"
        if path == b"/connections":
            if self.connections is None:
                return 404, "text/plain", b"/connections is off (metrics.connections: false)\n"
            async with self._one_build:
                return 200, "application/json", await self.connections()
        return 404, "text/plain", b"not found\n"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    503: b"Service Unavailable",
}

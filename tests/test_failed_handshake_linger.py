"""Issue 9, item 1 (builtin TLS transport): a refused handshake's socket stays open after its
alert, for at most ``limits.close_timeout``, so the client can read why it was refused. Until
it is really closed it counts against ``max_handshakes`` (the oldest such socket is the first
dropped) and against its source address's cap. Counted here from ``/proc/self/fd`` (the
proxy's side of each connection: sockets whose local port is the proxy's) and from the
proxy's own gauge, against a real beanstalkd and real TLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Any

from conftest import (
    PKI,
    Beanstalkd,
    RunningProxy,
    handshake_failures,
    metric,
    served,
    serving,
    until,
)


def builtin_proxy(
    pki: PKI, upstream: int, **limits: Any
) -> contextlib.AbstractAsyncContextManager[RunningProxy]:
    """The proxy on the builtin TLS transport, TLS 1.3 only (the refusal alert is sent after
    the client's side of the handshake is complete)."""
    return serving(pki, upstream, tls={"transport": "builtin", "min_version": "1.3"}, **limits)


def proxy_sockets(port: int) -> int:
    """Descriptors of this process that are the proxy's side of a client connection."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") in inodes:
                n += 1
    return n


def failed(proxy: RunningProxy) -> float:
    """Handshake failures of the kinds a client without a certificate causes."""
    return sum(
        handshake_failures(proxy, r)
        for r in ("no_certificate", "tls_error", "bad_certificate", "verify_failed")
    )


async def refused_and_kept_open(proxy: RunningProxy, local: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS 1.3 client without a certificate: its side of the handshake completes, the proxy
    refuses it (alert certificate_required) and lingers; the client never reads nor closes.
    Returns once the proxy counted the failure."""
    before = failed(proxy)
    ctx = proxy.pki.client_context(None)

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", proxy.port), 10, (local, 0))
        return ctx.wrap_socket(raw, server_hostname="localhost")

    tls = await asyncio.to_thread(connect)
    await until(lambda: failed(proxy) == before + 1, "handshake refused")
    return tls


async def test_refused_sockets_count_against_max_handshakes_until_closed(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    max_handshakes, attempts = 4, 10
    async with builtin_proxy(
        pki,
        beanstalkd.port,
        max_handshakes=max_handshakes,
        max_handshakes_per_source=None,
        close_timeout=60,  # longer than the test: only the budget can close them
    ) as proxy:
        server = proxy.server
        held: list[ssl.SSLSocket] = []
        try:
            for i in range(attempts):
                held.append(await refused_and_kept_open(proxy))
                counted = min(i + 1, max_handshakes)
                # the proxy's side of every lingering socket is counted, and no more are open
                await until(lambda n=counted: proxy_sockets(proxy.port) == n, "fds == counted")
                assert server.handshaking == counted
                assert metric(proxy, "beanstalk_proxy_handshakes_pending") == counted
            # a legitimate client is served: its handshake takes the oldest one's place
            assert await served(proxy)
            await until(lambda: server.client_sockets == 0, "served client gone")
            assert server.handshaking == max_handshakes - 1
            for tls in held:
                tls.close()  # the proxy, lingering, reads the FIN and closes at once
            await until(lambda: server.handshaking == 0, "lingering sockets released")
            await until(lambda: proxy_sockets(proxy.port) == 0, "fds released")
            assert metric(proxy, "beanstalk_proxy_handshakes_pending") == 0
        finally:
            for tls in held:
                tls.close()


async def test_a_refused_socket_is_closed_after_close_timeout(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """The client never closes: the proxy aborts its side after ``close_timeout`` (the linger's
    deadline used to be cancelled with the failed handshake, leaving the socket open for as
    long as the client kept it)."""
    async with builtin_proxy(pki, beanstalkd.port, close_timeout=0.2) as proxy:
        tls = await refused_and_kept_open(proxy)
        try:
            await until(lambda: proxy_sockets(proxy.port) == 0, "proxy side closed")
            assert proxy.server.handshaking == 0
            assert tls.fileno() >= 0  # the client still holds its end
        finally:
            tls.close()


async def test_refused_sockets_count_for_their_source_until_closed(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    per_source = 3
    async with builtin_proxy(
        pki, beanstalkd.port, max_handshakes_per_source=per_source, close_timeout=60
    ) as proxy:
        held = [await refused_and_kept_open(proxy) for _ in range(per_source)]
        try:
            assert proxy.server.handshaking == per_source
            assert not await served(proxy)  # that address is at its cap until they close
            assert (
                metric(
                    proxy,
                    "beanstalk_proxy_handshake_failures_total",
                    {"reason": "max_handshakes_per_source"},
                )
                == 1
            )
            assert await served(proxy, local="127.0.0.2")  # another address is not
            for tls in held:
                tls.close()
            await until(lambda: proxy.server.handshaking == 0, "released")
            assert await served(proxy)
        finally:
            for tls in held:
                tls.close()

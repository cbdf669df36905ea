"""``serve --workers 2``, run through the real CLI: ``limits.max_handshakes_per_source`` holds
for the whole proxy. Sockets from one address that never send a ClientHello are accepted by
whichever worker the kernel picks; beyond the cap they are refused at accept, wherever they
land, while another address is still served, and the address gets in again once its sockets
are gone. A refused handshake's socket that lingers after its alert counts for its address
across the workers too."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable
from pathlib import Path

from conftest import PKI, Beanstalkd, served_at, until
from test_metrics import scrape, value
from test_workers import _Proxy, _start

CAP = 3
#: Silent sockets from one address. Were the cap per worker, the proxy would hold
#: CAP + min(CAP, k) of them pending, k being how many the kernel gave the worker that did not
#: get the first one: more than CAP unless all SILENT landed on one worker (2 ** (1 - SILENT)).
SILENT = 24
#: The proxy's limits: the per-source cap well under the whole proxy's, and handshakes that
#: do not time out while a test runs.
LIMITS = {"max_handshakes_per_source": CAP, "max_handshakes": 64, "handshake_timeout": 60}


async def _sample(proxy: _Proxy, name: str, **labels: str) -> float:
    return value(await scrape(proxy.metrics_port), name, **labels)


async def _per_source_refusals(proxy: _Proxy) -> float:
    return await _sample(
        proxy, "beanstalk_proxy_handshake_failures_total", reason="max_handshakes_per_source"
    )


async def _sees_eof(sock: socket.socket) -> bool:
    try:
        async with asyncio.timeout(10):
            return await asyncio.get_running_loop().sock_recv(sock, 1024) == b""
    except ConnectionError:
        return True


async def test_one_sources_pending_handshakes_stop_at_the_cap_across_workers(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    proxy = await _start(tmp_path, pki, beanstalkd, **LIMITS)
    socks: list[socket.socket] = []
    try:
        accepted = "beanstalk_proxy_connections_total"
        for i in range(SILENT):  # each accepted (by either worker) before the next
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.setblocking(False)
            socks.append(sock)
            await until(
                lambda: _is(_sample(proxy, accepted), len(socks)), f"silent socket {i} accepted"
            )
        samples = await scrape(proxy.metrics_port)
        assert value(samples, "beanstalk_proxy_handshakes_pending") == CAP
        reason = "max_handshakes_per_source"
        failures = "beanstalk_proxy_handshake_failures_total"
        assert value(samples, failures, reason=reason) == SILENT - CAP
        assert value(samples, failures, reason="dropped") == 0
        for sock in socks[CAP:]:  # refused at accept: closed at once
            assert await _sees_eof(sock)

        # Another address is served; this one is refused, by whichever worker accepts it.
        assert await served_at(pki, proxy.port, local="127.0.0.2")
        for _ in range(4):
            assert not await served_at(pki, proxy.port, local="127.0.0.1")
        assert await _per_source_refusals(proxy) == SILENT - CAP + 4

        # Its sockets gone, the address is served again (each worker released its own).
        for sock in socks:
            sock.close()
        await until(
            lambda: _is(_sample(proxy, "beanstalk_proxy_handshakes_pending"), 0),
            "silent handshakes closed",
        )
        deadline = time.monotonic() + 20
        while not await served_at(pki, proxy.port, local="127.0.0.1"):
            assert time.monotonic() < deadline, "the address was never served again"
            await asyncio.sleep(0.05)
        # CAP at once again, across the workers (the served connections closed).
        await until(
            lambda: _is(_sample(proxy, "beanstalk_proxy_client_sockets"), 0), "clients closed"
        )
        before = await _per_source_refusals(proxy)
        socks = []
        for _ in range(2 * CAP):
            socks.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        await until(
            lambda: _is(_per_source_refusals(proxy), before + CAP), "refused beyond the cap"
        )
        assert await _sample(proxy, "beanstalk_proxy_handshakes_pending") == CAP
    finally:
        for sock in socks:
            sock.close()
        proxy.stop()


async def _refused_without_certificate(proxy: _Proxy, pki: PKI) -> ssl.SSLSocket:
    """A TLS 1.3 client without a certificate that never reads nor closes: the proxy refuses
    it with an alert and keeps its socket open (up to close_timeout). Returns once counted."""
    failures = "beanstalk_proxy_handshake_failures_total"
    before = await _sample(proxy, failures, reason="no_certificate")
    ctx = pki.client_context(None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", proxy.port), 10)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    tls = await asyncio.to_thread(connect)
    await until(
        lambda: _is(_sample(proxy, failures, reason="no_certificate"), before + 1),
        "handshake refused",
    )
    return tls


async def test_refused_sockets_still_open_count_for_their_source_across_workers(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    proxy = await _start(tmp_path, pki, beanstalkd, **LIMITS, close_timeout=60)
    held: list[socket.socket] = []
    try:
        for _ in range(CAP):
            held.append(await _refused_without_certificate(proxy, pki))
        assert await _sample(proxy, "beanstalk_proxy_handshakes_pending") == CAP
        # Whichever worker accepts a new socket from that address refuses it at once.
        before = await _per_source_refusals(proxy)
        for _ in range(8):
            held.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        await until(lambda: _is(_per_source_refusals(proxy), before + 8), "refused at accept")
        assert await served_at(pki, proxy.port, local="127.0.0.2")
        # The refused sockets close: the address is served again.
        for sock in held:
            sock.close()
        await until(
            lambda: _is(_sample(proxy, "beanstalk_proxy_handshakes_pending"), 0),
            "refused sockets closed",
        )
        assert await served_at(pki, proxy.port, local="127.0.0.1")
    finally:
        for sock in held:
            sock.close()
        proxy.stop()


async def _is(sample: Awaitable[float], expected: float) -> bool:
    return await sample == expected

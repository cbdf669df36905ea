"""Connections the proxy must refuse before any upstream connection exists.

Each case: the TLS handshake (or the client's first read) fails, beanstalkd's
``total-connections`` shows that no upstream connection was opened, and the proxy logged a
line on ``beanstalk_proxy.conn`` naming the reason. More cases (certificate validity,
revocation, EKU, a thousand idle sockets) are in ``test_cert_rejections.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import (
    PKI,
    Beanstalkd,
    LogWatch,
    NothingUpstream,
    RunningProxy,
    handshake_failures,
    server_stats,
    serving,
    tls_attempt,
    until,
)


async def raw_attempt(port: int, data: bytes) -> bytes:
    """Plain TCP: send ``data`` (maybe nothing) and return everything until EOF."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if data:
                writer.write(data)
            out = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(4096):
                    out += chunk
            return out
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def short_proxy(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[RunningProxy]:
    async with serving(pki, beanstalkd.port, handshake_timeout=0.5) as running:
        yield running


#: With TLS 1.3 the client finishes its handshake before the server has checked its
#: certificate, so the refusal shows on the first read; with TLS 1.2 the handshake itself fails.
VERSIONS = pytest.mark.parametrize("version", ["1.2", "1.3"])


def _context(
    pki: PKI, name: str | None, version: str, ca_dir: Path | None = None
) -> ssl.SSLContext:
    ctx = pki.client_context(name, ca_dir)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    return ctx


@VERSIONS
async def test_no_client_certificate(
    proxy: RunningProxy, beanstalkd: Beanstalkd, conn_log: LogWatch, version: str
) -> None:
    async with NothingUpstream(beanstalkd.port):
        how = await tls_attempt(proxy.port, _context(proxy.pki, None, version))
        line = await conn_log.wait_for(lambda m: "handshake failed" in m or "refused" in m)
    assert "certificate" in line.lower(), line
    assert proxy.server.connections == set()
    if version == "1.2":
        assert how.startswith("handshake failed"), how


@VERSIONS
async def test_certificate_from_another_ca(
    proxy: RunningProxy, beanstalkd: Beanstalkd, pki: PKI, conn_log: LogWatch, version: str
) -> None:
    # an "admin" certificate (the CN of a real principal) issued by an untrusted CA
    ctx = _context(pki, "admin", version, ca_dir=pki.other)
    async with NothingUpstream(beanstalkd.port):
        how = await tls_attempt(proxy.port, ctx)
        line = await conn_log.wait_for(lambda m: "handshake failed" in m)
    assert "certificate verify failed" in line or "CERTIFICATE_VERIFY_FAILED" in line, line
    assert proxy.server.connections == set()
    if version == "1.2":
        assert how.startswith("handshake failed"), how


@VERSIONS
async def test_valid_certificate_without_principal(
    proxy: RunningProxy, beanstalkd: Beanstalkd, conn_log: LogWatch, version: str
) -> None:
    async with NothingUpstream(beanstalkd.port):
        how = await tls_attempt(proxy.port, _context(proxy.pki, "stranger", version))
        line = await conn_log.wait_for(lambda m: m.startswith("refused"))
    assert not how.startswith("handshake failed"), how  # the certificate itself is fine...
    assert "no principal matches" in line and "CN=stranger" in line, line  # ...the ACL is not


async def test_plain_tcp_to_the_tls_port(
    proxy: RunningProxy, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    async with NothingUpstream(beanstalkd.port):
        data = await raw_attempt(proxy.port, b"stats\r\nlist-tube-used\r\n")
        line = await conn_log.wait_for(lambda m: "handshake failed" in m)
    # at most a TLS alert record (content type 21), never a beanstalkd reply
    assert data == b"" or data[0] == 0x15, data[:40]
    assert b"OK" not in data and b"USING" not in data
    assert "tls error" in line, line


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
async def test_old_tls_version_client(
    proxy: RunningProxy, beanstalkd: Beanstalkd, conn_log: LogWatch, version: ssl.TLSVersion
) -> None:
    ctx = proxy.pki.client_context("admin")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = version
    # OpenSSL 3 offers TLS 1.0 and 1.1 only at security level 0. Where even that is impossible
    # (a build without them), the client cannot offer the version at all and fails locally:
    # the handshake must still fail and nothing may reach beanstalkd, which is what is asserted
    # below; only the logged reason is then a generic one.
    offered = True
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        offered = False
    async with NothingUpstream(beanstalkd.port):
        how = await tls_attempt(proxy.port, ctx)
        line = await conn_log.wait_for(lambda m: "handshake failed" in m)
    assert how.startswith("handshake failed"), how
    assert proxy.server.connections == set()
    assert "reason=" in line
    if offered:
        # the server saw an old ClientHello and refused it for its version
        assert "UNSUPPORTED_PROTOCOL" in line or "version" in line.lower(), line


async def test_silent_client_is_cut_after_handshake_timeout(
    short_proxy: RunningProxy, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    async with NothingUpstream(beanstalkd.port):
        started = time.monotonic()
        data = await raw_attempt(short_proxy.port, b"")  # connects, never sends a ClientHello
        elapsed = time.monotonic() - started
        line = await conn_log.wait_for(lambda m: "handshake failed" in m)
    assert data == b""
    assert 0.4 <= elapsed < 5, elapsed
    assert 'reason=timeout error="tls handshake timed out' in line, line
    assert short_proxy.server.handshaking == 0
    assert handshake_failures(short_proxy, "timeout") == 1
    assert short_proxy.server.connections == set()


async def test_slow_partial_client_hello_is_cut_too(
    short_proxy: RunningProxy, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    """A client that starts a TLS record and stalls is cut by the same timeout."""
    async with NothingUpstream(beanstalkd.port):
        data = await raw_attempt(short_proxy.port, b"\x16\x03\x01\x02\x00\x01")
        await conn_log.wait_for(lambda m: "handshake failed" in m)
    assert data == b"" or data[0] == 0x15


async def test_max_connections_refuses_the_extra_connection(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    async with serving(pki, beanstalkd.port, max_connections=1) as running:
        first = await running.connect("admin")
        assert await first.line(b"list-tube-used") == b"USING default"
        base = int((await server_stats(beanstalkd.port))["total-connections"])

        how = await tls_attempt(running.port, pki.client_context("admin"))
        line = await conn_log.wait_for(lambda m: "max_connections" in m)
        assert "refused" in line, line
        assert how.startswith("handshake failed"), how  # cut at accept, before TLS
        # the first connection is unaffected, and no upstream was opened for the second
        assert await first.line(b"list-tube-used") == b"USING default"
        st = await server_stats(beanstalkd.port)
        assert int(st["total-connections"]) == base + 1
        assert st["current-connections"] == "2"  # first's upstream and this probe

        # the slot is free again once the first client has gone
        await first.send(b"quit\r\n")
        assert await first.closed() == b""
        await first.close()
        again = await running.connect("admin")
        assert await again.line(b"list-tube-used") == b"USING default"
        await again.close()


async def test_a_silent_handshake_is_dropped_for_a_newer_one(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    """Handshakes in progress have their own budget (max_handshakes, here 1 because
    max_connections is 1), and when it is full the oldest is dropped: a silent socket cannot
    keep a real client out."""
    async with serving(pki, beanstalkd.port, max_connections=1, handshake_timeout=30) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)  # silent
        try:
            # bounded polling: no event for an accept
            await until(lambda: running.server.handshaking >= 1, "silent socket accepted", 5)
            c = await running.connect("admin")
            assert await c.line(b"list-tube-used") == b"USING default"
            await conn_log.wait_for(lambda m: "reason=dropped" in m)
            # the silent one was closed, long before its handshake timeout
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            assert await c.line(b"list-tube-used") == b"USING default"
            await c.close()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

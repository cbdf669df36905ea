"""The rest of the rejection matrix (issue 4), against a running proxy and a real beanstalkd.

``test_tls_rejections.py`` covers no certificate, an untrusted CA, a valid certificate without
a principal, plain TCP, TLS 1.0 and 1.1, one silent client and ``max_connections``. Here:
expired, not yet valid, revoked by a CRL, serverAuth-only EKU, no EKU, and a thousand idle
sockets at once.

Every certificate here carries ``CN=admin``, the CN of a principal that is allowed everything,
so a refusal can only come from the certificate check itself. Each case: the handshake (or,
with TLS 1.3, the client's first read) fails, beanstalkd's ``total-connections`` shows that no
upstream connection was opened, and ``beanstalk_proxy.conn`` logged a line naming the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import resource
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    PKI,
    Beanstalkd,
    LogWatch,
    NothingUpstream,
    RunningProxy,
    closing_sockets,
    handshake_failures,
    serving,
    tls_attempt,
    until,
)
from cryptography.x509 import ObjectIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID
from pki_helpers import make_client_cert, utcnow

from proxy.certs import revoke

CLIENT_AUTH = [ExtendedKeyUsageOID.CLIENT_AUTH]


def client_ctx(pki: PKI, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(cert, key)
    return ctx


async def assert_refused(
    running: RunningProxy,
    beanstalkd: Beanstalkd,
    conn_log: LogWatch,
    ctx: ssl.SSLContext,
    reason: str,
) -> str:
    """The matrix check: refused, nothing upstream, a log line naming ``reason``."""
    async with NothingUpstream(beanstalkd.port):
        how = await tls_attempt(running.port, ctx)
        line = await conn_log.wait_for(lambda m: m.startswith(("handshake failed", "refused")))
    # ``how`` is "handshake failed" (TLS 1.2) or, with TLS 1.3 where the client's handshake ends
    # before the server checked its certificate, a failed or empty first read; tls_attempt
    # already failed the test if any reply came back
    assert how, how
    assert reason in line, line
    assert running.server.connections == set()
    assert running.server.handshaking == 0
    return line


# --- certificate validity -------------------------------------------------------------------


DAY = dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "eku", "reason"),
    [
        pytest.param(-30 * DAY, -DAY, CLIENT_AUTH, "certificate has expired", id="expired"),
        pytest.param(DAY, 30 * DAY, CLIENT_AUTH, "certificate is not yet valid", id="future"),
        pytest.param(
            None, None, [ExtendedKeyUsageOID.SERVER_AUTH], "certificate purpose", id="server-only"
        ),
    ],
)
async def test_certificate_refused_by_openssl_verification(
    proxy: RunningProxy,
    beanstalkd: Beanstalkd,
    pki: PKI,
    conn_log: LogWatch,
    tmp_path: Path,
    valid_from: dt.timedelta | None,
    valid_to: dt.timedelta | None,
    eku: list[ObjectIdentifier],
    reason: str,
) -> None:
    """Expired, not yet valid, serverAuth-only EKU (relative to now; None: the default
    validity, five minutes ago .. thirty days ahead)."""
    now = utcnow()
    cert, key = make_client_cert(
        pki.dir,
        tmp_path,
        "refused",
        cn="admin",
        not_before=None if valid_from is None else now + valid_from,
        not_after=None if valid_to is None else now + valid_to,
        eku=eku,
    )
    line = await assert_refused(proxy, beanstalkd, conn_log, client_ctx(pki, cert, key), reason)
    assert "certificate verify failed" in line


async def test_certificate_without_eku_is_refused(
    proxy: RunningProxy, beanstalkd: Beanstalkd, pki: PKI, conn_log: LogWatch, tmp_path: Path
) -> None:
    """OpenSSL's purpose check lets a certificate without any EKU through; the proxy then
    refuses it (tls.require_client_auth_eku, on by default). The opt-out for legacy CAs is
    tested in test_identity_exact.py."""
    cert, key = make_client_cert(pki.dir, tmp_path, "no-eku", cn="admin", eku=None)
    await assert_refused(
        proxy, beanstalkd, conn_log, client_ctx(pki, cert, key), "no clientAuth extended key usage"
    )


# --- revocation -------------------------------------------------------------------------------


async def test_revoked_client_certificate(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    shutil.copytree(pki.dir, ca)  # revoke() rewrites crl.pem: never touch the shared PKI
    assert revoke(ca, ca / "admin.pem") is True
    async with serving(pki, beanstalkd.port, tls={"crl": (str(ca / "crl.pem"),)}) as running:
        line = await assert_refused(
            running, beanstalkd, conn_log, pki.client_context("admin"), "certificate revoked"
        )
        assert "certificate verify failed" in line
        # control: the same proxy, CRL and all, still admits a certificate that is not listed
        c = await running.connect("inspector")
        assert await c.line(b"list-tube-used") == b"USING default"
        await c.close()


# --- a thousand idle sockets -------------------------------------------------------------------

IDLE = 1000


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 128


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """Each idle socket costs two descriptors in this process (client end and accepted end)."""
    need = 2 * IDLE + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} descriptors needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_thousand_idle_sockets_do_not_lock_out_a_real_client(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, enough_fds: None
) -> None:
    # All from 127.0.0.1: no per-source cap, and a handshake budget they all fit in (the
    # budget when they do not, and the per-source cap, are in test_hostile_connections.py).
    async with (
        serving(
            pki,
            beanstalkd.port,
            max_connections=IDLE + 10,
            max_handshakes=IDLE + 10,
            max_handshakes_per_source=None,
            handshake_timeout=1.0,
        ) as running,
        closing_sockets() as idle,
    ):
        server = running.server
        async with NothingUpstream(beanstalkd.port, allowed=2):  # the two real clients only
            # Plain blocking connects: the kernel completes each one into the listen backlog
            # without the event loop, so the proxy meets them in bursts. Batches stay within
            # the kernel's cap on the backlog (net.core.somaxconn: 4096, 128 on old kernels);
            # between batches the loop runs until the proxy has taken them in (no event for
            # that: bounded polling of the server's counter).
            batch = max(16, min(IDLE, _somaxconn()) // 2)
            deadline = time.monotonic() + 10
            while len(idle) < IDLE:
                for _ in range(min(batch, IDLE - len(idle))):
                    idle.append(socket.create_connection(("127.0.0.1", running.port), timeout=5))
                while server.handshaking < len(idle):
                    assert time.monotonic() < deadline, f"{server.handshaking} of {len(idle)}"
                    await asyncio.sleep(0.005)
            # all the idle sockets hold a handshake slot at the same time
            assert server.handshaking == IDLE

            # a legitimate client gets in and is served while all those slots are taken
            c = await running.connect("admin")
            still_idle = server.handshaking
            assert await c.line(b"list-tube-used") == b"USING default"
            assert still_idle > 0, "the idle sockets were gone before the real client came"

            # the idle ones are cut by the 1 s handshake timeout, each counted with its reason;
            # the log has the first lines of the burst and a summary of the rest
            def timed_out(m: str) -> bool:
                return "handshake failed" in m and ("timed out" in m or "taking longer" in m)

            await conn_log.wait_for(timed_out, timeout=20)
            await until(lambda: handshake_failures(running, "timeout") >= IDLE, "timeouts", 20)
            assert handshake_failures(running, "timeout") == IDLE
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(10):
                for sock in idle[:: IDLE // 20]:  # a sample of 20 sees EOF
                    sock.setblocking(False)
                    with contextlib.suppress(ConnectionError):
                        assert await loop.sock_recv(sock, 1024) == b""
            assert server.handshaking == 0
            assert len(server.connections) == 1  # only the legitimate client

            # the real client was never disturbed, and the freed slots take new clients
            assert await c.line(b"list-tube-used") == b"USING default"
            c2 = await running.connect("inspector")
            assert await c2.line(b"list-tube-used") == b"USING default"
            await c2.close()
            await c.close()
            await conn_log.wait_count(lambda m: m.startswith("close"), 2)
    lines = [m for m in conn_log.messages if timed_out(m)]
    assert 0 < len(lines) <= 10, len(lines)
    summary = [m for m in conn_log.messages if m.startswith("suppressed")]
    assert summary and "source=127.0.0.1" in summary[0] and '{"timeout":' in summary[0], summary

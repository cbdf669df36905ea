"""Hostile clients against the connection limits (issue 9, items 1, 2 and 6), with a real
beanstalkd and real TLS: clients that never answer the proxy's TLS close (through the relay and
through the no-principal refusal), plain TCP sockets that never send a ClientHello (more than
the handshake budget, and from one source address), and CA-signed certificates that
``cryptography`` cannot read. Each case asserts bounds (file descriptors of this process, which
runs the proxy; counters and gauges) and who is served, never timings.

The TLS attacker runs in a child process so that its own sockets, which it keeps open, do not
count in ``/proc/self/fd`` here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    PKI,
    Beanstalkd,
    LogWatch,
    RunningProxy,
    closing_sockets,
    handshake_failures,
    metric,
    served,
    server_stats,
    serving,
    start_proxy,
    tls_attempt,
    until,
)
from pki_helpers import make_client_cert, utcnow

#: Descriptors the in-process proxy may hold beyond its limits in these tests (sockets of
#: dropped handshakes not yet reaped, a connection refused at accept) plus measurement noise.
SLACK = 8

ATTACKER = r"""
import socket, ssl, sys
port, ca, cert, key, cycles, command = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
held, closed_by_proxy, refused = [], 0, 0
print("ready", flush=True)
sys.stdin.readline()
while closed_by_proxy < int(cycles) and refused < 20000:  # refused tries do not count
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        if command:
            tls.sendall(command.encode() + b"\r\n")
        while tls.recv(4096):  # until the proxy's close_notify
            pass
    except (OSError, ssl.SSLError):
        refused += 1
        raw.close()
        continue
    closed_by_proxy += 1
    held.append(tls)  # never unwrapped: the proxy's close_notify is never answered
print("done", closed_by_proxy, refused, flush=True)
sys.stdin.readline()  # keep every socket open until told to exit
"""


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def accepts(proxy: RunningProxy) -> float:
    return metric(proxy, "beanstalk_proxy_connections_total")


async def served_eventually(proxy: RunningProxy, name: str, timeout: float = 20.0) -> None:
    """A legitimate client gets in once a slot frees (each try either is served or refused)."""
    deadline = time.monotonic() + timeout
    while not await served(proxy, name):
        assert time.monotonic() < deadline, f"{name} was never served"
        await asyncio.sleep(0.05)


async def all_released(proxy: RunningProxy, baseline: int) -> None:
    """(f) Every count and gauge is back to zero and the descriptors to the baseline."""
    server = proxy.server
    await until(lambda: server.client_sockets == 0 and server.handshaking == 0, "sockets released")
    assert not server.connections
    assert not server._per_principal
    assert metric(proxy, "beanstalk_proxy_client_sockets") == 0
    assert metric(proxy, "beanstalk_proxy_handshakes_pending") == 0
    assert metric(proxy, "beanstalk_proxy_connections_open") == 0
    await until(lambda: fds() <= baseline, f"fds {fds()} back to {baseline}")


async def warm_baseline(proxy: RunningProxy) -> int:
    """The descriptor count after one served client (uvloop opens /dev/null once, lazily)."""
    assert await served(proxy, "admin")
    await until(lambda: proxy.server.client_sockets == 0, "warm-up client gone")
    return fds()


def raw_connect(port: int, local: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(local, 0))
    sock.setblocking(False)
    return sock


async def connect_silently(proxy: RunningProxy, socks: list[socket.socket], n: int) -> None:
    """Open ``n`` sockets that never start a handshake, each accepted by the proxy before the
    next; appended to ``socks`` (the caller closes them)."""
    before = accepts(proxy) - len(socks)
    for i in range(n):
        socks.append(raw_connect(proxy.port))
        await until(lambda: accepts(proxy) == before + len(socks), f"accept {i}")


async def sees_eof(sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            return await loop.sock_recv(sock, 1024) == b""
    except ConnectionError:
        return True


def still_open(sock: socket.socket) -> bool:
    try:
        sock.recv(1024)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# --------------------------------------------------------------------------------------------
# (a), (b), (f): clients that never answer the TLS close


@pytest.mark.parametrize(
    ("name", "command", "refusal"),
    [("admin", "quit", None), ("stranger", "", "no_principal")],
    ids=["relayed-quit", "no-principal-refusal"],
)
async def test_clients_that_never_answer_the_close_cannot_exhaust_descriptors(
    pki: PKI,
    beanstalkd: Beanstalkd,
    name: str,
    command: str,
    refusal: str | None,
) -> None:
    max_connections, max_handshakes, cycles = 10, 4, 60
    proxy = await start_proxy(
        pki,
        beanstalkd.port,
        max_connections=max_connections,
        max_handshakes=max_handshakes,
        close_timeout=0.25,
    )
    cert, key = pki.cert(name)
    attacker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ATTACKER,
        str(proxy.port),
        pki.ca,
        cert,
        key,
        str(cycles),
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert attacker.stdin is not None and attacker.stdout is not None
    stop = asyncio.Event()
    peak = [0]

    async def watch_fds() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], fds())
            await asyncio.sleep(0.002)

    watcher: asyncio.Task[None] | None = None
    try:
        assert (await attacker.stdout.readline()).strip() == b"ready"
        baseline = await warm_baseline(proxy)
        watcher = asyncio.get_running_loop().create_task(watch_fds())
        attacker.stdin.write(b"go\n")
        async with asyncio.timeout(120):
            done = (await attacker.stdout.readline()).split()
        peak[0] = max(peak[0], fds())  # the attacker still holds every socket it got
        assert done[0] == b"done", done
        # it went well past the limit: 60 connections served and closed by the proxy
        assert int(done[1]) == cycles, done
        bound = 2 * max_connections + max_handshakes + SLACK
        assert peak[0] - baseline <= bound, f"{peak[0] - baseline} fds held, bound {bound}"
        assert proxy.server.client_sockets <= max_connections
        if refusal is not None:
            assert handshake_failures(proxy, refusal) == cycles

        # a legitimate client is served while the attacker still holds its sockets
        await served_eventually(proxy, "inspector")

        attacker.stdin.write(b"exit\n")
        async with asyncio.timeout(30):
            await attacker.wait()
        await all_released(proxy, baseline)
    finally:
        stop.set()
        if watcher is not None:
            await watcher
        if attacker.returncode is None:
            attacker.kill()
            await attacker.wait()
        await proxy.server.close()


# --------------------------------------------------------------------------------------------
# (c) sockets that never send a ClientHello: the oldest pending handshake is dropped


async def test_silent_sockets_beyond_max_handshakes_drop_the_oldest(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    max_handshakes, silent = 5, 15
    async with (
        serving(
            pki,
            beanstalkd.port,
            max_connections=10,
            max_handshakes=max_handshakes,
            max_handshakes_per_source=None,
            handshake_timeout=60,
        ) as proxy,
        closing_sockets() as socks,
    ):
        server = proxy.server
        baseline = await warm_baseline(proxy)
        await connect_silently(proxy, socks, silent)
        assert server.handshaking == max_handshakes
        assert metric(proxy, "beanstalk_proxy_handshakes_pending") == max_handshakes
        dropped = silent - max_handshakes
        assert handshake_failures(proxy, "dropped") == dropped
        for sock in socks[:dropped]:  # the oldest were closed ...
            assert await sees_eof(sock)
        assert all(still_open(sock) for sock in socks[dropped:])  # ... the newest were not
        assert fds() - baseline <= len(socks) + max_handshakes + SLACK

        # a legitimate client is served: its handshake displaces the oldest silent one
        assert await served(proxy, "admin")
        assert handshake_failures(proxy, "dropped") == dropped + 1
        assert await sees_eof(socks[dropped])
        assert len([m for m in conn_log.messages if "reason=dropped" in m]) == 10  # then summed
        for sock in socks:
            sock.close()
        await all_released(proxy, baseline)
    summary = [m for m in conn_log.messages if m.startswith("suppressed")]
    assert len(summary) == 1 and '"dropped":1' in summary[0], summary


# --------------------------------------------------------------------------------------------
# (d) the per-source cap


async def test_pending_handshakes_are_capped_per_source_address(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    cap, silent = 3, 5
    async with (
        serving(
            pki,
            beanstalkd.port,
            max_connections=10,
            max_handshakes=10,
            max_handshakes_per_source=cap,
            handshake_timeout=60,
        ) as proxy,
        closing_sockets() as socks,
    ):
        server = proxy.server
        baseline = await warm_baseline(proxy)
        await connect_silently(proxy, socks, silent)
        assert server.handshaking == cap
        assert handshake_failures(proxy, "max_handshakes_per_source") == silent - cap
        for sock in socks[cap:]:  # refused at once
            assert await sees_eof(sock)
        assert all(still_open(sock) for sock in socks[:cap])
        refusals = [m for m in conn_log.messages if m.startswith("refused")]
        assert len(refusals) == silent - cap
        assert all(
            "reason=max_handshakes_per_source limit=limits.max_handshakes_per_source max=3" in m
            for m in refusals
        )

        # another source address is served; the capped one is not, until its sockets go
        assert await served(proxy, "admin", local="127.0.0.2")
        assert not await served(proxy, "admin", local="127.0.0.1")
        assert handshake_failures(proxy, "max_handshakes_per_source") == silent - cap + 1
        for sock in socks:
            sock.close()
        await until(lambda: server.handshaking == 0, "silent handshakes failed")
        assert await served(proxy, "admin", local="127.0.0.1")
        await all_released(proxy, baseline)


# --------------------------------------------------------------------------------------------
# (e) certificates OpenSSL verifies but cryptography cannot read

UNREADABLE_SANS = {
    # SEQUENCE { [7] iPAddress of 5 bytes }
    "ip-5-bytes": bytes.fromhex("3007870501020304 05".replace(" ", "")),
    # SEQUENCE { [6] uniformResourceIdentifier "\xff\xfe" } (invalid UTF-8, not IA5)
    "uri-invalid-utf8": bytes.fromhex("30048602fffe"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_SANS))
async def test_an_unreadable_certificate_is_refused_counted_and_closed(
    pki: PKI,
    beanstalkd: Beanstalkd,
    conn_log: LogWatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    case: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    now = utcnow()
    cert, key = make_client_cert(
        pki.dir,
        tmp_path,
        case,
        cn="admin",  # would be the admin principal if it could be read
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
        san_der=UNREADABLE_SANS[case],
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(cert, key)
    async with serving(pki, beanstalkd.port) as proxy:
        baseline = await warm_baseline(proxy)
        upstream_before = int((await server_stats(beanstalkd.port))["total-connections"])
        for _ in range(3):
            # the refused client gets nothing (tls_attempt fails the test if it does), and the
            # connection is closed rather than left hanging (tls_attempt times out then)
            await tls_attempt(proxy.port, ctx, b"list-tube-used\r\n")
        lines = await conn_log.wait_count(lambda m: "reason=unparseable_certificate" in m, 3)
        # refused after the handshake (the relay reads the certificate), or the handshake
        # failed (the SSL transport could not decode the certificate it verified)
        assert all(
            m.startswith(("refused event=refused peer=", "handshake failed event=handshake_failed"))
            for m in lines
        )
        assert handshake_failures(proxy, "unparseable_certificate") == 3
        assert handshake_failures(proxy, "verify_failed") == 0  # OpenSSL accepted the certificate
        # no upstream connection was opened (the one more is the stats connection itself)
        stats = await server_stats(beanstalkd.port)
        assert int(stats["total-connections"]) == upstream_before + 1
        await all_released(proxy, baseline)
        assert await served(proxy, "admin")
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    assert "never retrieved" not in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

"""Upstream faults with a real beanstalkd: down at connect time, killed mid-session, killed and
restarted under load. Clients always get a closed connection (never a hang), the log and the
metrics say why, and new connections work again once beanstalkd is back, with no restart of
the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from conftest import PKI, Beanstalkd, Client, RunningProxy, direct, serving, start_proxy, until

from proxy.logs import render_text

GENERAL = "beanstalk_proxy"
DISCONNECTED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError)


def sample(proxy: RunningProxy, name: str) -> float:
    return proxy.server.metrics.registry.get_sample_value(name) or 0.0


def messages(caplog: pytest.LogCaptureFixture, needle: str, logger: str = GENERAL) -> list[str]:
    """The ``logger``'s lines (message and fields, as in the text log) containing ``needle``."""
    lines = [render_text(r) for r in caplog.records if r.name == logger]
    return [line for line in lines if needle in line]


async def test_beanstalkd_down_at_connect_time(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GENERAL)
    async with serving(pki, beanstalkd.port) as proxy:
        await asyncio.to_thread(beanstalkd.stop)
        started = time.monotonic()
        c = await proxy.connect("admin")
        with contextlib.suppress(*DISCONNECTED):
            await c.send(b"put 0 0 60 1\r\nx\r\n")
        # Closed promptly, with no reply: the put was never acknowledged.
        assert await c.closed(timeout=5) == b""
        assert time.monotonic() - started < 2
        await c.close()
        lines = messages(caplog, "unreachable")
        assert len(lines) == 1, lines
        assert f"127.0.0.1:{beanstalkd.port}" in lines[0]
        assert any(r.levelno == logging.ERROR for r in caplog.records if r.name == GENERAL)
        # The connection's close line carries the reason too.
        assert messages(caplog, 'reason="upstream unreachable', logger="beanstalk_proxy.conn")
        assert sample(proxy, "beanstalk_proxy_upstream_connect_failures_total") == 1
        await until(lambda: not proxy.server.connections)

        # Back up: the same proxy serves new connections.
        await asyncio.to_thread(beanstalkd.restart)
        c = await proxy.connect("admin")
        assert (await c.put(b"ok")).startswith(b"INSERTED ")
        await c.close()
        assert sample(proxy, "beanstalk_proxy_upstream_connect_failures_total") == 1


@pytest.fixture
def hung_upstream(beanstalkd: Beanstalkd) -> Iterator[int]:
    """beanstalkd's port held by a socket that accepts nothing and whose accept queue is full
    (as with a hung beanstalkd): connects to it stay pending. Yields the port."""
    beanstalkd.stop()
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hog.bind(("127.0.0.1", beanstalkd.port))
    hog.listen(0)
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", beanstalkd.port))
            fillers.append(s)
        yield beanstalkd.port
    finally:
        for s in fillers:
            s.close()
        hog.close()


async def test_unresponsive_upstream_hits_the_connect_timeout(
    pki: PKI, hung_upstream: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GENERAL)
    async with serving(pki, hung_upstream, upstream_connect_timeout=0.5) as proxy:
        c = await proxy.connect("admin")
        started = time.monotonic()
        assert await c.closed(timeout=5) == b""
        assert 0.4 < time.monotonic() - started < 3
        await c.close()
        assert sample(proxy, "beanstalk_proxy_upstream_connect_failures_total") == 1
        assert len(messages(caplog, "unreachable")) == 1


async def test_connect_timeout_is_named_in_the_log(
    pki: PKI, hung_upstream: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GENERAL)
    async with serving(pki, hung_upstream, upstream_connect_timeout=0.3) as proxy:
        c = await proxy.connect("admin")
        assert await c.closed(timeout=5) == b""
        await c.close()
        (line,) = messages(caplog, "unreachable")
        assert "time" in line.rsplit(":", 1)[1], line  # "timeout" / "timed out"


async def test_readyz_names_a_timeout(hung_upstream: int) -> None:
    from proxy.config import Endpoint
    from proxy.httpd import check_upstream

    ready, reason = await check_upstream(Endpoint("127.0.0.1", hung_upstream, None), 0.3)
    assert not ready
    assert "time" in reason.rsplit(":", 1)[1], reason


async def test_beanstalkd_killed_mid_session(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GENERAL)
    async with serving(pki, beanstalkd.port) as proxy:
        idle = await proxy.connect("admin")
        assert (await idle.put(b"a")).startswith(b"INSERTED ")
        blocked = await proxy.connect("admin")
        assert await blocked.line(b"list-tube-used") == b"USING default"
        await blocked.send(b"reserve-with-timeout 60\r\n")  # waiting upstream

        beanstalkd.proc.kill()
        await asyncio.to_thread(beanstalkd.proc.wait, 10)

        # Both clients see their connection closed, promptly and without a reply.
        started = time.monotonic()
        assert await idle.closed(timeout=5) == b""
        assert await blocked.closed(timeout=5) == b""
        assert time.monotonic() - started < 2
        await idle.close()
        await blocked.close()
        await until(lambda: not proxy.server.connections)
        assert len(messages(caplog, "upstream connection ended")) == 2
        assert sample(proxy, "beanstalk_proxy_upstream_lost_total") == 2


async def test_beanstalkd_restarted_under_load(pki: PKI, beanstalkd: Beanstalkd) -> None:
    """Several clients put in a loop, reconnecting whenever their connection closes. beanstalkd
    is killed and restarted on the same port; the proxy keeps running, new connections reach
    the new beanstalkd, and every job acknowledged on them is there."""
    proxy = await start_proxy(pki, beanstalkd.port)
    loaders = 4
    killed = asyncio.Event()
    enough_before = asyncio.Event()
    stop = asyncio.Event()
    before: list[int] = []
    after: list[int] = []  # INSERTED ids on connections opened after the kill
    per_loader_after = [0] * loaders
    all_loaders_after = asyncio.Event()
    failures = 0

    async def loader(k: int) -> None:
        nonlocal failures
        while not stop.is_set():
            opened_after_kill = killed.is_set()
            c: Client | None = None
            try:
                c = await proxy.connect("admin")
                while not stop.is_set():
                    line = await c.put(b"job-%d" % k)
                    assert line.startswith(b"INSERTED "), line
                    job = int(line.split()[1])
                    if opened_after_kill:
                        after.append(job)
                        per_loader_after[k] += 1
                        if min(per_loader_after) >= 20:
                            all_loaders_after.set()
                    else:
                        before.append(job)
                        if len(before) >= 100:
                            enough_before.set()
            except DISCONNECTED:
                failures += 1
                await asyncio.sleep(0.02)  # retry back-off, not synchronisation
            finally:
                if c is not None:
                    with contextlib.suppress(*DISCONNECTED):
                        await c.close()

    tasks = [asyncio.create_task(loader(k)) for k in range(loaders)]
    try:
        async with asyncio.timeout(30):
            await enough_before.wait()
            beanstalkd.proc.kill()
            killed.set()
            await asyncio.to_thread(beanstalkd.restart)
            await all_loaders_after.wait()
        stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        assert failures >= loaders  # every loader lost its connection at least once
        assert sample(proxy, "beanstalk_proxy_upstream_lost_total") >= loaders
        # Every job acknowledged after the restart is in the new beanstalkd.
        d = await direct(beanstalkd.port)
        await d.send(b"".join(b"stats-job %d\r\n" % j for j in after))
        for j in after:
            line, body = await d.reply()
            assert line.startswith(b"OK "), (j, line)
            assert body is not None and b"\nid: %d\n" % j in body
        stats = await d.stats()
        assert int(stats["current-jobs-ready"]) == len(after)
        await d.close()
        # And a brand-new connection works through the same proxy.
        c = await proxy.connect("billing")
        assert await c.line(b"use invoices") == b"USING invoices"
        assert (await c.put(b"late")).startswith(b"INSERTED ")
        await c.close()
    finally:
        await proxy.server.close()


async def test_a_client_is_not_read_while_its_upstream_connection_is_pending(
    pki: PKI, hung_upstream: int
) -> None:
    """Commands sent before upstream is open wait in the client's socket, not in the proxy:
    a client pumping megabytes at a hung beanstalkd makes the proxy hold no more than what
    it read before it paused (bounded by one read per TLS record), until the connect
    times out."""
    async with serving(pki, hung_upstream, upstream_connect_timeout=30) as proxy:
        c = await proxy.connect("admin")
        await until(lambda: len(proxy.server.connections) == 1, "accepted")
        (conn,) = proxy.server.connections
        assert conn.upstream is None  # connecting
        c.writer.write(b"list-tube-used\r\n" * 2_000_000)  # 32 MB, more than socket buffers
        # the proxy stops reading: what it does not take stays in the client's buffers
        await until(lambda: not conn.reading, "paused")
        session = conn.session
        assert session is not None
        held = session.parser.buffered + len(session.to_upstream)
        assert held < 1024 * 1024, held
        assert conn.upstream is None
        c.writer.transport.abort()

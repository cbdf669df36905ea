"""Connection limits against a real beanstalkd and real TLS: per-principal and global
connection caps, idle timeout (never while a command is outstanding, such as a blocked
reserve) and maximum connection lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

import pytest
from conftest import PKI, Beanstalkd, Client, RunningProxy, handshake_failures, serving, until

from proxy.logs import render_text

CONN = "beanstalk_proxy.conn"


def conn_lines(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    """The connection log lines (message and fields, as in the text log) with every needle."""
    lines = [render_text(r) for r in caplog.records if r.name == CONN]
    return [line for line in lines if all(n in line for n in needles)]


async def refused(proxy: RunningProxy, name: str) -> bytes:
    """Connect as ``name`` and return what arrives before the proxy closes the connection
    (raising if a command gets an answer). A refusal before or during the handshake counts as
    closed with nothing received."""
    try:
        c = await proxy.connect(name)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return b""
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await c.send(b"list-tube-used\r\n")
    data = await c.closed(timeout=10)
    await c.close()
    return data


async def ready(proxy: RunningProxy, name: str) -> Client:
    """A connection that has completed one command (so the proxy has counted it)."""
    c = await proxy.connect(name)
    assert await c.line(b"list-tube-used") == b"USING default"
    return c


# --------------------------------------------------------------------------------------------
# connection caps


async def test_per_principal_limit_refuses_the_next_one_and_logs_it(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONN)
    async with serving(pki, beanstalkd.port, max_connections_per_principal=2) as proxy:
        a1 = await ready(proxy, "admin")
        a2 = await ready(proxy, "admin")
        assert await refused(proxy, "admin") == b""
        lines = conn_lines(caplog, "refused", "principal=admin", "max_connections_per_principal")
        assert len(lines) == 1, lines
        assert "max=2" in lines[0]
        assert handshake_failures(proxy, "max_connections_per_principal") == 1

        # Another principal is not affected by admin's cap.
        billing = await proxy.connect("billing")
        assert await billing.line(b"use invoices") == b"USING invoices"

        # The two admin connections still work.
        for c in (a1, a2):
            assert await c.line(b"list-tube-used") == b"USING default"

        # A slot freed by a closed connection can be used again.
        await a1.close()
        await until(lambda: len(proxy.server.connections) == 2)
        a3 = await ready(proxy, "admin")
        assert len(conn_lines(caplog, "refused", "principal=admin")) == 1
        for c in (a2, a3, billing):
            await c.close()


async def test_global_max_connections(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONN)
    async with serving(pki, beanstalkd.port, max_connections=2) as proxy:
        first = await ready(proxy, "admin")
        second = await ready(proxy, "billing")
        assert await refused(proxy, "inspector") == b""
        lines = conn_lines(caplog, "refused", "max_connections")
        assert len(lines) == 1 and "max=2" in lines[0], lines
        assert handshake_failures(proxy, "max_connections") == 1

        await second.close()
        await until(lambda: len(proxy.server.connections) == 1)
        third = await ready(proxy, "inspector")
        assert await first.line(b"list-tube-used") == b"USING default"
        await first.close()
        await third.close()


# --------------------------------------------------------------------------------------------
# idle timeout and lifetime


async def test_idle_timeout_closes_idle_but_not_a_blocked_reserve(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONN)
    idle = 0.3
    async with serving(pki, beanstalkd.port, idle_timeout=idle) as proxy:
        sleeper = await ready(proxy, "admin")
        worker = await ready(proxy, "admin")
        started = time.monotonic()
        await worker.send(b"reserve-with-timeout 2\r\n")

        # The idle connection is closed after about one idle period ...
        assert await sleeper.closed(timeout=5) == b""
        assert time.monotonic() - started >= idle * 0.9
        assert len(conn_lines(caplog, "event=close", 'reason="idle timeout"')) == 1

        # ... while the blocked reserve outlives several idle periods and gets beanstalkd's
        # own answer when its timeout expires (a drain would have ended it early).
        line, _ = await worker.reply(timeout=10)
        waited = time.monotonic() - started
        assert line == b"TIMED_OUT"
        assert waited >= 1.9, f"reserve ended after {waited:.2f}s: the connection was drained"
        assert len(conn_lines(caplog, "event=close", 'reason="idle timeout"')) == 1
        await worker.close()


async def test_idle_timeout_with_a_client_that_sends_nothing_at_all(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, idle_timeout=0.3) as proxy:
        c = await proxy.connect("admin")  # handshake only, no command
        assert await c.closed(timeout=5) == b""
        await c.close()


async def test_idle_time_counts_from_the_last_reply_not_the_last_request(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, idle_timeout=0.6) as proxy:
        producer = await ready(proxy, "admin")
        inserted = await producer.put(b"job", delay=1)  # becomes ready in 1s
        job_id = int(inserted.split()[1])
        worker = await ready(proxy, "admin")
        # Blocked longer than idle_timeout: allowed, a command is outstanding.
        line, body = await worker.call(b"reserve-with-timeout 5")
        assert (line, body) == (b"RESERVED %d 3" % job_id, b"job")
        # The worker processes the job for half the idle timeout (this sleep is the workload
        # being simulated, not synchronisation), then deletes it.
        await asyncio.sleep(0.3)
        await worker.send(b"delete %d\r\n" % job_id)
        line, _ = await worker.reply(timeout=5)
        assert line == b"DELETED"
        await worker.close()
        await producer.close()


async def test_max_connection_lifetime_closes_a_connection(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONN)
    lifetime = 0.5
    async with serving(pki, beanstalkd.port, max_connection_lifetime=lifetime) as proxy:
        started = time.monotonic()
        c = await proxy.connect("admin")
        # Keep it busy (never idle): lifetime applies regardless.
        put = await c.put(b"job")
        assert put.startswith(b"INSERTED ")
        assert await c.closed(timeout=5) == b""
        assert time.monotonic() - started >= lifetime * 0.9
        assert len(conn_lines(caplog, "event=close", "max connection lifetime")) == 1
        await c.close()
        # A new connection is fine (the limit is per connection, not per client).
        again = await ready(proxy, "admin")
        await again.close()


async def test_lifetime_lets_an_in_flight_reserve_answer(pki: PKI, beanstalkd: Beanstalkd) -> None:
    """A connection blocked in reserve when its lifetime ends gets an answer (beanstalkd's
    TIMED_OUT once the upstream side is half-closed), then the close; never a hang."""
    async with serving(pki, beanstalkd.port, max_connection_lifetime=0.5) as proxy:
        c = await proxy.connect("admin")
        started = time.monotonic()
        await c.send(b"reserve-with-timeout 30\r\n")
        data = await c.closed(timeout=10)
        assert data == b"TIMED_OUT\r\n"
        assert time.monotonic() - started < 5
        await c.close()

"""Issue 9, item 5: put bodies in flight are bounded proxy-wide (``limits.max_buffered_bytes``),
against a real beanstalkd and real TLS. Many clients uploading large puts at once through a
small bound all get their jobs in, intact; the reserved bytes never exceed the bound and
return to zero; a paused client is never failed; a client that closes mid-body and an upstream
that is lost mid-body give their bytes back; a bystander is served while uploads wait; a
refused put reserves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import pytest
from conftest import PKI, TEST_ACL, Beanstalkd, Client, RunningProxy, direct, run_on, until
from conftest import serving as proxy_serving

from proxy.acl import parse_acl

#: Job bodies of the big uploads, and the bound: three of them at once.
BODY = 200 * 1024
LIMIT = 3 * BODY
CLIENTS = 12
PUTS = 3
#: The most a TLS transport delivers in one ``data_received``: the builtin one a 64 KiB read;
#: the stock ones (asyncio's and uvloop's) all their incoming buffer (256 KiB high-water mark)
#: plus the read that crossed it (256 KiB).
READ_MAX = {"builtin": 64 * 1024, "stock": 512 * 1024}
EVERY_LOOP_AND_TRANSPORT = pytest.mark.parametrize(
    ("loop", "transport"),
    [("asyncio", "builtin"), ("uvloop", "builtin"), ("asyncio", "stock"), ("uvloop", "stock")],
)


@pytest.fixture
def big(beanstalkd: Beanstalkd) -> Beanstalkd:
    """The test beanstalkd, restarted to accept jobs of ``LIMIT`` bytes."""
    beanstalkd.max_job_size = LIMIT
    beanstalkd.restart()
    return beanstalkd


def serving(
    pki: PKI, upstream: int, transport: str = "builtin", **limits: Any
) -> contextlib.AbstractAsyncContextManager[RunningProxy]:
    """The proxy with jobs of up to ``LIMIT`` bytes, on the TLS ``transport``."""
    return proxy_serving(pki, upstream, tls={"transport": transport}, max_job_size=LIMIT, **limits)


def sample(proxy: RunningProxy, name: str) -> float:
    value = proxy.server.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def body(client: int, put: int, size: int = BODY) -> bytes:
    head = b"client %d put %d " % (client, put)
    return head + os.urandom((size - len(head)) // 2).hex().encode().ljust(size - len(head), b"x")


async def drain_jobs(port: int, tube: bytes) -> list[bytes]:
    """Every ready job's body in ``tube``, reserved and deleted straight from beanstalkd."""
    c = await direct(port)
    bodies = []
    try:
        assert (await c.line(b"watch " + tube)).startswith(b"WATCHING")
        while True:
            line, data = await c.call(b"reserve-with-timeout 0")
            if line == b"TIMED_OUT":
                return bodies
            assert line.startswith(b"RESERVED") and data is not None, line
            bodies.append(data)
            assert await c.line(b"delete " + line.split()[1]) == b"DELETED"
    finally:
        await c.close()


@EVERY_LOOP_AND_TRANSPORT
def test_many_large_uploads_through_a_small_bound(
    pki: PKI, big: Beanstalkd, loop: str, transport: str
) -> None:
    async def main() -> None:
        async with serving(pki, big.port, transport, max_buffered_bytes=LIMIT) as proxy:
            budget = proxy.server.budget  # budget.peak: the gauge's highest value ever
            bystander = await proxy.connect("admin")
            # One client holds the whole bound with a put whose body has not all arrived, so
            # the others must wait: deterministic pauses.
            holder = await proxy.connect("admin")
            held = body(99, 0, LIMIT)
            await holder.send(b"use big\r\nput 0 0 60 %d\r\n%s" % (LIMIT, held[:1000]))
            await until(lambda: budget.used == LIMIT)
            clients = [await proxy.connect("admin") for _ in range(CLIENTS)]
            by_client = [[body(i, j) for j in range(PUTS)] for i in range(CLIENTS)]
            wanted = {b for bodies in by_client for b in bodies}

            async def upload(c: Client, bodies: list[bytes]) -> list[bytes]:
                wire = b"use big\r\n" + b"".join(
                    b"put 0 0 60 %d\r\n%s\r\n" % (len(b), b) for b in bodies
                )
                await c.send(wire)  # all pipelined at once
                return [(await c.reply(timeout=60))[0] for _ in range(len(bodies) + 1)]

            uploads = [
                asyncio.create_task(upload(c, b)) for c, b in zip(clients, by_client, strict=True)
            ]
            await until(lambda: budget.waiting >= 1)
            # Uploads are paused: the bystander is served all the same.
            assert await bystander.line(b"list-tube-used") == b"USING default"
            assert budget.used == LIMIT and budget.waiting >= 1
            # A paused client is not read: what its session holds beyond its reservation is at
            # most one delivery of the TLS layer.
            for conn in proxy.server.connections:
                if conn.session is not None and conn.session.stalled:
                    assert conn.session.parser.buffered <= READ_MAX[transport]
            await holder.send(held[1000:] + b"\r\n")
            assert (await holder.reply())[0] == b"USING big"
            assert (await holder.reply(timeout=60))[0].startswith(b"INSERTED")
            results = await asyncio.gather(*uploads)
            for replies in results:
                assert replies[0] == b"USING big"
                assert all(r.startswith(b"INSERTED") for r in replies[1:]), replies
            assert await bystander.line(b"list-tube-used") == b"USING default"
            await until(lambda: budget.used == 0)
            assert sample(proxy, "beanstalk_proxy_buffered_bytes") == 0
            assert sample(proxy, "beanstalk_proxy_buffered_pauses_total") >= 1
            assert budget.peak == LIMIT  # the bound was reached, not just approached
            for c in [bystander, holder, *clients]:
                await c.close()
            jobs = await drain_jobs(big.port, b"big")
            assert len(jobs) == CLIENTS * PUTS + 1
            assert set(jobs) == wanted | {held}  # every body intact

    run_on(loop, main())


async def test_a_client_closing_mid_body_releases_its_bytes(pki: PKI, big: Beanstalkd) -> None:
    async with serving(pki, big.port, max_buffered_bytes=BODY) as proxy:
        budget = proxy.server.budget
        quitter = await proxy.connect("admin")
        await quitter.send(b"put 0 0 60 %d\r\n%s" % (BODY, b"q" * 5000))
        await until(lambda: budget.used == BODY)
        waiter = await proxy.connect("admin")
        await waiter.send(b"put 0 0 60 10\r\n0123456789\r\n")
        await until(lambda: budget.waiting == 1)
        await quitter.close()  # gone mid-body: its reservation goes, the waiter gets in
        assert (await waiter.reply())[0].startswith(b"INSERTED")
        await until(lambda: budget.used == 0)
        assert budget.waiting == 0
        await waiter.close()
        assert await drain_jobs(big.port, b"default") == [b"0123456789"]


async def test_a_waiting_client_that_leaves_gives_its_turn_back(pki: PKI, big: Beanstalkd) -> None:
    """A paused client is not read, so its leaving is noticed when its turn comes: it is
    granted, reads its EOF, closes and releases at once; whoever waited behind it proceeds."""
    async with serving(pki, big.port, max_buffered_bytes=BODY) as proxy:
        budget = proxy.server.budget
        holder = await proxy.connect("admin")
        await holder.send(b"put 0 0 60 %d\r\n" % BODY)
        await until(lambda: budget.used == BODY)
        gone, third = await proxy.connect("admin"), await proxy.connect("admin")
        await gone.send(b"put 0 0 60 %d\r\n%s" % (BODY, b"g" * 100))
        await until(lambda: budget.waiting == 1)
        await third.send(b"put 0 0 60 3\r\nabc\r\n")
        await until(lambda: budget.waiting == 2)
        gone.writer.transport.abort()  # leaves while waiting, its body unsent
        await holder.send(b"h" * BODY + b"\r\n")
        assert (await holder.reply())[0].startswith(b"INSERTED")
        assert (await third.reply())[0].startswith(b"INSERTED")
        await until(lambda: budget.used == 0)
        assert budget.waiting == 0 and len(proxy.server.connections) == 2
        for c in (holder, third):
            await c.close()
        assert len(await drain_jobs(big.port, b"default")) == 2


async def test_upstream_lost_mid_body_releases_the_bytes(pki: PKI, big: Beanstalkd) -> None:
    async with serving(pki, big.port, max_buffered_bytes=BODY) as proxy:
        budget = proxy.server.budget
        c = await proxy.connect("admin")
        await c.send(b"put 0 0 60 %d\r\n%s" % (BODY, b"u" * 1000))
        await until(lambda: budget.used == BODY)
        big.stop()
        await c.closed()
        await until(lambda: budget.used == 0)
        assert sample(proxy, "beanstalk_proxy_buffered_bytes") == 0
        await c.close()


async def test_refused_puts_reserve_nothing(pki: PKI, big: Beanstalkd) -> None:
    async with serving(pki, big.port, max_buffered_bytes=1000) as proxy:
        budget = proxy.server.budget
        c = await proxy.connect("billing")  # produce on invoices only
        await c.send(b"put 0 0 60 %d\r\n%s" % (BODY, b"r" * 5000))
        await c.send(b"r" * (BODY - 5000) + b"\r\n")
        assert await c.reply() == (b"NOT_PERMITTED", None)
        assert budget.used == 0 and budget.pauses == 0 and budget.peak == 0
        await c.close()


async def test_a_put_larger_than_the_bound_goes_through_alone(pki: PKI, big: Beanstalkd) -> None:
    async with serving(pki, big.port, max_buffered_bytes=1000) as proxy:
        budget = proxy.server.budget
        c = await proxy.connect("admin")
        data = body(1, 1)
        assert (await c.put(data)).startswith(b"INSERTED")
        assert budget.peak == BODY and budget.used == 0  # one put over the bound, alone
        await c.close()
        assert await drain_jobs(big.port, b"default") == [data]


@EVERY_LOOP_AND_TRANSPORT
def test_a_fire_and_forget_producer_waiting_for_the_budget_keeps_its_job(
    pki: PKI, big: Beanstalkd, loop: str, transport: str
) -> None:
    """put, then close at once, while the budget is full: the job is inserted once the put's
    turn comes, as beanstalkd would have inserted it (the client is gone by then)."""

    async def main() -> None:
        async with serving(pki, big.port, transport, max_buffered_bytes=BODY) as proxy:
            budget = proxy.server.budget
            holder = await proxy.connect("admin")
            await holder.send(b"put 0 0 60 %d\r\n" % BODY)
            await until(lambda: budget.used == BODY)
            producer = await proxy.connect("admin")
            producer.writer.write(b"put 0 0 60 5\r\nhello\r\n")
            producer.writer.close()  # close_notify right behind the put, never reads
            await until(lambda: budget.waiting == 1)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await producer.writer.wait_closed()
            # gone or not, the producer's connection counts until it has finished
            assert proxy.server.client_sockets == 2 and budget.waiting == 1
            await holder.send(b"h" * BODY + b"\r\n")
            assert (await holder.reply())[0].startswith(b"INSERTED")
            await holder.close()
            await until(lambda: not proxy.server.connections and budget.used == 0)
            assert sorted(await drain_jobs(big.port, b"default")) == sorted([b"h" * BODY, b"hello"])

    run_on(loop, main())


async def test_a_waiting_connection_closed_by_the_proxy_leaves_the_queue(
    pki: PKI, big: Beanstalkd
) -> None:
    """An ACL reload that removes a waiting client's principal closes it: its place in the
    queue goes at once, and the put queued behind it runs when the budget frees."""
    async with serving(pki, big.port, max_buffered_bytes=BODY) as proxy:
        budget = proxy.server.budget
        holder = await proxy.connect("admin")
        await holder.send(b"put 0 0 60 %d\r\n" % BODY)
        await until(lambda: budget.used == BODY)
        billing, behind = await proxy.connect("billing"), await proxy.connect("admin")
        await billing.send(b"use invoices\r\nput 0 0 60 %d\r\n" % BODY)
        await until(lambda: budget.waiting == 1)
        await behind.send(b"put 0 0 60 3\r\nabc\r\n")
        await until(lambda: budget.waiting == 2)
        acl = {
            "principals": [p for p in TEST_ACL["principals"] if p["name"] != "billing"],
            "rules": [r for r in TEST_ACL["rules"] if r["principal"] != "billing"],
        }
        proxy.server.reload_policy(parse_acl(acl, "<reloaded>"))
        assert budget.waiting == 1  # billing's turn withdrawn with its connection
        assert (await billing.reply())[0] == b"USING invoices"
        await billing.closed()
        await holder.send(b"h" * BODY + b"\r\n")
        assert (await holder.reply())[0].startswith(b"INSERTED")
        assert (await behind.reply())[0].startswith(b"INSERTED")
        await until(lambda: budget.used == 0 and budget.waiting == 0)
        for c in (holder, behind, billing):
            await c.close()

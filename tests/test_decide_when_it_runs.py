"""Issue 10, item 1, end to end: a reload governs commands pipelined behind a blocking
``reserve`` (they wait in the proxy and are decided when it returns), and a reserve waiting on
a tube whose consume right a reload revoked is ended by closing the connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import PKI, Beanstalkd, Client, RunningProxy, direct, server_stats, serving

from proxy.acl import parse_acl

pytestmark = pytest.mark.integration


def doc(produce: bool = True, consume: bool = True) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [{"principal": "ops", "allow": ["all"]}]
    if consume:
        rules.append({"principal": "tenant", "tubes": ["alpha"], "allow": ["consume"]})
    if produce:
        rules.append({"principal": "tenant", "tubes": ["a.*"], "allow": ["produce"]})
    return {
        "principals": [
            {"name": "tenant", "match": {"cn": "worker", "ou": "jobs"}},
            {"name": "ops", "match": {"cn": "admin"}},
        ],
        "rules": rules,
    }


async def until_waiting(port: int, n: int) -> None:
    """Until beanstalkd reports ``n`` connections waiting in a reserve (bounded poll)."""
    deadline = time.monotonic() + 10
    while (await server_stats(port))["current-waiting"] != str(n):
        assert time.monotonic() < deadline, "the reserve never reached beanstalkd"
        await asyncio.sleep(0.01)


async def waiting_worker(proxy: RunningProxy, port: int, pipeline: bytes) -> Client:
    """The worker, watching only ``alpha``, sends ``pipeline`` (a reserve first) and is then
    waiting in beanstalkd's reserve."""
    c = await proxy.connect("worker")
    await c.line(b"watch alpha")
    await c.line(b"ignore default")
    await c.send(pipeline)
    await until_waiting(port, 1)
    return c


async def put_into_alpha(port: int) -> Client:
    """A direct connection to beanstalkd that put one job into ``alpha`` (the caller closes
    it)."""
    o = await direct(port)
    await o.line(b"use alpha")
    await o.put(b"job")
    return o


async def test_revocation_reaches_puts_pipelined_behind_a_reserve(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, doc()) as proxy:
        c = await proxy.connect("worker")
        assert await c.line(b"watch alpha") == b"WATCHING 2"
        assert await c.line(b"ignore default") == b"WATCHING 1"
        put = b"put 0 0 60 4\r\nloot\r\n"
        await c.send(b"reserve-with-timeout 30\r\nuse a.loot\r\n" + put * 3)
        await until_waiting(beanstalkd.port, 1)
        proxy.server.reload_policy(parse_acl(doc(produce=False), "acl.yaml"))
        o = await direct(beanstalkd.port)  # a job ends the reserve at once
        assert await o.line(b"use alpha") == b"USING alpha"
        assert (await o.put(b"job")).startswith(b"INSERTED")
        await o.close()
        assert (await c.reply())[0].startswith(b"RESERVED")
        replies = [(await c.reply())[0] for _ in range(4)]
        assert replies == [b"NOT_PERMITTED"] * 4  # use and the three puts, decided now
        stats = await server_stats(beanstalkd.port)
        assert stats["cmd-put"] == "1"  # only the observer's
        assert stats["cmd-use"] == "1"
        await c.close()


async def test_a_grant_reaches_commands_pipelined_behind_a_reserve(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, doc(produce=False)) as proxy:
        c = await waiting_worker(
            proxy,
            beanstalkd.port,
            b"reserve-with-timeout 30\r\nuse a.new\r\nput 0 0 60 2\r\nok\r\n",
        )
        proxy.server.reload_policy(parse_acl(doc(), "acl.yaml"))
        o = await put_into_alpha(beanstalkd.port)
        await o.close()
        assert (await c.reply())[0].startswith(b"RESERVED")
        assert (await c.reply())[0] == b"USING a.new"
        assert (await c.reply())[0].startswith(b"INSERTED")
        await c.close()


async def test_revoking_consume_ends_a_waiting_reserve(pki: PKI, beanstalkd: Beanstalkd) -> None:
    async with serving(pki, beanstalkd.port, doc()) as proxy:
        c = await waiting_worker(
            proxy, beanstalkd.port, b"reserve\r\nuse a.x\r\nput 0 0 60 1\r\nx\r\n"
        )
        proxy.server.reload_policy(parse_acl(doc(consume=False), "acl.yaml"))
        assert await c.closed() == b""  # closed, and the held commands never ran
        await until_waiting(beanstalkd.port, 0)
        o = await put_into_alpha(beanstalkd.port)
        assert (await o.stats(b"stats-tube alpha"))["current-jobs-ready"] == "1"
        await o.close()
        stats = await server_stats(beanstalkd.port)
        assert stats["cmd-put"] == "1" and stats["cmd-use"] == "1"


async def test_a_reload_that_keeps_consume_keeps_the_reserve(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, doc()) as proxy:
        c = await waiting_worker(proxy, beanstalkd.port, b"reserve\r\n")
        proxy.server.reload_policy(parse_acl(doc(produce=False), "acl.yaml"))
        o = await put_into_alpha(beanstalkd.port)
        await o.close()
        assert (await c.reply())[0].startswith(b"RESERVED")
        await c.close()

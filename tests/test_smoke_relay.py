"""First end-to-end checks of the relay: put/reserve/delete through real TLS to a real
beanstalkd, and the connection of a client with no principal is refused."""

from __future__ import annotations

from conftest import Beanstalkd, RunningProxy, server_stats


async def test_put_reserve_delete_round_trip(proxy: RunningProxy) -> None:
    c = await proxy.connect("admin")
    assert await c.line(b"use jobs") == b"USING jobs"
    assert await c.put(b"hello") == b"INSERTED 1"
    assert await c.line(b"watch jobs") == b"WATCHING 2"
    line, body = await c.call(b"reserve")
    assert (line, body) == (b"RESERVED 1 5", b"hello")
    assert await c.line(b"delete 1") == b"DELETED"
    await c.close()


async def test_quit_closes_cleanly(proxy: RunningProxy) -> None:
    c = await proxy.connect("admin")
    await c.send(b"list-tube-used\r\nquit\r\nlist-tube-used\r\n")
    assert await c.closed() == b"USING default\r\n"


async def test_unknown_principal_refused_without_upstream(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    before = await server_stats(beanstalkd.port)
    c = await proxy.connect("stranger")
    assert await c.closed() == b""
    after = await server_stats(beanstalkd.port)
    # only our own two stats connections were ever counted
    assert int(after["total-connections"]) == int(before["total-connections"]) + 1

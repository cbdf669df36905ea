"""Issue 8 end to end: beanstalkd's recommended worker workflow (reserve, bury before work,
delete when done) with least-privilege principals through the client tunnel and a real
beanstalkd, denials a client library raises on, and an operator cleaning up over a plain
line session. Producer: produce on ``jobs``; worker: consume on ``jobs``; ops: all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import greenstalk
import pytest
from conftest import (
    PKI,
    Beanstalkd,
    RunningProxy,
    direct,
    server_stats,
    serving,
    start_tunnel,
)

from proxy.tunnel import TunnelServer

pytestmark = pytest.mark.integration

ACL = {
    "principals": [
        {"name": "ops", "match": {"cn": "admin"}},
        {"name": "producer", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "worker", "match": {"cn": "worker", "ou": "jobs"}},
    ],
    "rules": [
        {"principal": "producer", "tubes": ["jobs"], "allow": ["produce"]},
        {"principal": "worker", "tubes": ["jobs"], "allow": ["consume"]},
        {"principal": "ops", "allow": ["all"]},
    ],
}


@pytest.fixture(params=["compatible", "explicit"])
async def wf_proxy(
    request: pytest.FixtureRequest, pki: PKI, beanstalkd: Beanstalkd
) -> AsyncIterator[RunningProxy]:
    async with serving(pki, beanstalkd.port, ACL, request.param) as running:
        yield running


@pytest.fixture
async def tunnels(pki: PKI, wf_proxy: RunningProxy) -> AsyncIterator[dict[str, int]]:
    made: dict[str, TunnelServer] = {}
    try:
        for who, cert in (("producer", "billing"), ("worker", "worker")):
            made[who] = await start_tunnel(pki, wf_proxy.port, cert)
        yield {who: t.port for who, t in made.items() if t.port is not None}
    finally:
        for t in made.values():
            await t.close()


def produce(port: int, n: int) -> list[int]:
    with greenstalk.Client(("127.0.0.1", port), use="jobs") as c:
        return [c.put(json.dumps({"n": i})) for i in range(n)]


def work(port: int, fail: set[int]) -> list[int]:
    """The FAQ worker: reserve, bury before processing, delete when done. A job in ``fail``
    'crashes' the worker: it stays buried for an operator."""
    done = []
    with greenstalk.Client(("127.0.0.1", port), watch="jobs") as c:
        while True:
            try:
                job = c.reserve(timeout=0)
            except greenstalk.TimedOutError:
                return done
            c.bury(job)
            if json.loads(job.body)["n"] in fail:
                continue
            c.delete(job)
            done.append(job.id)


def denied_calls(port: int, who: str) -> list[str]:
    """Commands outside the principal's rights: each must raise in the library."""
    raised = []
    watch = "jobs" if who == "worker" else "default"  # the producer may not watch at all
    with greenstalk.Client(("127.0.0.1", port), watch=watch, use="jobs") as c:
        attempts = {
            "producer": {
                "reserve": lambda: c.reserve(timeout=0),
                "kick": lambda: c.kick(1),
                "delete": lambda: c.delete(1),
                "use": lambda: c.use("other"),
            },
            "worker": {
                "put": lambda: c.put("x"),
                "kick": lambda: c.kick(1),
                "watch": lambda: c.watch("other"),
                "use": lambda: c.use("other"),
            },
        }[who]
        for name, call in attempts.items():
            try:
                call()
            except greenstalk.Error:
                raised.append(name)
    return raised


async def test_bury_then_delete_with_consume_only_leaves_nothing_behind(
    tunnels: dict[str, int], beanstalkd: Beanstalkd
) -> None:
    ids = await asyncio.to_thread(produce, tunnels["producer"], 5)
    done = await asyncio.to_thread(work, tunnels["worker"], set())
    assert sorted(done) == sorted(ids)
    stats = await server_stats(beanstalkd.port)
    assert stats["current-jobs-buried"] == "0"
    assert stats["current-jobs-ready"] == "0"
    assert stats["cmd-delete"] == "5"
    # each delete was confirmed with one stats-job on the worker's own connection
    assert stats["cmd-stats-job"] == "5"


async def test_operator_inspects_kicks_and_deletes_the_failed_job(
    tunnels: dict[str, int], wf_proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    ids = await asyncio.to_thread(produce, tunnels["producer"], 3)
    done = await asyncio.to_thread(work, tunnels["worker"], {1})
    assert len(done) == 2
    ops = await wf_proxy.connect("admin")  # a plain line session over TLS
    try:
        assert await ops.line(b"use jobs") == b"USING jobs"
        line, body = await ops.call(b"peek-buried")
        assert line == b"FOUND %d %d" % (ids[1], len(body or b""))
        assert json.loads(body or b"") == {"n": 1}
        assert await ops.line(b"kick 10") == b"KICKED 1"
        assert await ops.line(b"delete %d" % ids[1]) == b"DELETED"
    finally:
        await ops.close()
    stats = await server_stats(beanstalkd.port)
    assert stats["current-jobs-buried"] == "0" and stats["current-jobs-ready"] == "0"


async def test_worker_cannot_delete_a_job_kicked_since_it_buried_it(
    pki: PKI, wf_proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    ops = await wf_proxy.connect("admin")
    worker = await wf_proxy.connect("worker")
    try:
        await ops.line(b"use jobs")
        job = int((await ops.put(b"x")).split()[1])
        assert await worker.line(b"watch jobs") == b"WATCHING 2"
        assert await worker.line(b"ignore default") == b"WATCHING 1"
        assert (await worker.call(b"reserve-with-timeout 1"))[0] == b"RESERVED %d 1" % job
        assert await worker.line(b"bury %d 0" % job) == b"BURIED"
        assert await ops.line(b"kick-job %d" % job) == b"KICKED"
        reply = await worker.line(b"delete %d" % job)
        assert reply in (b"NOT_FOUND", b"NOT_PERMITTED")  # by mode: manage is needed now
        assert (await server_stats(beanstalkd.port))["current-jobs-ready"] == "1"
    finally:
        await ops.close()
        await worker.close()


async def test_worker_cannot_delete_a_job_another_worker_buried(
    wf_proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    ops = await wf_proxy.connect("admin")
    first = await wf_proxy.connect("worker")
    second = await wf_proxy.connect("worker")
    try:
        await ops.line(b"use jobs")
        job = int((await ops.put(b"x")).split()[1])
        await first.line(b"watch jobs")
        await first.line(b"ignore default")
        assert (await first.call(b"reserve-with-timeout 1"))[0].startswith(b"RESERVED")
        assert await first.line(b"bury %d 0" % job) == b"BURIED"
        assert await second.line(b"delete %d" % job) in (b"NOT_FOUND", b"NOT_PERMITTED")
        assert (await server_stats(beanstalkd.port))["current-jobs-buried"] == "1"
    finally:
        for c in (ops, first, second):
            await c.close()


@pytest.mark.parametrize("who", ["producer", "worker"])
async def test_every_denial_in_the_workflow_raises_in_the_library(
    tunnels: dict[str, int], beanstalkd: Beanstalkd, who: str
) -> None:
    raised = await asyncio.to_thread(denied_calls, tunnels[who], who)
    expected = {
        "producer": ["reserve", "kick", "delete", "use"],
        "worker": ["put", "kick", "watch", "use"],
    }
    assert raised == expected[who]
    stats = await server_stats(beanstalkd.port)
    assert stats["cmd-reserve-with-timeout"] == "0" and stats["cmd-kick"] == "0"
    assert stats["cmd-put"] == "0"


async def test_denied_use_with_pipelined_puts_lands_nothing(
    wf_proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    producer = await wf_proxy.connect("billing")
    try:
        put = b"put 0 0 60 2\r\nhi\r\n"
        await producer.send(b"use secret\r\n" + put * 3 + b"list-tube-used\r\n")
        replies = [(await producer.reply())[0] for _ in range(5)]
        assert len(set(replies[:4])) == 1 and replies[0] in (b"UNKNOWN_COMMAND", b"NOT_PERMITTED")
        assert replies[4] == b"USING default"  # what beanstalkd really uses
        assert await producer.line(b"use jobs") == b"USING jobs"
        assert (await producer.put(b"ok")).startswith(b"INSERTED")
    finally:
        await producer.close()
    stats = await server_stats(beanstalkd.port)
    assert stats["cmd-put"] == "1" and stats["current-jobs-ready"] == "1"
    c = await direct(beanstalkd.port)
    try:
        assert (await c.stats(b"stats-tube jobs"))["current-jobs-ready"] == "1"
        assert (await c.stats(b"stats-tube default"))["current-jobs-ready"] == "0"
    finally:
        await c.close()

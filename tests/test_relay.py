"""Integration tests of the relay: a real beanstalkd, real mutual TLS, certificates made at test
time. Round trips, pipelining with every reply checked in order, binary bodies, the job-size
limit, a blocking reserve with pipelined commands behind it, disconnects (client side and
upstream side), an unreachable upstream and ``quit``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
from conftest import (
    PKI,
    TEST_MAX_JOB,
    Beanstalkd,
    RunningProxy,
    direct,
    free_port,
    parse_yaml_map,
    server_stats,
    start_proxy,
)

Stats = dict[str, str]


async def wait_for_stats(
    port: int, predicate: Callable[[Stats], bool], what: str, timeout: float = 5.0
) -> Stats:
    """Poll beanstalkd's ``stats`` on one direct connection until ``predicate`` holds (bounded)."""
    c = await direct(port)
    try:
        deadline = time.monotonic() + timeout
        while True:
            st = await c.stats()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for beanstalkd: {what}; last stats: {st}")
            await asyncio.sleep(0.01)  # bounded poll of server state that has no event
    finally:
        await c.close()


async def upstream_closed(port: int, base: Stats) -> None:
    """Until beanstalkd has no reserve waiting and as many connections as it had at ``base``."""
    await wait_for_stats(
        port,
        lambda s: (
            s["current-waiting"] == "0" and s["current-connections"] == base["current-connections"]
        ),
        "upstream connection closed",
    )


def cmd_counters(st: Stats) -> dict[str, int]:
    return {k: int(v) for k, v in st.items() if k.startswith("cmd-")}


# --- round trips ------------------------------------------------------------------------------


async def test_put_reserve_delete_round_trips(proxy: RunningProxy, beanstalkd: Beanstalkd) -> None:
    c = await proxy.connect("admin")
    assert await c.line(b"use jobs") == b"USING jobs"
    assert await c.put(b"low", pri=10) == b"INSERTED 1"
    assert await c.put(b"high", pri=1) == b"INSERTED 2"
    assert await c.put(b"later", delay=3600) == b"INSERTED 3"
    assert await c.line(b"watch jobs") == b"WATCHING 2"
    assert await c.line(b"ignore default") == b"WATCHING 1"
    assert await c.call(b"reserve") == (b"RESERVED 2 4", b"high")
    assert await c.call(b"reserve-with-timeout 0") == (b"RESERVED 1 3", b"low")
    assert await c.call(b"reserve-with-timeout 0") == (b"TIMED_OUT", None)
    assert await c.line(b"release 1 5 0") == b"RELEASED"
    assert await c.call(b"reserve") == (b"RESERVED 1 3", b"low")
    assert await c.line(b"delete 1") == b"DELETED"
    assert await c.line(b"delete 2") == b"DELETED"
    assert await c.line(b"delete 1") == b"NOT_FOUND"
    assert await c.call(b"peek 3") == (b"FOUND 3 5", b"later")
    await c.close()

    # beanstalkd's own view agrees: one delayed job left in tube jobs, nothing else
    d = await direct(beanstalkd.port)
    st = await d.stats(b"stats-tube jobs")
    assert (st["current-jobs-ready"], st["current-jobs-delayed"], st["total-jobs"]) == (
        "0",
        "1",
        "3",
    )
    await d.close()


async def test_jobs_cross_between_proxy_and_direct_clients(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    c = await proxy.connect("admin")
    d = await direct(beanstalkd.port)
    assert await c.put(b"from proxy") == b"INSERTED 1"
    assert await d.call(b"reserve-with-timeout 5") == (b"RESERVED 1 10", b"from proxy")
    assert await d.put(b"from direct") == b"INSERTED 2"
    assert await c.call(b"reserve-with-timeout 5") == (b"RESERVED 2 11", b"from direct")
    assert await d.line(b"delete 1") == b"DELETED"
    assert await c.line(b"delete 2") == b"DELETED"
    await c.close()
    await d.close()


# --- pipelining -------------------------------------------------------------------------------


def _body(i: int) -> bytes:
    # binary, varying lengths (0..199), with NUL, CR, LF and CRLF in most of them
    n = (i * 37) % 200
    return bytes((i * 7 + j * 13) % 256 for j in range(n))


async def test_pipelining_1000_mixed_commands_in_one_write(proxy: RunningProxy) -> None:
    """100 blocks of 10 commands, all in one write; every reply is checked in order."""
    blocks = 100
    data = bytearray()
    expected: list[Callable[[bytes, bytes | None], None]] = []

    def expect_line(want: bytes) -> None:
        def check(line: bytes, body: bytes | None) -> None:
            assert (line, body) == (want, None)

        expected.append(check)

    def expect_body(want_line: bytes, want_body: bytes) -> None:
        def check(line: bytes, body: bytes | None) -> None:
            assert (line, body) == (want_line, want_body)

        expected.append(check)

    def expect_yaml(want: dict[str, str]) -> None:
        def check(line: bytes, body: bytes | None) -> None:
            assert line.startswith(b"OK "), line
            assert body is not None
            got = parse_yaml_map(body)
            assert {k: got.get(k) for k in want} == want

        expected.append(check)

    for i in range(blocks):
        tube = f"t{i % 7}"
        job = i + 1
        body = _body(i)
        data += b"use %s\r\n" % tube.encode()
        expect_line(b"USING %s" % tube.encode())
        data += b"put %d 0 60 %d\r\n%s\r\n" % (i % 3, len(body), body)
        expect_line(b"INSERTED %d" % job)
        data += b"peek %d\r\n" % job
        expect_body(b"FOUND %d %d" % (job, len(body)), body)
        data += b"stats-tube %s\r\n" % tube.encode()
        # (the tube was freed after the previous block that used it, so it counts one job)
        expect_yaml({"name": tube, "current-jobs-ready": "1", "total-jobs": "1"})
        data += b"watch %s\r\n" % tube.encode()
        expect_line(b"WATCHING 2")
        data += b"reserve-with-timeout 0\r\n"
        expect_body(b"RESERVED %d %d" % (job, len(body)), body)
        data += b"stats-job %d\r\n" % job
        expect_yaml({"id": str(job), "tube": tube, "state": "reserved", "pri": str(i % 3)})
        data += b"ignore %s\r\n" % tube.encode()
        expect_line(b"WATCHING 1")
        data += b"delete %d\r\n" % job
        expect_line(b"DELETED")
        if i % 3 == 0:
            data += b"peek %d\r\n" % job
            expect_line(b"NOT_FOUND")
        elif i % 3 == 1:
            data += b"list-tube-used\r\n"
            expect_line(b"USING %s" % tube.encode())
        else:
            data += b"reserve-with-timeout 0\r\n"
            expect_line(b"TIMED_OUT")
    assert len(expected) == 1000

    c = await proxy.connect("admin")
    await c.send(bytes(data))
    for n, check in enumerate(expected):
        line, body = await c.reply()
        try:
            check(line, body)
        except AssertionError as exc:
            raise AssertionError(f"reply {n} out of order or wrong: {exc}") from None
    assert await c.line(b"list-tube-used") == b"USING t1"
    await c.close()


async def test_pipelined_flood_with_backpressure(proxy: RunningProxy) -> None:
    """More than MAX_PENDING commands, written while replies are read concurrently: the relay
    pauses and resumes both directions and loses, duplicates or reorders nothing."""
    n = 6000
    body = b"\r\n\0" * 300  # 900 bytes
    chunk = b"put 0 0 60 %d\r\n%s\r\nlist-tube-used\r\n" % (len(body), body)

    c = await proxy.connect("admin")

    async def writer() -> None:
        for start in range(0, n, 500):
            await c.send(chunk * min(500, n - start))

    task = asyncio.create_task(writer())
    for i in range(n):
        assert await c.reply() == (b"INSERTED %d" % (i + 1), None)
        assert await c.reply() == (b"USING default", None)
    await task
    assert await c.call(b"peek %d" % n) == (b"FOUND %d %d" % (n, len(body)), body)
    await c.close()


# --- bodies -----------------------------------------------------------------------------------

BINARY_BODIES = [
    b"",
    b"\r\n",
    b"\0",
    b"a\0\r\nb\r",
    b"\r\ndelete 1\r\n",
    b"put 0 0 10 5\r\nhello\r\n",
    b"\n\n\r\r",
    bytes(range(256)),
    b"\r\n" * 100,
]


async def test_binary_bodies_round_trip_byte_exact(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    c = await proxy.connect("admin")
    assert await c.line(b"use bin") == b"USING bin"
    assert await c.line(b"watch bin") == b"WATCHING 2"
    for i, body in enumerate(BINARY_BODIES, start=1):
        assert await c.put(body) == b"INSERTED %d" % i
    d = await direct(beanstalkd.port)
    for i, body in enumerate(BINARY_BODIES, start=1):
        # stored exactly (seen without the proxy) ...
        assert await d.call(b"peek %d" % i) == (b"FOUND %d %d" % (i, len(body)), body)
        # ... and delivered exactly through the proxy
        assert await c.call(b"reserve-with-timeout 0") == (
            b"RESERVED %d %d" % (i, len(body)),
            body,
        )
    st = await d.stats()
    assert st["cmd-delete"] == "0"  # "\r\ndelete 1\r\n" was body data, not a command
    assert st["cmd-put"] == str(len(BINARY_BODIES))
    assert st["total-jobs"] == str(len(BINARY_BODIES))
    await d.close()
    await c.close()


async def test_body_at_exactly_max_job_size_is_accepted(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    body = (b"\r\n\0x" * TEST_MAX_JOB)[:TEST_MAX_JOB]
    c = await proxy.connect("admin")
    assert await c.put(body) == b"INSERTED 1"
    assert await c.call(b"reserve") == (b"RESERVED 1 %d" % TEST_MAX_JOB, body)
    d = await direct(beanstalkd.port)
    assert await d.call(b"peek 1") == (b"FOUND 1 %d" % TEST_MAX_JOB, body)
    await d.close()
    await c.close()


async def test_body_one_over_max_job_size_is_skipped_then_job_too_big(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    n = TEST_MAX_JOB + 1
    # the oversized body spells commands; none of them may run
    body = (b"\r\nuse victim\r\ndelete 1\r\n" * 100)[:n]
    c = await proxy.connect("admin")
    assert await c.put(b"keep") == b"INSERTED 1"
    await c.send(b"put 0 0 60 %d\r\n%s\r\nlist-tube-used\r\n" % (n, body))
    assert await c.reply() == (b"JOB_TOO_BIG", None)
    assert await c.reply() == (b"USING default", None)

    # the same, written in pieces, and with a trailer that is not CRLF (beanstalkd skips
    # exactly n + 2 bytes whatever they are)
    await c.send(b"put 0 0 60 %d\r\n" % n)
    for start in range(0, n, 300):
        await c.send(body[start : start + 300])
    await c.send(b"XYlist-tube-used\r\n")
    assert await c.reply() == (b"JOB_TOO_BIG", None)
    assert await c.reply() == (b"USING default", None)

    # connection still usable
    assert await c.put(b"after") == b"INSERTED 2"
    st = await server_stats(beanstalkd.port)
    assert st["cmd-use"] == "0"
    assert st["cmd-delete"] == "0"
    assert st["total-jobs"] == "2"
    assert st["current-tubes"] == "1"
    await c.close()


async def test_expected_crlf(proxy: RunningProxy, beanstalkd: Beanstalkd) -> None:
    c = await proxy.connect("admin")
    assert await c.put(b"keep") == b"INSERTED 1"
    # body "abc", trailer "de" is not CRLF: parsing resumes after it, at "lete 1"
    await c.send(b"put 0 0 10 3\r\nabcdelete 1\r\nlist-tube-used\r\n")
    assert await c.reply() == (b"EXPECTED_CRLF", None)
    assert await c.reply() == (b"UNKNOWN_COMMAND", None)
    assert await c.reply() == (b"USING default", None)
    await c.send(b"put 0 0 10 5\r\nhelloXYlist-tube-used\r\n")
    assert await c.reply() == (b"EXPECTED_CRLF", None)
    assert await c.reply() == (b"USING default", None)
    assert await c.call(b"peek 1") == (b"FOUND 1 4", b"keep")
    st = await server_stats(beanstalkd.port)
    assert st["cmd-delete"] == "0"
    assert st["current-jobs-ready"] == "1"
    await c.close()


# --- blocking reserve ---------------------------------------------------------------------------


async def test_blocking_reserve_holds_later_pipelined_replies_in_order(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    a = await proxy.connect("admin")
    await a.send(
        b"watch q\r\n"
        b"reserve\r\n"
        b"PUT\r\n"  # answered by the proxy itself, but only in its turn
        b"list-tube-used\r\n"
        b"stats-job 1\r\n"
        b"delete 1\r\n"
        b"statsX\r\n"  # another local reply
        b"peek 1\r\n"
    )
    assert await a.reply() == (b"WATCHING 2", None)
    await wait_for_stats(beanstalkd.port, lambda s: s["current-waiting"] == "1", "reserve blocking")

    b = await proxy.connect("admin")
    assert await b.line(b"use q") == b"USING q"
    assert await b.put(b"wake up") == b"INSERTED 1"

    assert await a.reply() == (b"RESERVED 1 7", b"wake up")
    assert await a.reply() == (b"UNKNOWN_COMMAND", None)
    assert await a.reply() == (b"USING default", None)
    line, body = await a.reply()
    assert line.startswith(b"OK ") and body is not None
    assert parse_yaml_map(body)["state"] == "reserved"
    assert await a.reply() == (b"DELETED", None)
    assert await a.reply() == (b"BAD_FORMAT", None)
    assert await a.reply() == (b"NOT_FOUND", None)
    await a.close()
    await b.close()


# --- disconnects --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_client_disconnect_releases_reserved_job(
    proxy: RunningProxy, beanstalkd: Beanstalkd, how: str
) -> None:
    c = await proxy.connect("admin")
    assert await c.put(b"job") == b"INSERTED 1"
    assert await c.call(b"reserve") == (b"RESERVED 1 3", b"job")

    d = await direct(beanstalkd.port)
    st = await d.stats(b"stats-job 1")
    assert st["state"] == "reserved"
    assert await d.call(b"reserve-with-timeout 0") == (b"TIMED_OUT", None)

    if how == "close":
        await c.close()
    else:
        c.writer.transport.abort()

    # beanstalkd gives the job to us as soon as the proxy has closed the upstream connection
    assert await d.call(b"reserve-with-timeout 5") == (b"RESERVED 1 3", b"job")
    st = await d.stats()
    assert st["current-jobs-reserved"] == "1"  # ours, the direct connection's
    assert st["current-connections"] == "1"
    await d.close()


async def test_client_disconnect_during_blocking_reserve_cancels_it(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    base = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    await c.send(b"reserve\r\n")
    await wait_for_stats(beanstalkd.port, lambda s: s["current-waiting"] == "1", "reserve")
    c.writer.transport.abort()
    # the upstream connection goes away, so beanstalkd has no waiting reserver left
    await upstream_closed(beanstalkd.port, base)
    d = await direct(beanstalkd.port)
    assert await d.put(b"for a live worker") == b"INSERTED 1"
    assert await d.call(b"reserve-with-timeout 0") == (b"RESERVED 1 17", b"for a live worker")
    await d.close()
    assert proxy.server.connections == set()


async def test_beanstalkd_not_running_closes_client(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="beanstalk_proxy")
    closed_port = free_port()  # nothing listens there
    running = await start_proxy(pki, closed_port)
    try:
        c = await running.connect("admin")
        await c.send(b"list-tube-used\r\nput 0 0 10 2\r\nhi\r\n")
        assert await c.closed(timeout=5) == b""
        await c.close()
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        assert running.server.connections == set()
        # a second client is refused the same way (nothing is cached or wedged)
        c2 = await running.connect("admin")
        assert await c2.closed(timeout=5) == b""
        await c2.close()
    finally:
        await running.server.close()


async def test_beanstalkd_killed_mid_session_closes_client(
    proxy: RunningProxy, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="beanstalk_proxy")
    idle = await proxy.connect("admin")
    assert await idle.put(b"x") == b"INSERTED 1"
    waiting = await proxy.connect("admin")
    await waiting.send(b"watch nothing-here\r\nignore default\r\nreserve\r\n")
    assert await waiting.reply() == (b"WATCHING 2", None)
    assert await waiting.reply() == (b"WATCHING 1", None)
    await wait_for_stats(beanstalkd.port, lambda s: s["current-waiting"] == "1", "reserve")

    beanstalkd.proc.kill()
    beanstalkd.proc.wait(10)

    assert await idle.closed(timeout=5) == b""
    assert await waiting.closed(timeout=5) == b""
    await idle.close()
    await waiting.close()
    assert proxy.server.connections == set()
    assert any("upstream connection ended" in r.getMessage() for r in caplog.records)


# --- quit -------------------------------------------------------------------------------------


async def test_quit_answers_what_came_before_and_nothing_after(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    base = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    await c.send(
        b"list-tube-used\r\nput 0 0 10 2\r\nhi\r\nquit\r\nuse victim\r\nlist-tube-used\r\n"
    )
    assert await c.closed() == b"USING default\r\nINSERTED 1\r\n"
    await c.close()
    # the client saw EOF only after beanstalkd closed the upstream connection
    st = await server_stats(beanstalkd.port)
    assert st["current-connections"] == base["current-connections"]
    assert int(st["total-connections"]) == int(base["total-connections"]) + 2
    assert st["cmd-list-tube-used"] == "1"
    assert st["cmd-use"] == "0"
    assert st["current-tubes"] == "1"
    assert proxy.server.connections == set()


async def test_quit_as_first_command(proxy: RunningProxy, beanstalkd: Beanstalkd) -> None:
    c = await proxy.connect("admin")
    await c.send(b"quit\r\n")
    assert await c.closed() == b""
    await c.close()
    st = await server_stats(beanstalkd.port)
    assert st["current-connections"] == "1"


async def test_quit_with_a_reserved_job_releases_it(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    c = await proxy.connect("admin")
    assert await c.put(b"job") == b"INSERTED 1"
    await c.send(b"reserve\r\nquit\r\n")
    assert await c.closed() == b"RESERVED 1 3\r\njob\r\n"
    await c.close()
    d = await direct(beanstalkd.port)
    assert (await d.stats(b"stats-job 1"))["state"] == "ready"
    await d.close()


async def test_quit_behind_a_blocking_reserve_waits_like_beanstalkd(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    """Directly, beanstalkd does not read ``quit`` while a reserve blocks: the reserve waits
    for a job, answers ``RESERVED``, then the connection closes. The proxy must not turn the
    ``quit`` into a half-close, which beanstalkd would answer with ``TIMED_OUT`` at once."""
    c = await proxy.connect("admin")
    await c.send(b"reserve\r\nquit\r\n")
    await wait_for_stats(beanstalkd.port, lambda s: s["current-waiting"] == "1", "reserve")
    d = await direct(beanstalkd.port)
    assert await d.put(b"job") == b"INSERTED 1"
    assert await c.closed() == b"RESERVED 1 3\r\njob\r\n"
    await c.close()
    # the reservation went away with the connection
    assert (await d.stats(b"stats-job 1"))["state"] == "ready"
    await d.close()


async def test_client_close_with_pipelined_commands_still_runs_them(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    """Commands already sent before the client closes reach beanstalkd (as they would
    directly), and the upstream connection then closes."""
    base = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    await c.send(b"use after-close\r\nput 0 0 10 5\r\nhello\r\n")
    await c.close()
    st = await wait_for_stats(
        beanstalkd.port,
        # the upstream connection was opened (the poller is the other new one) and closed
        lambda s: (
            int(s["total-connections"]) >= int(base["total-connections"]) + 2
            and s["current-connections"] == base["current-connections"]
        ),
        "upstream connection opened and closed",
    )
    assert st["cmd-put"] == "1"
    d = await direct(beanstalkd.port)
    assert await d.call(b"peek 1") == (b"FOUND 1 5", b"hello")
    await d.close()


async def test_client_gone_after_quit_behind_blocking_reserve_releases_upstream(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    """After ``quit`` the proxy still notices the client going away: its upstream connection
    closes at once, so no job is handed to a reserve nobody will read."""
    base = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    await c.send(b"reserve\r\nquit\r\n")
    await wait_for_stats(beanstalkd.port, lambda s: s["current-waiting"] == "1", "reserve")
    c.writer.close()  # close_notify + FIN; its completion is awaited at the end
    await upstream_closed(beanstalkd.port, base)
    d = await direct(beanstalkd.port)
    assert await d.put(b"job") == b"INSERTED 1"
    assert await d.call(b"reserve-with-timeout 0") == (b"RESERVED 1 3", b"job")
    st = await d.stats()
    assert st["cmd-reserve"] == "1"
    await d.close()
    await c.close()


async def test_a_client_that_never_reads_is_not_read_either(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    """Denied commands are answered by the proxy itself: if the client never reads those
    replies, the proxy must stop reading its commands instead of buffering replies forever."""
    c = await proxy.connect("billing")
    chunk = b"watch secrets.x\r\n" * 60_000  # ~1 MB of commands, each answered NOT_PERMITTED
    sent = 0
    blocked = False
    try:
        while sent < 64 * len(chunk):
            c.writer.write(chunk)
            try:
                await asyncio.wait_for(c.writer.drain(), 3)
            except TimeoutError:
                blocked = True
                break
            sent += len(chunk)
        assert blocked, "the proxy read 64 MB of commands from a client that reads nothing"
        (conn,) = proxy.server.connections
        assert conn.bytes_in < 32 * len(chunk)
        assert conn.session is not None and not conn.reading
    finally:
        c.writer.transport.abort()

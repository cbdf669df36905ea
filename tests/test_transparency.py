"""Property 3 of ``docs/security-properties.md``: for a principal allowed everything, the proxy
is invisible.

The same scripted session runs once straight against a fresh beanstalkd and once through the
proxy (as ``admin``) against another fresh beanstalkd. The client-visible replies must be
identical (only values that legitimately differ between two runs are masked: ages, time left,
process ids, rusage...), and beanstalkd's ``stats`` afterwards, taken over a fresh direct
connection in both cases, must show the same ``current-connections``, ``total-connections``
and every ``cmd-*`` counter: the proxy added no command and no connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import (
    PKI,
    TEST_MAX_JOB,
    Beanstalkd,
    Client,
    RunningProxy,
    _spawn_beanstalkd,
    direct,
    free_port,
    server_stats,
    serving,
)

#: ``admin`` may do everything on every tube. (In the shared TEST_ACL a ``"*"`` principal is
#: denied ``secrets.*``, which applies to admin too, so there job-id commands legitimately need
#: a ``stats-job`` lookup to learn the job's tube: admin is not a full-access principal there.)
FULL_ACCESS_ACL: dict[str, Any] = {
    "principals": [{"name": "admin", "match": {"cn": "admin"}}],
    "rules": [{"principal": "admin", "tubes": ["*"], "allow": ["all"]}],
}

#: YAML keys whose values differ between two runs for reasons that have nothing to do with
#: the proxy (wall-clock time, process identity, resource usage).
MASKED = frozenset(
    {
        b"age",
        b"time-left",
        b"pause-time-left",
        b"pid",
        b"id",
        b"hostname",
        b"os",
        b"platform",
        b"rusage-utime",
        b"rusage-stime",
        b"uptime",
    }
)

Reply = tuple[bytes, bytes | None]

BINARY = b"\0\r\n\xff\r\ndelete 1\r\n\n\r"


def _put(body: bytes, pri: int = 0, delay: int = 0, ttr: int = 60) -> bytes:
    return b"put %d %d %d %d\r\n%s\r\n" % (pri, delay, ttr, len(body), body)


def _c(line: bytes) -> bytes:
    return line + b"\r\n"


#: a put whose line and body are sent in separate writes
SPLIT_PUT = _put(b"abc")

# One command per item; every item gets exactly one reply. Job ids are the same in both runs
# (each beanstalkd is fresh), so the script may name them.
SEQUENTIAL: list[bytes] = [
    _c(b"list-tube-used"),
    _c(b"list-tubes-watched"),
    _c(b"use work"),
    _put(b"hello", pri=5),  # 1
    _put(BINARY, pri=1),  # 2
    _put(b"delayed", pri=3, delay=3600),  # 3
    _put(b"", pri=2),  # 4
    _put(bytes(range(256)), pri=100),  # 5
    _c(b"watch work"),
    _c(b"ignore default"),
    _c(b"ignore work"),  # NOT_IGNORED
    _c(b"ignore never-watched"),
    _c(b"list-tubes-watched"),
    _c(b"peek-ready"),
    _c(b"peek-delayed"),
    _c(b"peek-buried"),
    _c(b"reserve"),  # 2
    _c(b"stats-job 2"),
    _c(b"touch 2"),
    _c(b"release 2 7 0"),
    _c(b"reserve"),  # 4
    _c(b"bury 4 9"),
    _c(b"peek-buried"),
    _c(b"stats-tube work"),
    _c(b"kick 1"),
    _c(b"reserve-with-timeout 0"),  # 1 (pri 5)
    _c(b"bury 1 0"),
    _c(b"kick-job 1"),
    _c(b"kick-job 3"),  # delayed -> ready
    _c(b"kick-job 3"),  # NOT_FOUND now
    SPLIT_PUT,  # 6
    _c(b"reserve-job 5"),
    _c(b"stats-job 5"),
    _c(b"release 5 100 3600"),
    _c(b"reserve-job 5"),  # a delayed job, reserved anyway (1.12)
    _c(b"delete 5"),
    _c(b"delete 5"),
    _c(b"stats-tube work"),
    _c(b"stats-tube default"),
    _c(b"stats-tube nosuch"),
    _c(b"pause-tube work 0"),
    _c(b"pause-tube nosuch 10"),
    _c(b"list-tubes"),
    _c(b"list-tube-used"),
    _c(b"peek 1"),
    _c(b"peek 2"),
    _c(b"peek 999"),
    _c(b"stats-job 999"),
    _c(b"delete 999"),
    _c(b"touch 999"),
    _c(b"release 999 0 0"),
    _c(b"bury 999 0"),
    _c(b"reserve-job 999"),
    _c(b"stats"),
]

# Sent in one write, replies read afterwards.
PIPELINED: list[bytes] = [
    _c(b"use other"),
    _put(b"p1", pri=1),  # 7
    _put(BINARY * 10, pri=2),  # 8
    _c(b"list-tube-used"),
    _c(b"peek-ready"),
    _c(b"watch other"),
    _c(b"reserve-with-timeout 0"),
    _c(b"stats-job 7"),
    _c(b"delete 7"),
    _c(b"reserve-with-timeout 0"),
    _c(b"release 8 0 0"),
    _c(b"reserve-job 8"),
    _c(b"bury 8 1"),
    _c(b"kick 10"),
    _c(b"stats-tube other"),
    _c(b"list-tubes"),
    _c(b"list-tubes-watched"),
    _c(b"ignore other"),
    _c(b"pause-tube other 0"),
    _c(b"stats"),
]


def _mask(body: bytes) -> bytes:
    out = []
    for raw in body.split(b"\n"):
        key, sep, _ = raw.partition(b":")
        if sep and key in MASKED:
            raw = key + b": <masked>"
        out.append(raw)
    return b"\n".join(out)


def _masked(reply: Reply) -> Reply:
    line, body = reply
    if body is not None and line.startswith(b"OK "):
        return line.split(b" ")[0], _mask(body)  # the length changes with masked values
    return line, body


async def run_script(c: Client) -> list[Reply]:
    replies: list[Reply] = []
    for item in SEQUENTIAL:
        if item is SPLIT_PUT:
            line, _, body = item.partition(b"\r\n")
            await c.send(line + b"\r\n")
            await c.send(body)
        else:
            await c.send(item)
        replies.append(_masked(await c.reply()))
    await c.send(b"".join(PIPELINED))
    for _ in PIPELINED:
        replies.append(_masked(await c.reply()))
    await c.send(b"quit\r\n")
    assert await c.closed() == b""
    await c.close()
    return replies


def _explain(got: Reply, want: Reply) -> str:
    if got[0] != want[0] or got[1] is None or want[1] is None:
        return f"{got!r} != {want!r}"
    g, w = got[1].split(b"\n"), want[1].split(b"\n")
    diffs = [f"{a!r} != {b!r}" for a, b in zip(g, w, strict=False) if a != b]
    return f"{got[0]!r}: " + ("; ".join(diffs) or f"{len(g)} != {len(w)} lines")


def _final(st: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in st.items() if k.encode() not in MASKED}


@pytest.fixture
def second_beanstalkd() -> Iterator[Beanstalkd]:
    port = free_port()
    b = Beanstalkd(port, _spawn_beanstalkd(port, TEST_MAX_JOB, []), TEST_MAX_JOB)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
async def full_proxy(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[RunningProxy]:
    async with serving(pki, beanstalkd.port, FULL_ACCESS_ACL) as running:
        yield running


async def test_proxy_is_invisible_to_a_full_access_principal(
    full_proxy: RunningProxy, beanstalkd: Beanstalkd, second_beanstalkd: Beanstalkd
) -> None:
    direct_replies = await run_script(await direct(second_beanstalkd.port))
    direct_stats = await server_stats(second_beanstalkd.port)

    proxied_replies = await run_script(await full_proxy.connect("admin"))
    proxied_stats = await server_stats(beanstalkd.port)

    # the script did what it was meant to (guards against a script that silently errors)
    assert direct_replies[3] == (b"INSERTED 1", None)
    assert (b"RESERVED 2 %d" % len(BINARY), BINARY) in direct_replies
    assert not any(line in (b"BAD_FORMAT", b"UNKNOWN_COMMAND") for line, _ in direct_replies)

    assert len(proxied_replies) == len(direct_replies)
    for i, (got, want) in enumerate(zip(proxied_replies, direct_replies, strict=True)):
        assert got == want, f"reply {i} differs through the proxy: {_explain(got, want)}"

    counters = [k for k in direct_stats if k.startswith("cmd-")]
    assert len(counters) == 22  # beanstalkd 1.12
    # the script exercises every counter, so each comparison below means something
    assert [k for k in counters if direct_stats[k] == "0"] == []
    for key in ["current-connections", "total-connections", *counters]:
        assert proxied_stats[key] == direct_stats[key], key
    # and every other unmasked server figure (jobs, tubes, producers, workers...) too
    assert _final(proxied_stats) == _final(direct_stats)


async def test_counters_a_client_test_suite_asserts(full_proxy: RunningProxy) -> None:
    """What real client libraries' own suites check against a fresh server: one connection,
    one ``stats`` command, through the proxy too."""
    c = await full_proxy.connect("admin")
    st = await c.stats()
    assert st["current-connections"] == "1"
    assert st["cmd-stats"] == "1"
    assert st["total-connections"] == "2"  # the fixture's readiness probe, then us
    assert sum(int(v) for k, v in st.items() if k.startswith("cmd-")) == 1
    await c.close()

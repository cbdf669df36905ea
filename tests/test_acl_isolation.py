"""Randomized isolation test: a principal confined to one tube cannot reach any other.

Sequences of 30-45 commands -- valid ones with random tubes, job ids and numbers, and
malformed ones, some of which make the proxy close the connection (the test reconnects) --
are sent singly or pipelined by principal ``tenant``, whose only rights are produce, consume,
inspect and manage on tube ``mine``. The choices come from hypothesis (explores, shrinks) and
from fixed seeds (broad, reproducible). Beforehand, jobs in every state (ready, delayed,
buried, reserved by another connection, and one whose body is still uploading) are put
directly into ``other`` and ``default``, and one still-uploading job into ``mine``. While it
runs, every reply is checked (another tenant's job id answers exactly ``NOT_FOUND``; no
foreign or still-uploading job is ever reserved or shown; ``list-tubes``/``stats-tube``/
``stats-job`` never reveal another tube) and, after every batch, beanstalkd is asked directly
whether a tube was created or ``other`` is used or watched. Afterwards it is asked whether any
job appeared in, left, or was reserved, released, buried, kicked or deleted from another tube,
and whether another tube was paused. Each sequence gets its own beanstalkd and proxy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pytest
from conftest import (
    PKI,
    TEST_MAX_JOB,
    Client,
    _spawn_beanstalkd,
    direct,
    free_port,
    parse_yaml_map,
    start_proxy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

T = TypeVar("T")

MINE = "mine"
ISOLATION_ACL: dict[str, Any] = {
    "principals": [
        {"name": "tenant", "match": {"cn": "worker", "ou": "jobs"}},
        {"name": "ops", "match": {"cn": "admin"}},
    ],
    "rules": [
        {"principal": "ops", "tubes": ["*"], "allow": ["all"]},
        {"principal": "tenant", "tubes": [MINE], "allow": ["produce", "consume", "inspect"]},
        {"principal": "tenant", "tubes": [MINE], "allow": ["manage"]},
    ],
}

# --- the foreign world, made directly (job ids are fixed: a fresh beanstalkd counts from 1) ---

FOREIGN_TUBES = ("other", "default")
#: id -> (tube, state) of the jobs other tenants own.
FOREIGN: dict[int, tuple[str, str]] = {}
for _i, _tube in enumerate(FOREIGN_TUBES):
    _base = 1 + 4 * _i
    FOREIGN[_base] = (_tube, "buried")
    FOREIGN[_base + 1] = (_tube, "reserved")
    FOREIGN[_base + 2] = (_tube, "ready")
    FOREIGN[_base + 3] = (_tube, "delayed")
MINE_JOBS = (9, 10)  # two ready jobs of the tenant's, put directly
UPLOADING = 11  # a put into "other" whose body never finishes (state "invalid")
UPLOADING_MINE = 12  # the same in "mine": peeking it would show uninitialised server memory
FOREIGN_IDS = frozenset(FOREIGN) | {UPLOADING}
NEVER_SHOWN = FOREIGN_IDS | {UPLOADING_MINE}

#: Fields that change by themselves or with connections coming and going (the tenant's own
#: connection uses and watches ``default`` while it is open).
VOLATILE = frozenset(
    {"age", "time-left", "pause-time-left", "current-using", "current-watching", "current-waiting"}
)


async def line_of(c: Client, cmd: bytes, body: bytes | None = None) -> bytes:
    return (await c.call(cmd, body))[0]


async def build_foreign_world(port: int) -> list[Client]:
    """Returns the connections that must stay open during the test (holder, uploaders)."""
    d = await direct(port)
    for tube in FOREIGN_TUBES:
        t = tube.encode()
        assert await line_of(d, b"use " + t) == b"USING " + t
        assert await line_of(d, b"watch " + t) in (b"WATCHING 1", b"WATCHING 2")
        for other in FOREIGN_TUBES:
            if other != tube:
                await line_of(d, b"ignore " + other.encode())
        ids = []
        for body, delay, ttr in ((b"buried", 0, 60), (b"taken", 0, 3600)):
            line = await d.put(b"SECRET " + t + b" " + body, 0, delay, ttr)
            ids.append(int(line.split()[1]))
            line = await line_of(d, b"reserve-with-timeout 0")
            assert line.startswith(b"RESERVED %d " % ids[-1]), line
        assert await line_of(d, b"bury %d 0" % ids[0]) == b"BURIED"
        for body, delay in ((b"ready", 0), (b"delayed", 3600)):
            line = await d.put(b"SECRET " + t + b" " + body, 100, delay, 60)
            ids.append(int(line.split()[1]))
        assert ids == [i for i, (tb, _) in FOREIGN.items() if tb == tube], ids
    assert await line_of(d, b"use mine") == b"USING mine"
    for j in MINE_JOBS:
        assert await d.put(b"mine %d" % j) == b"INSERTED %d" % j
    keep = [d]
    for tube, job in ((b"other", UPLOADING), (b"mine", UPLOADING_MINE)):
        uploader = await direct(port)
        keep.append(uploader)
        assert await line_of(uploader, b"use " + tube) == b"USING " + tube
        await uploader.send(b"put 0 0 60 300\r\nstill uploading")
        for _ in range(1000):  # round trips until beanstalkd has read that put line
            line, body = await d.call(b"stats-job %d" % job)
            if line != b"NOT_FOUND":
                break
        assert parse_yaml_map(body or b"")["state"] == "invalid"
    return keep


async def server_view(port: int) -> dict[str, Any]:
    """What the isolation claims are about, straight from beanstalkd."""
    c = await direct(port)
    try:
        _, body = await c.call(b"list-tubes")
        tubes = sorted(x[2:] for x in (body or b"").decode().splitlines() if x.startswith("- "))
        view: dict[str, Any] = {"tubes": tubes}
        for t in FOREIGN_TUBES:
            view[t] = {
                k: v
                for k, v in (await c.stats(b"stats-tube " + t.encode())).items()
                if k not in VOLATILE
            }
        for j in sorted(NEVER_SHOWN):
            view[j] = {
                k: v for k, v in (await c.stats(b"stats-job %d" % j)).items() if k not in VOLATILE
            }
        return view
    finally:
        await c.close()


# --- command generation -------------------------------------------------------------------


@dataclass(frozen=True)
class Atom:
    """Bytes to send, and what comes back: one reply per entry of ``kinds`` (the kind says
    how to check it), or, if ``closes`` is set, exactly those bytes and then the end."""

    data: bytes
    kinds: tuple[str, ...] = ()
    closes: bytes | None = None
    job: int | None = None  # the job id of a job-id command


class Chooser(Protocol):
    """Where the random choices come from: hypothesis (``DataChooser``, shrinkable) or a
    seeded ``random.Random`` (``SeededChooser``, reproducible from its seed)."""

    def choice(self, items: Sequence[T]) -> T: ...
    def integer(self, low: int, high: int) -> int: ...
    def binary(self, max_size: int) -> bytes: ...


class SeededChooser:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choice(self, items: Sequence[T]) -> T:
        return self.rng.choice(items)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


class DataChooser:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def choice(self, items: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(items))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


OTHER_NAMES = ("other", "default", "fresh", "secrets.x", "mine2", "Mine")
JOB_OPS = ("reserve-job", "delete", "peek", "kick-job", "stats-job", "touch")
NO_ARG = (
    ("peek", b"peek-ready"),
    ("peek", b"peek-delayed"),
    ("peek", b"peek-buried"),
    ("stats", b"stats"),
    ("list-tubes", b"list-tubes"),
    ("any", b"list-tube-used"),
    ("any", b"list-tubes-watched"),
)

#: Well framed but wrong: an error reply, and the connection carries on.
MALFORMED = (
    b"delete abc\r\n",
    b"frobnicate other\r\n",
    b"use -other\r\n",
    b"use other extra\r\n",
    b"stats-tube  other\r\n",
    b"kick -1\r\n",
    b"reserve-with-timeout -1\r\n",
    b"peek 18446744073709551616\r\n",
    b"pause-tube other\r\n",
    b"release 1 2\r\n",
    b"watch\r\n",
    b"ignore \r\n",
    b"\r\n",
    b"put 0 0 60 2000\r\n" + b"d" * 2000 + b"\r\n",  # JOB_TOO_BIG once the body is skipped
    b"put 0 0 60 3\r\nabcXY",  # EXPECTED_CRLF: the 3+2 bytes after the line do not end in CRLF
)

#: The proxy cannot know where the next command starts: BAD_FORMAT and close.
CLOSERS = (
    b"put 0 0 60 abc\r\nuse other\r\n",
    b"put -1 0 60 1\r\nx\r\n",
    b"put 0 0 60\r\n",
    b"put 0 0 60 99999999999\r\n",
    b"putx\r\n",
    b"quitx\r\n",
    b"pause-tubeother 3600\r\n",
    b"use mi\rne\r\nwatch other\r\n",
    b"stats\nuse other\r\n",
    b"use mi\x00ne\r\n",
    b"use other" + b" " * 300 + b"\r\n",
)


def gen_tube(ch: Chooser) -> bytes:
    # "mine" as often as all the others together, so allowed paths get exercised too
    return (MINE if ch.integer(0, 1) else ch.choice(OTHER_NAMES)).encode()


def gen_job(ch: Chooser) -> int:
    # foreign ids, the tenant's own (9, 10 and whatever it puts) and ids that do not exist
    return ch.choice(sorted(NEVER_SHOWN)) if ch.integer(0, 1) else ch.integer(0, 40)


def gen_u32(ch: Chooser) -> int:
    return ch.integer(0, 10) if ch.integer(0, 1) else ch.integer(0, 2**32 - 1)


def gen_valid(ch: Chooser) -> Atom:
    kind = ch.integer(0, 14)
    if kind == 0:
        body = ch.binary(40)
        pri, delay, ttr = gen_u32(ch), ch.choice((0, 0, 0, 1, 3600)), ch.choice((0, 1, 60, 3600))
        return Atom(b"put %d %d %d %d\r\n%s\r\n" % (pri, delay, ttr, len(body), body), ("put",))
    if kind in (1, 2, 3, 4):
        name = ("use", "watch", "ignore", "stats-tube")[kind - 1]
        return Atom(b"%s %s\r\n" % (name.encode(), gen_tube(ch)), (name,))
    if kind == 5:
        tube = gen_tube(ch)
        # never pause "mine" for real: a later reserve from it would block
        delay = 0 if tube == MINE.encode() else ch.choice((0, 1, 3600))
        return Atom(b"pause-tube %s %d\r\n" % (tube, delay), ("pause-tube",))
    if kind == 6:
        return Atom(b"reserve-with-timeout 0\r\n", ("reserve",))
    if kind == 7:
        # a blocking reserve that cannot block: it is denied unless "mine" is the only
        # watched tube, and then the job just put is ready
        return Atom(b"use mine\r\nput 0 0 60 1\r\nx\r\nreserve\r\n", ("use", "put", "reserve"))
    if kind == 8:
        return Atom(b"watch mine\r\nignore default\r\n", ("watch", "ignore"))  # consumers do
    if kind == 9:
        name, job = ch.choice(JOB_OPS), gen_job(ch)
        return Atom(b"%s %d\r\n" % (name.encode(), job), (name,), job=job)
    if kind == 10:
        job, pri, delay = gen_job(ch), gen_u32(ch), ch.choice((0, 1, 3600))
        if ch.integer(0, 1):
            return Atom(b"release %d %d %d\r\n" % (job, pri, delay), ("release",), job=job)
        return Atom(b"bury %d %d\r\n" % (job, pri), ("bury",), job=job)
    if kind == 11:
        return Atom(b"kick %d\r\n" % ch.integer(0, 20), ("kick",))
    if kind == 12:
        # look a job up, then peek it: what the first command taught the proxy about the
        # job must not let the peek skip its own checks
        name, job = ch.choice(("stats-job", "kick-job", "delete", "reserve-job")), gen_job(ch)
        return Atom(b"%s %d\r\npeek %d\r\n" % (name.encode(), job, job), (name, "peek"), job=job)
    name, line = ch.choice(NO_ARG)
    return Atom(line + b"\r\n", (name,))


def gen_step(ch: Chooser) -> tuple[Atom, bool]:
    """(atom, pipelined with the atoms before it): mostly valid commands, some malformed
    lines and a few closes (which are always sent alone)."""
    roll = ch.integer(0, 19)
    if roll == 0:
        return Atom(ch.choice(CLOSERS), closes=b"BAD_FORMAT\r\n"), False
    if roll == 1:
        return Atom(b"quit\r\n", closes=b""), False
    if roll in (2, 3):
        return Atom(ch.choice(MALFORMED), ("error",)), bool(ch.integer(0, 1))
    return gen_valid(ch), bool(ch.integer(0, 1))


def gen_steps(ch: Chooser) -> list[tuple[Atom, bool]]:
    return [gen_step(ch) for _ in range(ch.integer(30, 45))]


def check_reply(kind: str, line: bytes, body: bytes | None, job: int | None = None) -> None:
    """Per-reply isolation checks (replies are in command order)."""
    head = line.split(b" ")
    assert head[0] != b"NOT_PERMITTED" or kind not in ("any", "ignore", "error"), (kind, line)
    if job in FOREIGN_IDS:
        # another tenant's job is indistinguishable from a job that does not exist
        assert line == b"NOT_FOUND", (kind, job, line)
    if head[0] in (b"RESERVED", b"FOUND", b"INSERTED", b"BURIED") and len(head) > 1:
        assert int(head[1]) not in NEVER_SHOWN, (kind, line)
        if body is not None:
            assert not body.startswith(b"SECRET"), (kind, line)
    if head[0] == b"OK":
        text = (body or b"").decode("latin-1")
        if kind == "list-tubes":
            names = [x[2:] for x in text.splitlines() if x.startswith("- ")]
            assert set(names) <= {MINE}, names
        elif kind in ("stats-job", "stats-tube"):
            info = parse_yaml_map(body or b"")
            assert info.get("tube", info.get("name")) == MINE, info
        elif kind == "stats":
            assert "hostname: redacted" in text
    if kind == "use" and head[0] == b"USING":
        assert line == b"USING mine"


async def run_sequence(pki: PKI, steps: list[tuple[Atom, bool]]) -> None:
    port = free_port()
    proc = _spawn_beanstalkd(port, TEST_MAX_JOB, [])
    try:
        keep = await build_foreign_world(port)
        before = await server_view(port)
        observer = await direct(port)
        other_before = await observer.stats(b"stats-tube other")
        proxy = await start_proxy(pki, port, acl=ISOLATION_ACL)
        client: Client | None = None

        async def check_live() -> None:
            """While the tenant's connection is open: it created no tube (an unused empty
            tube vanishes when its last watcher goes) and does not use or watch ``other``."""
            _, body = await observer.call(b"list-tubes")
            names = {x[2:] for x in (body or b"").decode().splitlines() if x.startswith("- ")}
            assert names <= {"default", "other", MINE}, names
            now = await observer.stats(b"stats-tube other")
            for k in ("current-using", "current-watching", "current-waiting"):
                assert now[k] == other_before[k], (k, other_before[k], now[k])

        try:
            batch: list[Atom] = []

            async def flush() -> None:
                assert client is not None
                if not batch:
                    return
                await client.send(b"".join(a.data for a in batch))
                for atom in batch:
                    for kind in atom.kinds:
                        line, body = await client.reply(timeout=10)
                        check_reply(kind, line, body, atom.job)
                batch.clear()
                await check_live()

            for atom, pipelined in steps:
                if client is None:
                    client = await proxy.connect("worker")
                if not pipelined:
                    await flush()
                if atom.closes is not None:
                    await flush()
                    await client.send(atom.data)
                    got = await client.closed()
                    assert got == atom.closes, (atom, got)
                    await client.close()
                    client = None
                    continue
                batch.append(atom)
            if client is not None:
                await flush()
                # the connection is still usable at the end
                assert await line_of(client, b"list-tube-used") in (
                    b"USING default",
                    b"USING mine",
                )
                await client.close()
                client = None
        finally:
            if client is not None:
                await client.close()
            await proxy.server.close()
        after = await server_view(port)
        assert set(after["tubes"]) <= {"default", "other", MINE}, after["tubes"]
        for key in (*FOREIGN_TUBES, *sorted(FOREIGN_IDS)):
            assert after[key] == before[key], (key, before[key], after[key])
        assert after[UPLOADING_MINE] == before[UPLOADING_MINE]
        for j in (UPLOADING, UPLOADING_MINE):
            assert after[j]["state"] == "invalid"
        for t in FOREIGN_TUBES:
            assert after[t]["pause"] == "0" and after[t]["cmd-pause-tube"] == "0"
        await observer.close()
        for c in keep:
            await c.close()
    finally:
        proc.terminate()
        proc.wait(10)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_confined_principal_never_reaches_another_tube(pki: PKI, data: st.DataObject) -> None:
    steps = gen_steps(DataChooser(data))
    asyncio.run(run_sequence(pki, steps))


@pytest.mark.parametrize("seed", range(30))
def test_confined_principal_never_reaches_another_tube_seeded(pki: PKI, seed: int) -> None:
    """The same, from fixed seeds: broad and reproducible (hypothesis explores and shrinks)."""
    asyncio.run(run_sequence(pki, gen_steps(SeededChooser(seed))))


def test_isolation_world_is_as_described(pki: PKI) -> None:
    """The fixed world the randomized test relies on (ids, states) really is built."""

    async def check() -> None:
        port = free_port()
        proc = _spawn_beanstalkd(port, TEST_MAX_JOB, [])
        try:
            keep = await build_foreign_world(port)
            view = await server_view(port)
            for j, (tube, state) in FOREIGN.items():
                assert (view[j]["tube"], view[j]["state"]) == (tube, state)
            assert view["tubes"] == ["default", "mine", "other"]
            for j, tube in ((UPLOADING, "other"), (UPLOADING_MINE, MINE)):
                assert (view[j]["tube"], view[j]["state"]) == (tube, "invalid")
            for c in keep:
                await c.close()
        finally:
            proc.terminate()
            proc.wait(10)

    asyncio.run(check())

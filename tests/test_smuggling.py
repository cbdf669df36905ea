"""Smuggling attempts from ``docs/protocol.md`` (section 3) never reach beanstalkd as commands.

Each attempt is a byte sequence that beanstalkd 1.12 would frame differently from a naive
proxy (a malformed ``put`` line whose body spells a command, a stray ``\\r``, a bare ``\\n``, a
225- or 449-byte line, a prefix-matched command name). Through the proxy the client gets
``BAD_FORMAT`` and is disconnected, and beanstalkd's own counters, read over a direct
connection before and after, show that nothing of the attempt ran. Well-framed errors, on the
other hand, get the reply beanstalkd would give and the connection carries on, without the
bad line being forwarded.
"""

from __future__ import annotations

import pytest
from conftest import Beanstalkd, RunningProxy, direct, server_stats

Stats = dict[str, str]

#: what beanstalkd would run if the proxy forwarded the client's bytes
VICTIM = b"use victim\r\n"  # 12 bytes
TAIL = b"list-tube-used\r\n"


def _line(length: int) -> bytes:
    """A line of ``length`` bytes including its CRLF."""
    return b"x" * (length - 2) + b"\r\n"


SMUGGLES: dict[str, bytes] = {
    # malformed put lines: beanstalkd replies BAD_FORMAT, consumes no body and runs the body
    "put-extra-token": b"put 0 0 10 12 x\r\n" + VICTIM + b"\r\n",
    "put-plus": b"put 0 0 10 +12\r\n" + VICTIM + b"\r\n",
    "put-minus": b"put 0 0 10 -12\r\n" + VICTIM + b"\r\n",
    "put-hex": b"put 0 0 10 0xc\r\n" + VICTIM + b"\r\n",
    "put-tab": b"put 0\t0 10 12\r\n" + VICTIM + b"\r\n",
    "put-trailing-space": b"put 0 0 10 12 \r\n" + VICTIM + b"\r\n",
    "put-pri-2**32": b"put 4294967296 0 10 12\r\n" + VICTIM + b"\r\n",
    "put-bytes-2**32": b"put 0 0 10 4294967296\r\n" + VICTIM + b"\r\n",
    "put-nul": b"put 0 0 10 12\0\r\n" + VICTIM + b"\r\n",
    "put-missing-field": b"put 0 0 12\r\n" + VICTIM + b"\r\n",
    "put-bare-lf-junk": b"put 0 0 10 12\nx\r\n" + VICTIM + b"\r\n",
    "put-no-args": b"put\r\n" + VICTIM,
    # stray CR: beanstalkd sees no line end yet and later resynchronises somewhere else
    "stray-cr-stats": b"stats\r\r\n" + TAIL,
    "stray-cr-use": b"use foo\rbar\r\n" + VICTIM,
    "stray-cr-then-many": b"stats\rX\r\n" + TAIL * 20,
    # bare LF: just another byte of the line for beanstalkd
    "bare-lf-stats": b"stats\nlist-tube-used\r\n",
    "bare-lf-kick": b"kick 3\nuse victim\r\n",
    "bare-lf-quit": b"quit\nlist-tube-used\r\n",
    # lines over 224 bytes: at 225 and 449 beanstalkd also swallows the next line (the put
    # line) and runs the put body
    "line-225-then-put": _line(225) + b"put 0 0 10 12\r\n" + VICTIM + b"\r\n",
    "line-449-then-put": _line(449) + b"put 0 0 10 12\r\n" + VICTIM + b"\r\n",
    "line-226": _line(226) + VICTIM,
    "line-300": _line(300) + VICTIM,
    "pause-tube-225": b"pause-tube " + b"t" * 200 + b" 04294967295\r\n" + VICTIM,
    # prefix-matched command names
    "quitX": b"quitX\r\n" + VICTIM,
    "quit-now": b"quit now\r\n" + VICTIM,
    "pause-tube-prefix": b"pause-tubedefault 0\r\n" + VICTIM,
    "pause-tube-prefix-tab": b"pause-tube\tdefault 0\r\n" + VICTIM,
    # NUL inside a line
    "nul-in-use": b"use fo\0o\r\n" + VICTIM,
}


def _counters(st: Stats) -> dict[str, int]:
    keep = ("current-tubes", "total-jobs", "current-jobs-ready", "current-connections")
    return {k: int(v) for k, v in st.items() if k.startswith("cmd-") or k in keep}


def _diff(before: Stats, after: Stats) -> dict[str, int]:
    b, a = _counters(before), _counters(after)
    return {k: a[k] - b[k] for k in a if a[k] != b[k]}


@pytest.mark.parametrize("payload", list(SMUGGLES.values()), ids=list(SMUGGLES))
async def test_smuggling_attempt_is_refused_and_nothing_runs(
    proxy: RunningProxy, beanstalkd: Beanstalkd, payload: bytes
) -> None:
    before = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    await c.send(payload + TAIL)
    assert await c.closed() == b"BAD_FORMAT\r\n"
    await c.close()
    after = await server_stats(beanstalkd.port)
    # only our own second `stats` connection shows; no tube, job or command came from the
    # proxied connection, and its upstream connection is gone again
    assert _diff(before, after) == {"cmd-stats": 1}
    assert int(after["total-connections"]) <= int(before["total-connections"]) + 2
    d = await direct(beanstalkd.port)
    assert await d.line(b"stats-tube victim") == b"NOT_FOUND"
    await d.close()


async def test_smuggling_after_valid_commands_runs_only_the_valid_ones(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    """Valid commands before the attempt are answered in order, then BAD_FORMAT and close."""
    before = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    await c.send(
        b"use mine\r\nput 0 0 10 2\r\nok\r\n" + SMUGGLES["put-plus"] + b"put 0 0 10 2\r\nno\r\n"
    )
    assert await c.closed() == b"USING mine\r\nINSERTED 1\r\nBAD_FORMAT\r\n"
    await c.close()
    after = await server_stats(beanstalkd.port)
    diff = _diff(before, after)
    assert diff == {
        "cmd-stats": 1,
        "cmd-use": 1,
        "cmd-put": 1,
        "total-jobs": 1,
        "current-jobs-ready": 1,
        "current-tubes": 1,
    }


async def test_smuggling_split_across_writes(proxy: RunningProxy, beanstalkd: Beanstalkd) -> None:
    """The attempt arrives in pieces (the CR in one record, the rest in another)."""
    before = await server_stats(beanstalkd.port)
    c = await proxy.connect("admin")
    assert await c.line(b"list-tube-used") == b"USING default"
    await c.send(b"stats\r")
    await c.send(b"\r\nuse victim\r\n")
    assert await c.closed() == b"BAD_FORMAT\r\n"
    await c.close()
    after = await server_stats(beanstalkd.port)
    assert _diff(before, after) == {"cmd-stats": 1, "cmd-list-tube-used": 1}


# --- well-framed errors: answered like beanstalkd, never forwarded, connection survives ------

WELL_FRAMED: dict[str, tuple[bytes, bytes]] = {
    "statsX": (b"statsX", b"BAD_FORMAT"),
    "stats-space": (b"stats ", b"BAD_FORMAT"),
    "reservefoo": (b"reservefoo", b"BAD_FORMAT"),
    "PUT": (b"PUT", b"UNKNOWN_COMMAND"),
    "empty": (b"", b"UNKNOWN_COMMAND"),
    "leading-space": (b" stats", b"UNKNOWN_COMMAND"),
    "use-two-spaces": (b"use  foo", b"BAD_FORMAT"),
    "use-trailing-space": (b"use foo ", b"BAD_FORMAT"),
    "use-tab": (b"use\tfoo", b"UNKNOWN_COMMAND"),
    "use-dash": (b"use -foo", b"BAD_FORMAT"),
    "use-colon": (b"use a:b", b"BAD_FORMAT"),
    "use-201": (b"use " + b"n" * 201, b"BAD_FORMAT"),
    "use-high-byte": (b"use a\xffb", b"BAD_FORMAT"),
    "high-byte-name": (b"\xffuse x", b"UNKNOWN_COMMAND"),
    "delete-abc": (b"delete abc", b"BAD_FORMAT"),
    "delete-plus": (b"delete +1", b"BAD_FORMAT"),
    "delete-2**64": (b"delete 18446744073709551616", b"BAD_FORMAT"),
    "kick-minus-1": (b"kick -1", b"BAD_FORMAT"),
    "kick-2**32": (b"kick 4294967296", b"BAD_FORMAT"),
    "kick-plus": (b"kick +2", b"BAD_FORMAT"),
    "kick-junk": (b"kick 2 junk", b"BAD_FORMAT"),
    "kick-hex": (b"kick 0x5", b"BAD_FORMAT"),
    "rwt-abc": (b"reserve-with-timeout abc", b"BAD_FORMAT"),
    "rwt-minus-1": (b"reserve-with-timeout -1", b"BAD_FORMAT"),
    "rwt-2**31": (b"reserve-with-timeout 2147483648", b"BAD_FORMAT"),
    "rwt-junk": (b"reserve-with-timeout 0 junk", b"BAD_FORMAT"),
    "pause-tube-trailing-space": (b"pause-tube default 0 ", b"BAD_FORMAT"),
}


@pytest.mark.parametrize(("line", "reply"), list(WELL_FRAMED.values()), ids=list(WELL_FRAMED))
async def test_well_framed_error_keeps_connection_and_is_not_forwarded(
    proxy: RunningProxy, beanstalkd: Beanstalkd, line: bytes, reply: bytes
) -> None:
    # a buried job, so that a forwarded `kick` would show
    d = await direct(beanstalkd.port)
    assert await d.put(b"buried") == b"INSERTED 1"
    assert (await d.call(b"reserve"))[0] == b"RESERVED 1 6"
    assert await d.line(b"bury 1 0") == b"BURIED"
    before = await d.stats()

    c = await proxy.connect("admin")
    await c.send(line + b"\r\n" + TAIL)
    assert await c.reply() == (reply, None)
    assert await c.reply() == (b"USING default", None)
    # still usable
    assert await c.put(b"after") == b"INSERTED 2"

    after = await d.stats()
    assert _diff(before, after) == {
        "cmd-stats": 1,
        "cmd-list-tube-used": 1,
        "cmd-put": 1,
        "total-jobs": 1,
        "current-jobs-ready": 1,
        "current-connections": 1,  # the proxied connection, still open
    }
    assert (await d.stats(b"stats-job 1"))["state"] == "buried"
    await c.close()
    await d.close()


async def test_well_framed_errors_pipelined_keep_order(
    proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    """All the well-framed errors in one write, interleaved with forwarded commands: the
    proxy's own replies take their turn between beanstalkd's."""
    data = bytearray()
    want: list[bytes] = []
    for i, (line, reply) in enumerate(WELL_FRAMED.values(), start=1):
        data += line + b"\r\nput 0 0 10 1\r\nx\r\n"
        want += [reply, b"INSERTED %d" % i]
    c = await proxy.connect("admin")
    await c.send(bytes(data))
    got = [(await c.reply())[0] for _ in want]
    assert got == want
    st = await server_stats(beanstalkd.port)
    assert st["cmd-put"] == str(len(WELL_FRAMED))
    assert st["cmd-kick"] == "0"
    assert st["cmd-reserve-with-timeout"] == "0"
    assert st["cmd-delete"] == "0"
    assert st["cmd-use"] == "0"
    await c.close()


async def test_longest_valid_line_is_forwarded(proxy: RunningProxy, beanstalkd: Beanstalkd) -> None:
    """224 bytes including CRLF is beanstalkd's limit and still a command (the 225-byte variant
    is in SMUGGLES)."""
    name = b"t" * 200
    line = b"pause-tube " + name + b" 4294967295"
    assert len(line) + 2 == 224
    c = await proxy.connect("admin")
    assert await c.line(b"use " + name) == b"USING " + name
    assert await c.line(line) == b"PAUSED"
    st = await server_stats(beanstalkd.port)
    assert st["cmd-pause-tube"] == "1"
    await c.close()

"""Real client libraries notice the proxy's denials: greenstalk, pystalk and pystalkd
in-process, Pheanstalk (PHP), beaneater (Ruby), fivebeans and jackd (Node) through the driver
scripts in tests/clients/. Each library talks plain TCP to the client tunnel, which carries it
over mutual TLS to an in-process proxy in front of a real beanstalkd, as a principal that may
not ``use``/``watch`` tube ``secret``, may only inspect tube ``drop`` (so ``put`` and ``kick``
there are denied), may not consume ``default`` (so ``reserve`` is denied) and may not delete
others' jobs; it may produce and consume on ``open``, which is the success case. The library
must raise for every denial, come back normally for the allowed calls, and stay in sync (a
``stats`` after each call on the same connection gets its own answer). The same drivers are
also checked against a fake server, which shows that a reply a library ignores fails the
check. Under CI=true a library that is not installed is a failure, elsewhere a skip.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, Beanstalkd, direct, parse_yaml_map, serving, start_tunnel

sys.path.insert(0, str(Path(__file__).resolve().parent / "clients"))

import libdrivers
from fakeserver import FakeServer

pytestmark = pytest.mark.integration

#: The principal is the ``worker`` test certificate (CN worker, OU jobs).
LIB_ACL: dict[str, Any] = {
    "principals": [{"name": "app", "match": {"cn": "worker", "ou": "jobs"}}],
    "rules": [
        {"principal": "app", "tubes": ["open"], "allow": ["produce", "consume", "inspect"]},
        {"principal": "app", "tubes": ["drop"], "allow": ["inspect"]},
        {"principal": "app", "allow": ["server"]},
    ],
}


def require(lib: str) -> None:
    """Skip (or, under CI, fail) when ``lib`` is not installed here."""
    why = libdrivers.missing(lib)
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{lib} is required in CI: {why}")
    pytest.skip(f"{lib} not installed: {why}")


@pytest.fixture(params=["compatible"])
async def app_tunnel(
    request: pytest.FixtureRequest, pki: PKI, beanstalkd: Beanstalkd
) -> AsyncIterator[int]:
    """Proxy (``acl_denial_reply`` = the param) and a client tunnel into it presenting the
    ``worker`` certificate; yields the tunnel's plain-TCP port."""
    async with serving(pki, beanstalkd.port, LIB_ACL, request.param) as proxy:
        tunnel = await start_tunnel(pki, proxy.port, "worker")
        try:
            assert tunnel.port is not None
            yield tunnel.port
        finally:
            await tunnel.close()


async def seed(beanstalkd: Beanstalkd) -> dict[str, int]:
    """One ready job in ``secret`` and one in ``drop``, put straight into beanstalkd."""
    c = await direct(beanstalkd.port)
    ids = {}
    try:
        for tube in ("secret", "drop"):
            assert await c.line(b"use " + tube.encode()) == b"USING " + tube.encode()
            line = await c.put(b"seeded")
            assert line.startswith(b"INSERTED "), line
            ids[tube] = int(line.split()[1])
    finally:
        await c.close()
    return ids


async def tube_counts(beanstalkd: Beanstalkd, tube: str) -> tuple[str, str]:
    """(current-jobs-ready, cmd-delete) of ``tube`` as beanstalkd sees it."""
    c = await direct(beanstalkd.port)
    try:
        line, body = await c.call(b"stats-tube " + tube.encode())
        assert line.startswith(b"OK "), line
        assert body is not None
        stats = parse_yaml_map(body)
        return stats["current-jobs-ready"], stats["cmd-delete"]
    finally:
        await c.close()


def denied_ops(ids: dict[str, int]) -> list[str]:
    return [
        "use:secret",  # no right at all on secret
        "watch:secret",
        "put:drop",  # use drop is allowed (inspect), put needs produce
        "reserve",  # watching default, which the principal may not consume
        "reserve-with-timeout",
        f"delete:{ids['secret']}",  # a job in a tube the principal cannot see
        f"delete:{ids['drop']}",  # a visible job this connection did not reserve (manage)
        "kick:drop",  # kick needs manage on the used tube
    ]


ALLOWED_OPS = ["use:open", "watch:open", "put:open"]


@pytest.mark.parametrize("lib", libdrivers.LIBRARIES)
async def test_library_raises_on_every_denial_through_the_proxy(
    lib: str, app_tunnel: int, beanstalkd: Beanstalkd
) -> None:
    require(lib)
    ids = await seed(beanstalkd)
    ops = denied_ops(ids) + ALLOWED_OPS
    results = await asyncio.to_thread(libdrivers.run, lib, app_tunnel, ops, 10.0)
    by_op = {r.op: r for r in results}
    assert [r.op for r in results] == ops
    denials = results[: len(ops) - len(ALLOWED_OPS)]
    if lib == "pystalk":  # it has no blocking reserve call
        assert by_op["reserve"].outcome == "n/a"
        denials.remove(by_op["reserve"])
    not_raised = [r for r in denials if r.outcome != "raised"]
    assert not not_raised, f"{lib} did not raise for these denials: {not_raised}"
    for op in ALLOWED_OPS:
        assert by_op[op].outcome == "returned", by_op[op]
    out_of_sync = [r for r in results if r.outcome != "n/a" and not r.sync.startswith("stats pid=")]
    assert not out_of_sync, f"{lib}: no stats answer after: {out_of_sync}"
    # The allowed put landed in `open`; the denied put and deletes changed nothing.
    assert await tube_counts(beanstalkd, "open") == ("1", "0")
    assert await tube_counts(beanstalkd, "drop") == ("1", "0")
    assert await tube_counts(beanstalkd, "secret") == ("1", "0")


@pytest.mark.parametrize("app_tunnel", ["explicit"], indirect=True)
@pytest.mark.parametrize("lib", ["pheanstalk", "beaneater"])
async def test_explicit_mode_is_missed_by_pheanstalk_and_beaneater(
    lib: str, app_tunnel: int, beanstalkd: Beanstalkd
) -> None:
    """Why ``compatible`` is the default: with ``acl_denial_reply: explicit`` (bare
    NOT_PERMITTED) these two libraries return normally from a denied use and watch."""
    require(lib)
    results = await asyncio.to_thread(
        libdrivers.run, lib, app_tunnel, ["use:secret", "watch:secret", "put:open"], 10.0
    )
    assert [r.outcome for r in results] == ["returned"] * 3, results


# --- the drivers themselves, against a fake server -------------------------------------------


@pytest.mark.parametrize("lib", libdrivers.LIBRARIES)
def test_driver_reports_raised_for_unknown_command_and_stays_in_sync(lib: str) -> None:
    """UNKNOWN_COMMAND is an error every library raises for (docs/denial-matrix.md)."""
    require(lib)
    ops = ["use:secret", "watch:secret", "put:drop", "reserve-with-timeout", "delete:7", "kick"]
    with FakeServer("UNKNOWN_COMMAND") as server:
        results = libdrivers.run(lib, server.port, ops, 10.0, server.drop_all)
    assert [r.op for r in results] == ops
    assert {r.outcome for r in results} == {"raised"}, results
    assert all(r.sync.startswith("stats pid=4242 uptime=") for r in results), results


@pytest.mark.parametrize(
    ("lib", "silent_op"),
    [("pheanstalk", "use:secret"), ("beaneater", "use:secret"), ("beaneater", "put")],
)
def test_driver_reports_a_missed_not_permitted(lib: str, silent_op: str) -> None:
    """The check above can fail: these libraries return normally on a bare NOT_PERMITTED."""
    require(lib)
    with FakeServer("NOT_PERMITTED") as server:
        [result] = libdrivers.run(lib, server.port, [silent_op], 10.0, server.drop_all)
    assert result.outcome == "returned", result
    assert result.sync == "stats pid=4242 uptime=1", result

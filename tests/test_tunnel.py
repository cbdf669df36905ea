"""Client mode: an unmodified beanstalkd client library (greenstalk, plain TCP) talks to the
local tunnel, which carries it over mutual TLS to the proxy and on to a real beanstalkd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import greenstalk
import pytest
from conftest import (
    LOOPS,
    PKI,
    Beanstalkd,
    LogReader,
    RunningProxy,
    direct,
    free_port,
    run_on,
    server_stats,
    start_proxy,
    start_tunnel,
    until,
)

from proxy.tunnel import TunnelServer


@pytest.fixture
async def admin_tunnel(pki: PKI, proxy: RunningProxy) -> AsyncIterator[TunnelServer]:
    t = await start_tunnel(pki, proxy.port, "admin")
    yield t
    await t.close()


def _greenstalk_session(port: int) -> tuple[int, bytes, int]:
    with greenstalk.Client(("127.0.0.1", port), use="jobs", watch="jobs", encoding=None) as c:
        job_id = c.put(b"payload\r\nwith CRLF\x00")
        job = c.reserve(timeout=5)
        c.delete(job)
        return job_id, job.body, job.id


async def test_greenstalk_through_tunnel_and_proxy(
    admin_tunnel: TunnelServer, beanstalkd: Beanstalkd
) -> None:
    port = admin_tunnel.port
    assert port is not None
    job_id, body, reserved_id = await asyncio.to_thread(_greenstalk_session, port)
    assert body == b"payload\r\nwith CRLF\x00"
    assert job_id == reserved_id
    stats = await server_stats(beanstalkd.port)
    assert stats["cmd-put"] == "1" and stats["cmd-delete"] == "1"
    assert stats["current-jobs-ready"] == "0"


def _greenstalk_denied(port: int) -> list[bytes]:
    statuses = []
    with greenstalk.Client(("127.0.0.1", port), encoding=None) as c:
        for attempt in (lambda: c.use("secrets.keys"), lambda: c.put(b"x")):
            try:
                attempt()
            except greenstalk.UnknownResponseError as exc:
                statuses.append(exc.status)
        c.use("invoices")  # the connection is still usable after denials
        c.put(b"ok")
    return statuses


async def test_tunnel_denial_reaches_library_as_error(
    pki: PKI, proxy: RunningProxy, beanstalkd: Beanstalkd
) -> None:
    t = await start_tunnel(pki, proxy.port, "billing")
    try:
        port = t.port
        assert port is not None
        statuses = await asyncio.to_thread(_greenstalk_denied, port)
        assert statuses == [b"NOT_PERMITTED", b"NOT_PERMITTED"]
    finally:
        await t.close()
    stats = await server_stats(beanstalkd.port)
    assert stats["cmd-put"] == "1" and stats["cmd-use"] == "1"


def _greenstalk_stats(port: int) -> dict[str, object]:
    with greenstalk.Client(("127.0.0.1", port)) as c:
        return dict(c.stats())


async def test_tunnel_refuses_proxy_with_wrong_hostname(pki: PKI, proxy: RunningProxy) -> None:
    t = await start_tunnel(pki, proxy.port, "admin", hostname="not-the-proxy.example")
    try:
        port = t.port
        assert port is not None
        with pytest.raises((ConnectionError, OSError, greenstalk.Error)):
            await asyncio.to_thread(_greenstalk_stats, port)
    finally:
        await t.close()


async def test_client_command_reloads_its_certificate_when_the_files_change(
    tmp_path: Path, pki: PKI, proxy: RunningProxy
) -> None:
    """The `client` CLI watches its certificate, key and CA like the server does."""
    cert, key = tmp_path / "me.pem", tmp_path / "me.key"
    admin_cert, admin_key = pki.cert("admin")
    shutil.copy(admin_cert, cert)
    shutil.copy(admin_key, key)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "client", "--listen", f"127.0.0.1:{port}",
         "--connect", f"127.0.0.1:{proxy.port}", "--server-name", "localhost",
         "--cert", str(cert), "--key", str(key), "--ca", pki.ca],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    log = LogReader(proc)
    try:
        await log.wait_for(r"ready: tunnel listening")
        other_cert, other_key = pki.cert("inspector")
        for src, dst in ((other_cert, cert), (other_key, key)):
            tmp = dst.with_suffix(".tmp")
            shutil.copy(src, tmp)
            os.replace(tmp, dst)  # atomic, like a secret update
        await log.wait_for(r"reload: client certificate, key and CA reloaded", timeout=25)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        assert proc.stderr is not None
        proc.stderr.close()


# --- nothing lost at the edges (issue 9, item 7 and 8), on asyncio and uvloop ----------------

FIRE_AND_FORGET = b"put 0 0 60 5\r\nhello\r\nquit\r\n"


class Gate:
    """A TCP forwarder in front of the proxy that holds every connection until ``open()``:
    the tunnel's TLS leg is then certainly not up while the local client sends and leaves."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.opened = asyncio.Event()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._changed = asyncio.Event()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def wait_accepted(self, n: int) -> None:
        async with asyncio.timeout(10):
            while self.accepted < n:
                self._changed.clear()
                await self._changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.accepted += 1
        self._changed.set()
        await self.opened.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers.append(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for w in self._writers:
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def gated_tunnel(
    pki: PKI, beanstalkd_port: int
) -> AsyncIterator[tuple[RunningProxy, Gate, TunnelServer, int]]:
    """A proxy, a ``Gate`` in front of it and an admin tunnel through the gate (with its local
    port), all closed afterwards."""
    proxy = await start_proxy(pki, beanstalkd_port)
    gate = Gate(proxy.port)
    tunnel = await start_tunnel(pki, await gate.start(), "admin")
    try:
        assert tunnel.port is not None
        yield proxy, gate, tunnel, tunnel.port
    finally:
        await tunnel.close()
        await gate.close()
        await proxy.server.close()


async def beanstalkd_connections(port: int) -> int:
    """beanstalkd's ``current-connections``, not counting the connection that asks."""
    return int((await server_stats(port))["current-connections"]) - 1


async def no_leak(proxy: RunningProxy, tunnel: TunnelServer, beanstalkd_port: int) -> None:
    """Every tunnel, proxy and beanstalkd connection is gone again (bounded polling)."""

    async def gone() -> bool:
        return (
            not tunnel._pipes
            and not proxy.server.connections
            and proxy.server.handshaking == 0
            and await beanstalkd_connections(beanstalkd_port) == 0
        )

    await until(gone, "all tunnel, proxy and beanstalkd connections closed")


async def fire_and_forget(port: int, data: bytes = FIRE_AND_FORGET) -> None:
    """A producer that sends and closes at once, reading nothing."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def jobs_ready(port: int, n: int) -> bool:
    stats = await server_stats(port)
    return stats["cmd-put"] == str(n) and stats["current-jobs-ready"] == str(n)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_fire_and_forget_producer_through_the_tunnel(
    pki: PKI, beanstalkd: Beanstalkd, loop_name: str
) -> None:
    """``put`` + ``quit`` sent and closed before the TLS leg is up: the job is inserted and
    every connection (tunnel, TLS, beanstalkd) is closed afterwards."""

    async def scenario() -> None:
        async with gated_tunnel(pki, beanstalkd.port) as (proxy, gate, tunnel, port):
            # before the TLS leg exists: the gate holds it until the clients are gone
            for _ in range(3):
                await fire_and_forget(port)
            await gate.wait_accepted(3)
            assert (await server_stats(beanstalkd.port))["cmd-put"] == "0"
            gate.opened.set()
            await until(lambda: jobs_ready(beanstalkd.port, 3), "3 jobs inserted")
            await no_leak(proxy, tunnel, beanstalkd.port)
            # and racing the handshake, the way a real producer does
            for _ in range(20):
                await fire_and_forget(port)
            await until(lambda: jobs_ready(beanstalkd.port, 23), "23 jobs inserted")
            await no_leak(proxy, tunnel, beanstalkd.port)

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_fire_and_forget_without_quit_and_a_client_that_sent_nothing(
    pki: PKI, beanstalkd: Beanstalkd, loop_name: str
) -> None:
    """Without ``quit`` the proxy does not close by itself: the tunnel closes once the reply
    came and no other followed (``linger``); a client that sent nothing is closed at once."""

    async def scenario() -> None:
        async with gated_tunnel(pki, beanstalkd.port) as (proxy, gate, tunnel, port):
            await fire_and_forget(port, b"put 0 0 60 5\r\nhello\r\n")
            await fire_and_forget(port, b"")
            await gate.wait_accepted(2)
            gate.opened.set()
            await until(lambda: jobs_ready(beanstalkd.port, 1), "1 job inserted")
            await no_leak(proxy, tunnel, beanstalkd.port)

    run_on(loop_name, scenario())


@pytest.mark.parametrize("early", [False, True], ids=["after-tls", "before-tls"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_half_closing_client_gets_its_replies(
    pki: PKI, beanstalkd: Beanstalkd, loop_name: str, early: bool
) -> None:
    """``list-tube-used`` then a FIN (``shutdown(SHUT_WR)``): the replies come back through
    the tunnel, as they would from beanstalkd directly, then the tunnel closes."""

    async def scenario() -> None:
        async with gated_tunnel(pki, beanstalkd.port) as (proxy, gate, tunnel, port):
            if not early:
                gate.opened.set()
                warm = await direct(port)  # the TLS leg of this one is up...
                assert await warm.line(b"list-tube-used") == b"USING default"
                reader, writer = warm.reader, warm.writer
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"use half\r\nlist-tube-used\r\nput 0 0 60 2\r\nhi\r\n")
            writer.write_eof()
            if early:
                await gate.wait_accepted(1)
                gate.opened.set()
            async with asyncio.timeout(10):
                replies = await reader.read()  # until the tunnel closes
            assert replies == b"USING half\r\nUSING half\r\nINSERTED 1\r\n"
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await no_leak(proxy, tunnel, beanstalkd.port)
            assert (await server_stats(beanstalkd.port))["current-jobs-ready"] == "1"

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_client_gone_with_a_reset_before_the_tls_leg_still_delivers(
    pki: PKI, beanstalkd: Beanstalkd, loop_name: str
) -> None:
    """The local client resets its connection (SO_LINGER 0) right after sending, while the
    TLS leg is held: what the tunnel read from it is still delivered, and both legs close."""

    async def scenario() -> None:
        async with gated_tunnel(pki, beanstalkd.port) as (proxy, gate, tunnel, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(FIRE_AND_FORGET)
            await writer.drain()
            await gate.wait_accepted(1)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            gate.opened.set()
            await until(lambda: jobs_ready(beanstalkd.port, 1), "1 job inserted")
            await no_leak(proxy, tunnel, beanstalkd.port)

    run_on(loop_name, scenario())

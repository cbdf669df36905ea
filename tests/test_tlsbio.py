"""The proxy's own TLS transport (``proxy/tlsbio.py``, ``tls.transport: builtin``) against a real
beanstalkd and real TLS, on the stdlib asyncio loop and on uvloop, with the stock transports
(``tls.transport: stock``) as the contrast where the two differ.

Covered: a TLS 1.3 client that half-closes (close_notify, or a bare FIN) still gets every reply
and the proxy's close_notify; a TLS 1.2 client's close_notify is answered at once (the
documented limit); refused handshakes reach the client as the TLS alert naming the reason
(Python's ``ssl`` and ``openssl s_client``); a client that does not read its replies keeps the
proxy's buffers bounded and loses nothing once it reads; an idle connection allocates little.

Each test runs its own event loop (``run``), so one test body covers both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import socket
import ssl
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PKI,
    Beanstalkd,
    LogWatch,
    RunningProxy,
    run_on,
    server_stats,
    until,
)
from conftest import serving as proxy_serving
from pki_helpers import make_client_cert, utcnow

from proxy.certs import revoke
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.protocol import ClientParser, ReplyParser
from proxy.relay import Connection, _Upstream
from proxy.session import Session
from proxy.shadow import ShadowView
from proxy.tlsbio import CHUNK, TLSTransport
from proxy.tlsctx import revocation_check, server_context

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
TRANSPORTS = pytest.mark.parametrize("transport", ["builtin", "stock"])


def serving(
    pki: PKI, beanstalkd: Beanstalkd, transport: str | None, crl: str | None = None
) -> contextlib.AbstractAsyncContextManager[RunningProxy]:
    """The proxy with ``tls.transport`` set to ``transport`` (None: the configured default)."""
    tls: dict[str, Any] = {"crl": (crl,) if crl else ()}
    if transport:
        tls["transport"] = transport
    return proxy_serving(pki, beanstalkd.port, tls=tls)


class BioClient:
    """A blocking TLS client over ``ssl.MemoryBIO``, so a test decides exactly which records
    and TCP segments go out (close_notify, FIN). Run it in a thread."""

    def __init__(self, port: int, ctx: ssl.SSLContext, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(30)
        if rcvbuf:  # a fixed receive buffer (no autotuning), set before connecting
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.send()
                self.recv()
        self.send()

    def send(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def recv(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def read_all(self) -> tuple[bytes, str]:
        """Everything until the server's close_notify; and how it ended: "close_notify",
        "eof" (a FIN without it), "reset", or the reason of a TLS alert."""
        data = b""
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                self.send()
                try:
                    self.recv()
                except ConnectionResetError:
                    return data, "reset"
                continue
            except ssl.SSLEOFError:
                return data, "eof"
            except ssl.SSLZeroReturnError:  # close_notify, after ours
                return data, "close_notify"
            except ssl.SSLError as exc:
                return data, str(exc.reason)
            if not chunk:
                return data, "close_notify"
            data += chunk

    def read_exactly(self, n: int) -> tuple[bytes, str]:
        """``n`` bytes of application data (fewer if the connection ends first)."""
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.obj.read(min(n - len(data), 65536))
            except ssl.SSLWantReadError:
                self.recv()
                continue
            except ssl.SSLError as exc:
                return bytes(data), str(exc.reason)
            if not chunk:
                return bytes(data), "close_notify"
            data += chunk
        return bytes(data), ""

    def close(self) -> None:
        self.sock.close()


def client_ctx(pki: PKI, name: str | None, version: str = "1.3") -> ssl.SSLContext:
    ctx = pki.client_context(name)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    return ctx


# --- half-close ---------------------------------------------------------------------------------

PIPELINE = b"use t\r\nput 0 0 60 5\r\nhello\r\nlist-tube-used\r\n"


@LOOPS
@pytest.mark.parametrize(
    ("version", "how"),
    [("1.3", "close_notify"), ("1.3", "close_notify+fin"), ("1.3", "fin"), ("1.2", "fin")],
)
def test_half_closing_client_gets_its_replies(
    loop: str, version: str, how: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """TLS 1.3 half-closes with close_notify, a FIN or both; a bare FIN (no close_notify) is a
    TCP half-close on TLS 1.2 too: the replies arrive, then the proxy's close_notify."""

    def client(port: int) -> tuple[bytes, str]:
        c = BioClient(port, client_ctx(pki, "admin", version))
        try:
            assert c.obj.version() == f"TLSv{version}"
            c.obj.write(PIPELINE)
            if how.startswith("close_notify"):
                with contextlib.suppress(ssl.SSLWantReadError):
                    c.obj.unwrap()  # our close_notify, in the same segment as the commands
            c.send()
            if how.endswith("fin"):
                c.sock.shutdown(socket.SHUT_WR)
            return c.read_all()
        finally:
            c.close()

    async def main() -> None:
        async with serving(pki, beanstalkd, "builtin") as proxy:
            data, end = await asyncio.to_thread(client, proxy.port)
            assert data.startswith(b"USING t\r\nINSERTED "), data
            assert data.endswith(b"\r\nUSING t\r\n"), data
            assert end == "close_notify"  # the proxy closed cleanly once the replies were out
            await until(lambda: not proxy.server.connections)
        stats = await server_stats(beanstalkd.port)
        assert stats["cmd-put"] == "1" and stats["cmd-list-tube-used"] == "1"
        assert stats["current-jobs-ready"] == "1"

    run_on(loop, main())


@LOOPS
def test_tls12_close_notify_is_answered_at_once(
    loop: str, pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    """TLS 1.2 has no half-close (RFC 5246 7.2.1): the proxy answers the client's close_notify
    with its own at once and closes the socket, without the replies; the commands sent before
    it still all run in beanstalkd (the relay drains them upstream), as the README says."""

    def client(port: int) -> tuple[bytes, str]:
        c = BioClient(port, client_ctx(pki, "admin", "1.2"))
        try:
            assert c.obj.version() == "TLSv1.2"
            c.obj.write(PIPELINE)
            with contextlib.suppress(ssl.SSLWantReadError):
                c.obj.unwrap()
            c.send()  # commands and close_notify in one segment
            return c.read_all()
        finally:
            c.close()

    async def main() -> None:
        async with serving(pki, beanstalkd, "builtin") as proxy:
            data, end = await asyncio.to_thread(client, proxy.port)
            assert (data, end) == (b"", "close_notify")
            await conn_log.wait_for(lambda m: m.startswith("close ") and "client closed" in m)

        async def ran() -> bool:
            stats = await server_stats(beanstalkd.port)
            return stats["cmd-put"] == "1" and stats["cmd-list-tube-used"] == "1"

        await until(ran, "beanstalkd ran the commands", 10)

    run_on(loop, main())


@LOOPS
def test_tls13_client_that_closes_fully_still_has_its_commands_run(
    loop: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """A fire-and-forget producer: put, close_notify, close the socket without reading."""

    def client(port: int) -> None:
        c = BioClient(port, client_ctx(pki, "admin"))
        c.obj.write(b"put 0 0 60 5\r\nhello\r\n")
        with contextlib.suppress(ssl.SSLWantReadError):
            c.obj.unwrap()
        c.send()
        c.close()

    async def main() -> None:
        async with serving(pki, beanstalkd, "builtin") as proxy:
            await asyncio.to_thread(client, proxy.port)
            deadline = time.monotonic() + 10
            while (await server_stats(beanstalkd.port))["cmd-put"] != "1":
                assert time.monotonic() < deadline, "the put never reached beanstalkd"
                await asyncio.sleep(0.01)
            await until(lambda: not proxy.server.connections and not proxy.server.handshaking)

    run_on(loop, main())


# --- refusals a client can read -----------------------------------------------------------------


def _refusal_ctx(pki: PKI, case: str, tmp: Path) -> tuple[ssl.SSLContext, str | None]:
    """The client context for ``case`` and the CRL the proxy needs for it (if any)."""
    if case == "no_certificate":
        return client_ctx(pki, None), None
    if case == "unknown_ca":
        ctx = pki.client_context("admin", ca_dir=pki.other)
        return ctx, None
    if case == "revoked":
        ca = tmp / "ca"
        shutil.copytree(pki.dir, ca)
        revoke(ca, ca / "admin.pem")
        return pki.client_context("admin"), str(ca / "crl.pem")
    assert case == "expired"
    now = utcnow()
    cert, key = make_client_cert(
        pki.dir,
        tmp,
        "expired",
        cn="admin",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(cert, key)
    return ctx, None


#: What the client's OpenSSL reports for the alert the proxy's OpenSSL sends.
ALERTS = {
    ("no_certificate", "1.3"): "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    ("no_certificate", "1.2"): "SSLV3_ALERT_HANDSHAKE_FAILURE",
    ("unknown_ca", "1.3"): "TLSV1_ALERT_UNKNOWN_CA",
    ("unknown_ca", "1.2"): "TLSV1_ALERT_UNKNOWN_CA",
    ("revoked", "1.3"): "SSLV3_ALERT_CERTIFICATE_REVOKED",
    ("revoked", "1.2"): "SSLV3_ALERT_CERTIFICATE_REVOKED",
    ("expired", "1.3"): "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    ("expired", "1.2"): "SSLV3_ALERT_CERTIFICATE_EXPIRED",
}


def _attempt(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake, send a command, read: the reason of the TLS alert that ended it (or how it
    ended otherwise). A refused client must never get a reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = None
    try:
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls.sendall(b"list-tube-used\r\n")
        data = tls.recv(100)
    except ssl.SSLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return type(exc).__name__
    finally:
        (tls or sock).close()
    assert data == b"", data
    return "eof"


@LOOPS
@TRANSPORTS
@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("case", ["no_certificate", "unknown_ca", "revoked", "expired"])
def test_refused_handshake_ends_with_the_alert_naming_the_reason(
    loop: str,
    transport: str,
    version: str,
    case: str,
    pki: PKI,
    beanstalkd: Beanstalkd,
    conn_log: LogWatch,
    tmp_path: Path,
) -> None:
    ctx, crl = _refusal_ctx(pki, case, tmp_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3

    async def main() -> str:
        async with serving(pki, beanstalkd, transport, crl) as proxy:
            how = await asyncio.to_thread(_attempt, proxy.port, ctx)
            await conn_log.wait_for(lambda m: m.startswith("handshake failed"))
            assert proxy.server.connections == set()
            return how

    how = run_on(loop, main())
    alert = ALERTS[case, version]
    if transport == "builtin":
        assert how == alert
    else:
        # the contrast: the stock transports drop OpenSSL's alert; the client sees an EOF
        assert how != alert
        assert "ALERT" not in how, how


def target(proxy: RunningProxy) -> list[str]:
    return ["-connect", f"127.0.0.1:{proxy.port}"]


@LOOPS
@TRANSPORTS
def test_openssl_s_client_sees_certificate_required(
    loop: str, transport: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command line tool is needed"

    async def main() -> str:
        async with serving(pki, beanstalkd, transport) as proxy:
            out = await asyncio.to_thread(
                subprocess.run,
                [openssl, "s_client", "-quiet", "-tls1_3", "-CAfile", pki.ca, *target(proxy)],
                input=b"list-tube-used\r\n",
                capture_output=True,
                timeout=20,
            )
            return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")

    output = run_on(loop, main())
    assert "USING" not in output
    if transport == "builtin":
        assert "tlsv13 alert certificate required" in output, output
    else:
        assert "alert" not in output, output


# --- backpressure ---------------------------------------------------------------------------------


def _client_conn(proxy: RunningProxy) -> Connection:
    (conn,) = proxy.server.connections
    return conn


@LOOPS
@TRANSPORTS
def test_client_that_does_not_read_keeps_the_proxy_bounded(
    loop: str, transport: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """About 20 MB of replies to pipelined ``peek`` commands, the client reading none of them
    (a small socket receive buffer, no reads): the proxy stops reading (client and upstream)
    with a bounded amount buffered, and once the client reads, every reply arrives, in order."""
    body = b"x" * 1000
    n = 20000

    async def main() -> None:
        async with serving(pki, beanstalkd, transport) as proxy:
            c = await asyncio.to_thread(BioClient, proxy.port, client_ctx(pki, "admin"), 65536)
            try:
                c.obj.write(b"put 0 0 60 1000\r\n" + body + b"\r\n")
                c.send()
                head, _ = await asyncio.to_thread(c.read_exactly, len(b"INSERTED 1\r\n"))
                assert head == b"INSERTED 1\r\n", head
                await until(lambda: len(proxy.server.connections) == 1)
                conn = _client_conn(proxy)
                c.obj.write(b"peek 1\r\n" * n)
                commands = c.outgoing.read()  # encrypted now: the threads below use no SSL
                sender = asyncio.create_task(asyncio.to_thread(c.sock.sendall, commands))
                await until(lambda: conn.client_full and not conn.reading, timeout=30)
                client = conn.client
                assert client is not None
                buffered = client.get_write_buffer_size()
                assert buffered < 1024 * 1024, buffered  # a few hundred KiB, not 20 MB
                if isinstance(client, TLSTransport):
                    # the memory BIOs hold at most a chunk and a partial record
                    assert client._outgoing.pending == 0
                    assert client._incoming.pending < 2 * CHUNK
                session = conn.session
                assert session is not None and len(session.to_client) < 1024 * 1024
                reply = b"FOUND 1 1000\r\n" + body + b"\r\n"
                got, _ = await asyncio.to_thread(c.read_exactly, n * len(reply))
                await sender
                assert got == reply * n
                c.obj.write(b"list-tube-used\r\n")
                c.send()
                tail, _ = await asyncio.to_thread(c.read_exactly, len(b"USING default\r\n"))
                assert tail == b"USING default\r\n"
            finally:
                c.close()

    run_on(loop, main())


@LOOPS
def test_large_pipelined_puts_through_the_builtin_transport(
    loop: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """Many records per read and reads larger than one chunk: nothing lost or reordered."""
    n = 3000

    async def main() -> None:
        async with serving(pki, beanstalkd, "builtin") as proxy:
            c = await proxy.connect("admin")
            batch = b"".join(b"put 0 0 60 1000\r\n%s\r\n" % (b"%04d" % i * 250) for i in range(n))
            await c.send(batch)
            ids = []
            for _ in range(n):
                line, _ = await c.reply()
                assert line.startswith(b"INSERTED "), line
                ids.append(int(line.split()[1]))
            assert ids == sorted(ids) and len(set(ids)) == n
            line, got = await c.call(b"peek %d" % ids[-1])
            assert got == b"%04d" % (n - 1) * 250
            await c.close()
        assert (await server_stats(beanstalkd.port))["current-jobs-ready"] == str(n)

    run_on(loop, main())


# --- memory per idle connection -------------------------------------------------------------------


def _open_idle(port: int, ctx: ssl.SSLContext, n: int) -> list[ssl.SSLSocket]:
    socks = []
    for _ in range(n):
        s = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        )
        s.sendall(b"list-tube-used\r\n")
        assert s.recv(100) == b"USING default\r\n"
        socks.append(s)
    return socks


def _traced_per_connection(loop: str, transport: str, pki: PKI, beanstalkd: Beanstalkd) -> float:
    """Python-allocator bytes per idle connection, client included (its sockets are blocking
    ``ssl.SSLSocket``s whose buffers live in OpenSSL, outside tracemalloc's view)."""
    n = 30
    ctx = pki.client_context("admin")

    async def main() -> float:
        async with serving(pki, beanstalkd, transport) as proxy:
            for s in await asyncio.to_thread(_open_idle, proxy.port, ctx, 5):  # warm-up
                s.close()
            await until(lambda: not proxy.server.connections)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                socks = await asyncio.to_thread(_open_idle, proxy.port, ctx, n)
                await until(lambda: len(proxy.server.connections) == n)
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            for s in socks:
                s.close()
            return (after - before) / n

    return run_on(loop, main())


@LOOPS
def test_idle_connection_allocates_little(loop: str, pki: PKI, beanstalkd: Beanstalkd) -> None:
    per_conn = _traced_per_connection(loop, "builtin", pki, beanstalkd)
    # the relay's own objects, the session, both transports (and the test client's sockets):
    # 6.8 to 7.2 KiB (13 KiB before __slots__ and lazy containers; asyncio's
    # stock SSL transport alone allocates a 256 KiB read buffer per connection)
    assert per_conn < 10 * 1024, per_conn


@pytest.mark.parametrize(
    "cls", [Connection, _Upstream, Session, TLSTransport, ClientParser, ReplyParser, ShadowView]
)
def test_per_connection_objects_have_no_instance_dict(cls: type) -> None:
    """Every object allocated per connection declares ``__slots__`` along its whole MRO: an
    instance ``__dict__`` costs ~1.6 KiB per connection for the larger ones."""
    assert cls.__dictoffset__ == 0, f"{cls.__name__} instances have a __dict__"


def test_live_connection_and_session_have_no_instance_dict(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async def main() -> None:
        async with serving(pki, beanstalkd, "builtin") as proxy:
            client = await proxy.connect("admin")
            try:
                assert await client.line(b"list-tube-used") == b"USING default"
                (conn,) = proxy.server.connections
                for obj in (conn, conn.session, conn.client, conn.session and conn.session.parser):
                    assert obj is not None and not hasattr(obj, "__dict__"), type(obj)
                with pytest.raises(AttributeError):
                    conn.rate_limited = 1  # type: ignore[attr-defined]
            finally:
                await client.close()

    run_on("uvloop", main())


def test_stock_asyncio_transport_allocates_its_256k_buffer(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """The contrast that motivates the builtin transport (CPython 3.11's sslproto)."""
    assert _traced_per_connection("asyncio", "stock", pki, beanstalkd) > 256 * 1024


@LOOPS
@TRANSPORTS
@pytest.mark.parametrize("name", ["admin", "inspector"])
def test_one_session_ticket_and_resumption_keeps_the_identity(
    loop: str, transport: str, name: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """A full TLS 1.3 handshake sends one session ticket (``tlsctx.SESSION_TICKETS``, not
    OpenSSL's two); a client resuming with it is the same principal, with the same rights."""

    def client(port: int) -> list[tuple[bool, bytes, int]]:
        ctx = client_ctx(pki, name)
        tickets: list[int] = []

        def seen(*args: Any) -> None:  # (conn, direction, version, type, msg_type, data)
            if args[1] == "read" and args[4] == ssl._TLSMessageType.NEWSESSION_TICKET:
                tickets.append(1)

        ctx._msg_callback = seen  # type: ignore[attr-defined]  # private: counts tickets
        session: ssl.SSLSession | None = None
        out = []
        for _ in range(2):
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                s.sendall(b"put 0 0 60 1\r\nx\r\n")
                data = b""
                while b"\r\n" not in data:
                    data += s.recv(4096)
                out.append((s.session_reused, data.split(b" ")[0], len(tickets)))
                session = s.session
        return out

    async def main() -> None:
        async with serving(pki, beanstalkd, transport) as proxy:
            first, second = await asyncio.to_thread(client, proxy.port)
            assert first[0] is False and second[0] is True  # the second one resumed
            assert first[2] == 1 and second[2] == 2  # one ticket per handshake, resumed too
            # the same principal: admin may put on default, inspector may not
            expected = b"INSERTED" if name == "admin" else b"NOT_PERMITTED\r\n"
            assert first[1] == second[1] == expected
            await until(lambda: not proxy.server.connections)

    run_on(loop, main())


def _resumed(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A connection resumed from a first one's session (both send ``list-tube-used``), held
    open for the caller."""
    session: ssl.SSLSession | None = None
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        s.sendall(b"list-tube-used\r\n")
        assert s.recv(100) == b"USING default\r\n"
        if session is not None:
            assert s.session_reused
            return s
        session = s.session
        s.close()
    raise AssertionError("unreachable")


@LOOPS
@TRANSPORTS
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_crl_reload_rechecks_resumed_connections_from_the_tls_layer(
    loop: str,
    transport: str,
    version: str,
    pki: PKI,
    beanstalkd: Beanstalkd,
    conn_log: LogWatch,
    tmp_path: Path,
) -> None:
    """The relay keeps no copy of the client certificate: a CRL reload reads it back from the
    TLS layer (``Connection.peer_der``), resumed connections included. The revoked client's
    resumed connection is closed, the other client's resumed connection is not."""
    ca = tmp_path / "ca"
    shutil.copytree(pki.dir, ca)
    assert revoke(ca, ca / "inspector.pem")
    victim_ctx, keeper_ctx = (
        client_ctx(pki, "inspector", version),
        client_ctx(pki, "admin", version),
    )

    async def main() -> None:
        async with serving(pki, beanstalkd, transport) as proxy:
            victim = await asyncio.to_thread(_resumed, proxy.port, victim_ctx)
            keeper = await asyncio.to_thread(_resumed, proxy.port, keeper_ctx)
            try:
                await until(lambda: len(proxy.server.connections) == 2)
                ders = {c.principal: c.peer_der() for c in proxy.server.connections}
                assert ders == {
                    "inspector": _der(pki, "inspector"),
                    "admin": _der(pki, "admin"),
                }
                tls = replace(proxy.server.config.tls, crl=(str(ca / "crl.pem"),))
                check = revocation_check(tls)
                assert check is not None
                proxy.server.reload_tls(server_context(tls), check)
                await conn_log.wait_for(
                    lambda m: 'reason="client certificate revoked" closed_by=proxy' in m
                )
                assert await asyncio.to_thread(victim.recv, 100) == b""
                keeper.sendall(b"list-tube-used\r\n")
                assert await asyncio.to_thread(keeper.recv, 100) == b"USING default\r\n"
                assert [c.principal for c in proxy.server.connections] == ["admin"]
            finally:
                victim.close()
                keeper.close()
            await until(lambda: not proxy.server.connections)

    run_on(loop, main())


def _der(pki: PKI, name: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert((pki.dir / f"{name}.pem").read_text())


class _NoSSLObject:
    """A client transport whose TLS layer lost its ``ssl_object`` (delegates the rest)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return None if name == "ssl_object" else self.inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@TRANSPORTS
def test_crl_reload_closes_a_connection_whose_certificate_cannot_be_read_back(
    transport: str, pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    """Fail closed: a live connection whose certificate the TLS layer cannot give back is
    closed by a revocation re-check, even one that revokes nothing; the others stay."""

    async def main() -> None:
        async with serving(pki, beanstalkd, transport) as proxy:
            lost = await proxy.connect("admin")
            kept = await proxy.connect("inspector")
            try:
                assert await lost.line(b"list-tube-used") == b"USING default"
                assert await kept.line(b"list-tube-used") == b"USING default"
                conn = next(c for c in proxy.server.connections if c.principal == "admin")
                conn.client = _NoSSLObject(conn.client)
                assert conn.peer_der() is None
                proxy.server.reload_tls(proxy.server.ssl_context, lambda der: False)
                await conn_log.wait_for(
                    lambda m: (
                        'reason="client certificate unavailable for the revocation '
                        're-check" closed_by=proxy' in m
                    )
                )
                assert await lost.closed() == b""
                assert await kept.line(b"list-tube-used") == b"USING default"
                assert [c.principal for c in proxy.server.connections] == ["inspector"]
            finally:
                await lost.close()
                await kept.close()

    run_on("uvloop", main())


def test_a_revocation_check_that_fails_for_one_connection_still_checks_the_others(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch
) -> None:
    """Fail closed, one connection at a time: the check raising for one connection closes
    that one and goes on; a revoked certificate after it is still closed, a good one stays."""

    async def main() -> None:
        async with serving(pki, beanstalkd, "builtin") as proxy:
            clients = {name: await proxy.connect(name) for name in ("admin", "inspector")}
            try:
                for c in clients.values():
                    assert await c.line(b"list-tube-used") == b"USING default"
                ders = {c.principal: c.peer_der() for c in proxy.server.connections}
                checked: list[str] = []

                def revoked(der: bytes) -> bool:
                    name = next(p for p, d in ders.items() if d == der)
                    checked.append(name)
                    if len(checked) == 1:
                        raise RuntimeError("CRL lookup failed")
                    return True

                proxy.server.reload_tls(proxy.server.ssl_context, revoked)
                assert sorted(checked) == ["admin", "inspector"]  # both checked
                for c in clients.values():
                    assert await c.closed() == b""  # one failed closed, one revoked
                await conn_log.wait_for(lambda m: 'reason="client certificate revoked"' in m)
                await conn_log.wait_for(
                    lambda m: "client certificate unavailable for the revocation re-check" in m
                )
            finally:
                for c in clients.values():
                    await c.close()

    run_on("uvloop", main())


@LOOPS
def test_config_key(loop: str, pki: PKI, beanstalkd: Beanstalkd) -> None:
    """``tls.transport`` selects the transport the relay hands its connections; the default and
    ``auto`` (its old name) are the builtin one on every loop."""

    async def main(transport: str | None) -> Any:
        async with serving(pki, beanstalkd, transport) as proxy:
            c = await proxy.connect("admin")
            assert await c.line(b"list-tube-used") == b"USING default"
            kind = type(_client_conn(proxy).client)
            await c.close()
            return kind

    assert run_on(loop, main("builtin")) is TLSTransport
    assert run_on(loop, main("stock")) is not TLSTransport
    assert run_on(loop, main("auto")) is TLSTransport
    assert run_on(loop, main(None)) is TLSTransport


def _config_with(section: str, key: str, value: object) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstream": "127.0.0.1:11300",
        "tls": {"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"},
        "acl": "acl.yaml",
    }
    data.setdefault(section, {})[key] = value
    return data


@pytest.mark.parametrize("value", ["auto", "builtin", "stock", "Stock"])
def test_tls_transport_key_accepts(value: str) -> None:
    cfg = parse_config(_config_with("tls", "transport", value), "p.yaml")
    assert cfg.tls.transport == value.lower()
    assert parse_config(_config_with("tls", "min_version", "1.3"), "p.yaml").tls.transport == (
        "builtin"
    )


@pytest.mark.parametrize("value", ["openssl", "", 1, True, None, ["builtin"]])
def test_tls_transport_key_rejects(value: object) -> None:
    if value is None:  # null means "not set": the default
        assert parse_config(_config_with("tls", "transport", value), "p.yaml").tls.transport
        return
    with pytest.raises(ConfigError) as err:
        parse_config(_config_with("tls", "transport", value), "p.yaml")
    assert err.value.key == "tls.transport"


@pytest.mark.parametrize(("value", "seconds"), [("500ms", 0.5), (3, 3.0), ("1m", 60.0)])
def test_close_timeout_key(value: object, seconds: float) -> None:
    cfg = parse_config(_config_with("limits", "close_timeout", value), "p.yaml")
    assert cfg.limits.close_timeout == seconds
    assert parse_config(_config_with("log", "level", "info"), "p.yaml").limits.close_timeout == 2


@pytest.mark.parametrize("value", [0, -1, "soon", "2d"])
def test_close_timeout_key_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_config_with("limits", "close_timeout", value), "p.yaml")
    assert err.value.key == "limits.close_timeout"

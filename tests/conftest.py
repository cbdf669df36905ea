"""Shared fixtures: a real beanstalkd per test, a test PKI made at session start, an
in-process proxy on a free port, and small async clients (TLS through the proxy, plain TCP
straight to beanstalkd) that read replies by count.

beanstalkd must be installed (``.ci/run`` installs it); a missing binary is a test failure,
never a skip. ``BEANSTALKD`` overrides the binary path.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
import yaml

from proxy.acl import parse_acl
from proxy.certs import init_ca_and_server, issue_client
from proxy.config import Config, Endpoint, Limits, LogConfig, TLSConfig
from proxy.httpd import StatusServer
from proxy.logs import render_text
from proxy.protocol import NEED_DATA, ClientParser
from proxy.relay import PolicyHolder, ProxyServer
from proxy.session import Session
from proxy.tlsctx import server_context
from proxy.tunnel import TunnelServer

BEANSTALKD = os.environ.get("BEANSTALKD", "beanstalkd")
#: max-job-size used by the test beanstalkd and proxy (small, so size limits are cheap to hit).
TEST_MAX_JOB = 1024

#: The ACL most integration tests run under. Principals come from real client certificates.
TEST_ACL: dict[str, Any] = {
    "principals": [
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "worker", "match": {"cn": "worker", "ou": "jobs"}},
        {"name": "inspector", "match": {"cn": "inspector"}},
    ],
    "rules": [
        {"principal": "admin", "tubes": ["*"], "allow": ["all"]},
        {"principal": "billing", "tubes": ["invoices", "invoices.*"], "allow": ["produce"]},
        {"principal": "billing", "tubes": ["invoices"], "allow": ["inspect"]},
        {"principal": "worker", "tubes": ["invoices"], "allow": ["consume"]},
        {"principal": "inspector", "tubes": ["*"], "allow": ["inspect"]},
        {"principal": "*", "tubes": ["secrets.*"], "deny": ["all"]},
    ],
}

#: Client certificates issued by the test CA: name -> issue_client keyword arguments.
CLIENTS: dict[str, dict[str, Any]] = {
    "admin": {},
    "billing": {"uris": ["spiffe://example.org/billing/api"]},
    "worker": {"ous": ["jobs"]},
    "inspector": {},
    "stranger": {},  # valid certificate, but no principal matches it
}


def make_session(
    acl: dict[str, Any], principal: str, denial_reply: str, max_job_size: int = 100
) -> Session:
    """A sans-I/O session of ``principal`` under ``acl`` (for the session unit tests)."""
    return Session(
        PolicyHolder(parse_acl(acl, "<test>")),
        principal,
        max_job_size=max_job_size,
        denial_reply=denial_reply,
    )


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str = "condition", timeout: float = 15.0
) -> None:
    """Bounded polling for state that has no event to await (server-side bookkeeping,
    counters): ``predicate`` (plain or async) is checked every 10 ms until it holds; the test
    fails naming ``what`` if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not reached in time: {what}"
        await asyncio.sleep(0.01)


T = TypeVar("T")

#: Event loops a test can run on by name (``run_on``).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` (proxy, clients and all) to its end on a fresh event loop of kind ``loop``
    (a test parametrized over ``LOOPS`` instead of running on pytest-asyncio's loop)."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main)


def parse_in_chunks(parser: ClientParser, wire: bytes, chunk: int) -> list[Any]:
    """The commands ``parser`` yields as ``wire`` arrives ``chunk`` bytes at a time."""
    got = []
    for i in range(0, len(wire), chunk):
        parser.feed(wire[i : i + chunk])
        while (cmd := parser.next_command()) is not NEED_DATA:
            got.append(cmd)
    return got


def take(buf: bytearray) -> bytes:
    """Everything in ``buf`` (a session's output buffer), which is left empty."""
    data = bytes(buf)
    buf.clear()
    return data


@dataclass
class PKI:
    """Paths of the test PKI (``dir``) and of a second, untrusted CA (``other``)."""

    dir: Path
    other: Path

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    def cert(self, name: str) -> tuple[str, str]:
        return str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")

    def client_context(self, name: str | None, ca_dir: Path | None = None) -> ssl.SSLContext:
        """A TLS client context trusting the test CA, presenting ``name``'s cert (if any)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca)
        if name is not None:
            d = ca_dir or self.dir
            ctx.load_cert_chain(str(d / f"{name}.pem"), str(d / f"{name}.key"))
        return ctx


def write_serve_config(tmp: Path, pki: PKI, upstream: int, port: int, **extra: Any) -> Path:
    """``acl.yaml`` (admin may do all) and ``proxy.yaml`` for ``serve`` in ``tmp``: listening
    on ``port``, relaying to ``upstream``, no file watching, plus the top-level keys ``extra``.
    Returns the config's path."""
    acl = tmp / "acl.yaml"
    acl.write_text(
        yaml.safe_dump(
            {
                "principals": [{"name": "admin", "match": {"cn": "admin"}}],
                "rules": [{"principal": "admin", "allow": ["all"]}],
            }
        )
    )
    cfg = tmp / "proxy.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "upstream": f"127.0.0.1:{upstream}",
                "tls": {
                    "cert": str(pki.dir / "server.pem"),
                    "key": str(pki.dir / "server.key"),
                    "client_ca": pki.ca,
                },
                "acl": str(acl),
                "reload": {"watch": False},
                **extra,
            }
        )
    )
    return cfg


def spawn_serve(cfg: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m proxy serve --config CFG ARGS`` started from the repository root, its
    stderr (the log) piped, unbuffered, for a ``LogReader``."""
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), *args],
        cwd=Path(__file__).resolve().parent.parent,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop_serve(proc: subprocess.Popen[str]) -> None:
    """Terminate a ``spawn_serve`` process, wait for it and close its log pipe."""
    proc.terminate()
    proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``bench/bench.py ARGS`` run to its end from the repository root, output captured."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, str(root / "bench" / "bench.py"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    init_ca_and_server(d)
    for name, kwargs in CLIENTS.items():
        issue_client(d, name, **kwargs)
    other = tmp_path_factory.mktemp("other-pki")
    init_ca_and_server(other)
    issue_client(other, "admin")  # same CN as a real principal, wrong CA
    return PKI(d, other)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10
) -> None:
    """Block until something accepts on 127.0.0.1:port (polling connect), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # polling a port that has no readiness event


@dataclass
class Beanstalkd:
    """A running beanstalkd child process."""

    port: int
    proc: subprocess.Popen[bytes]
    max_job_size: int
    extra: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.proc = _spawn_beanstalkd(self.port, self.max_job_size, self.extra)


def _spawn_beanstalkd(port: int, max_job: int, extra: list[str]) -> subprocess.Popen[bytes]:
    try:
        proc = subprocess.Popen(
            [BEANSTALKD, "-l", "127.0.0.1", "-p", str(port), "-z", str(max_job), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        pytest.fail(
            f"beanstalkd binary {BEANSTALKD!r} not found: integration tests need a real "
            "beanstalkd (apt-get install beanstalkd, or run bash .ci/run)"
        )
    wait_for_port(port, proc)
    # The port was free when chosen, but another test run may have taken it since: make sure
    # the listening socket is ours. Checked in /proc, without sending beanstalkd a command (the
    # transparency tests compare its counters exactly).
    if not _listens_on(proc.pid, port):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"port {port} is not served by our beanstalkd (pid {proc.pid})")
    return proc


def _listens_on(pid: int, port: int) -> bool:
    """Does process ``pid`` own the listening TCP socket on 127.0.0.1:``port``?"""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if os.readlink(os.path.join(fd_dir, fd)) in inodes:
                return True
    return False


@pytest.fixture
def beanstalkd() -> Iterator[Beanstalkd]:
    for attempt in range(3):  # a port taken between free_port() and the bind: try another
        port = free_port()
        try:
            proc = _spawn_beanstalkd(port, TEST_MAX_JOB, [])
            break
        except RuntimeError:
            if attempt == 2:
                raise
    b = Beanstalkd(port, proc, TEST_MAX_JOB)
    try:
        yield b
    finally:
        b.stop()


def make_config(
    pki: PKI,
    upstream_port: int,
    denial_reply: str = "explicit",
    *,
    tls: dict[str, Any] | None = None,
    **limits: Any,
) -> Config:
    """The test proxy's config: ``limits`` and ``tls`` (TLSConfig fields) over the defaults."""
    base = Limits(
        max_connections=100,
        handshake_timeout=2.0,
        max_job_size=TEST_MAX_JOB,
        upstream_connect_timeout=2.0,
    )
    return Config(
        listen=Endpoint("127.0.0.1", 0, None),
        upstream=Endpoint("127.0.0.1", upstream_port, None),
        allow_remote_upstream=False,
        tls=replace(
            TLSConfig(
                cert=str(pki.dir / "server.pem"),
                key=str(pki.dir / "server.key"),
                client_ca=pki.ca,
                crl=(),
                min_version="1.2",
            ),
            **(tls or {}),
        ),
        acl="<test>",
        limits=replace(base, **limits),
        metrics_listen=None,
        log=LogConfig("text", "info"),
        source="<test>",
        # Most tests assert decisions; NOT_PERMITTED tells a denial from a missing job.
        # The default (compatible) replies have tests of their own.
        denial_reply=denial_reply,
    )


@dataclass
class RunningProxy:
    server: ProxyServer
    pki: PKI

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    async def connect(self, name: str | None = "admin", ca_dir: Path | None = None) -> Client:
        ctx = self.pki.client_context(name, ca_dir)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=ctx, server_hostname="localhost"
        )
        return Client(reader, writer)


@dataclass
class StatusListener:
    """A status listener (``server``) in front of a running proxy (``proxy``)."""

    server: StatusServer
    proxy: RunningProxy

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port


@contextlib.asynccontextmanager
async def status_listener(running: RunningProxy, **options: Any) -> AsyncIterator[StatusListener]:
    """A status listener on a free port in front of ``running``, with ``StatusServer``
    ``options`` (``timeout``, ``connections``); closed when the ``async with`` block ends."""
    server = StatusServer(
        Endpoint("127.0.0.1", 0, None),
        running.server.metrics,
        running.server.config.upstream,
        **options,
    )
    await server.start()
    try:
        yield StatusListener(server, running)
    finally:
        await server.close()


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 request to 127.0.0.1:``port``: (status code, headers (lower-case names),
    body)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def start_proxy(
    pki: PKI,
    upstream_port: int,
    acl: dict[str, Any] | None = None,
    denial_reply: str = "explicit",
    *,
    tls: dict[str, Any] | None = None,
    **limits: Any,
) -> RunningProxy:
    config = make_config(pki, upstream_port, denial_reply, tls=tls, **limits)
    policy = parse_acl(acl if acl is not None else TEST_ACL, "<test acl>")
    server = ProxyServer(config, server_context(config.tls), PolicyHolder(policy))
    await server.start()
    return RunningProxy(server, pki)


@contextlib.asynccontextmanager
async def serving(
    pki: PKI,
    upstream_port: int,
    acl: dict[str, Any] | None = None,
    denial_reply: str = "explicit",
    *,
    tls: dict[str, Any] | None = None,
    **limits: Any,
) -> AsyncIterator[RunningProxy]:
    """``start_proxy`` for the length of an ``async with`` block (closed when it ends)."""
    running = await start_proxy(pki, upstream_port, acl, denial_reply, tls=tls, **limits)
    try:
        yield running
    finally:
        await running.server.close()


async def start_tunnel(
    pki: PKI, proxy_port: int, name: str, hostname: str = "localhost"
) -> TunnelServer:
    """A client-mode tunnel on a free local port presenting ``name``'s certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    cert, key = pki.cert(name)
    ctx.load_cert_chain(cert, key)
    t = TunnelServer(
        Endpoint("127.0.0.1", 0, None), Endpoint("127.0.0.1", proxy_port, None), ctx, hostname
    )
    await t.start()
    return t


@contextlib.asynccontextmanager
async def closing_sockets() -> AsyncIterator[list[socket.socket]]:
    """A list for a test's raw client sockets, every one closed when the block ends."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
async def proxy(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[RunningProxy]:
    async with serving(pki, beanstalkd.port) as running:
        yield running


Reply = tuple[bytes, bytes | None]


class Client:
    """A minimal beanstalkd client over asyncio streams that reads bodies by count."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 10) -> Reply:
        """The next reply: (line without CRLF, body without its trailer or None)."""
        async with asyncio.timeout(timeout):
            line = (await self.reader.readuntil(b"\r\n"))[:-2]
            head = line.split(b" ")
            if head[0] in (b"RESERVED", b"FOUND", b"OK"):
                n = int(head[-1])
                body = await self.reader.readexactly(n + 2)
                return line, body[:-2]
            return line, None

    async def call(self, line: bytes, body: bytes | None = None) -> Reply:
        data = line + b"\r\n"
        if body is not None:
            data += body + b"\r\n"
        await self.send(data)
        return await self.reply()

    async def line(self, line: bytes, body: bytes | None = None) -> bytes:
        """Send one command and return only its reply line."""
        return (await self.call(line, body))[0]

    async def put(self, body: bytes, pri: int = 0, delay: int = 0, ttr: int = 60) -> bytes:
        return await self.line(b"put %d %d %d %d" % (pri, delay, ttr, len(body)), body)

    async def closed(self, timeout: float = 10) -> bytes:
        """Wait for the peer to close; return whatever it sent before closing."""
        async with asyncio.timeout(timeout):
            data = b""
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while chunk := await self.reader.read(65536):
                    data += chunk
            return data

    async def stats(self, command: bytes = b"stats") -> dict[str, str]:
        line, body = await self.call(command)
        assert line.startswith(b"OK"), line
        assert body is not None
        return parse_yaml_map(body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def parse_yaml_map(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in body.decode().splitlines():
        key, sep, value = raw.partition(": ")
        if sep:
            out[key] = value.strip().strip('"')
    return out


async def direct(port: int) -> Client:
    """A plain TCP client straight to beanstalkd (the test's view of the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Client(reader, writer)


async def server_stats(port: int) -> dict[str, str]:
    """beanstalkd's ``stats`` as seen by a fresh direct connection (which it counts)."""
    c = await direct(port)
    try:
        return await c.stats()
    finally:
        await c.close()


CONN_LOGGER = "beanstalk_proxy.conn"


class LogWatch(logging.Handler):
    """Collects the proxy's connection log lines; a test awaits a line instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.messages.append(render_text(record))  # "message key=value ...", as in the text log
        self._changed.set()

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                self._changed.clear()
                await self._changed.wait()

    async def wait_count(
        self, predicate: Callable[[str], bool], n: int, timeout: float = 10.0
    ) -> list[str]:
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= n:
                    return found
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def conn_log(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    caplog.set_level(logging.INFO, logger=CONN_LOGGER)
    watch = LogWatch()
    logger = logging.getLogger(CONN_LOGGER)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)


async def tls_attempt(port: int, ctx: ssl.SSLContext, command: bytes = b"stats\r\n") -> str:
    """Connect with ``ctx``, send ``command``, read to EOF. Returns where it failed; fails the
    test if anything answered the command (a refused client must get nothing back)."""
    async with asyncio.timeout(10):
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
        except (ssl.SSLError, OSError) as exc:
            return f"handshake failed: {exc!r}"
        try:
            writer.write(command)
            data = await reader.read()
        except (ssl.SSLError, OSError) as exc:
            return f"first read failed: {exc!r}"
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()
        assert data == b"", f"the refused client got an answer: {data[:60]!r}"
        return "closed without a reply"


async def served(proxy: RunningProxy, name: str = "admin", local: str | None = None) -> bool:
    """Does a legitimate client (``name``'s certificate, from address ``local`` if given) get
    an answer to one command? False where it is refused or cut."""
    return await served_at(proxy.pki, proxy.port, name, local)


async def served_at(pki: PKI, port: int, name: str = "admin", local: str | None = None) -> bool:
    """``served`` for a proxy on ``port`` (one run in another process) trusting ``pki``."""
    ctx = pki.client_context(name)
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=ctx,
                server_hostname="localhost",
                local_addr=(local, 0) if local else None,
            )
            c = Client(reader, writer)
            try:
                return await c.line(b"list-tube-used") == b"USING default"
            finally:
                await c.close()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return False


def metric(proxy: RunningProxy, name: str, labels: dict[str, str] | None = None) -> float:
    """The proxy's sample ``name`` with ``labels`` (0 where it has none yet)."""
    return proxy.server.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def handshake_failures(proxy: RunningProxy, reason: str) -> float:
    return metric(proxy, "beanstalk_proxy_handshake_failures_total", {"reason": reason})


class NothingUpstream:
    """Asserts that beanstalkd saw no connection from the proxy inside the ``async with`` block
    (our own stats probes aside) and no put: the block's clients were refused before any
    upstream connection existed. ``allowed``: upstream connections the block legitimately
    opens."""

    def __init__(self, port: int, allowed: int = 0) -> None:
        self.port = port
        self.allowed = allowed
        self.before = 0

    async def __aenter__(self) -> NothingUpstream:
        self.before = int((await server_stats(self.port))["total-connections"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            after = await server_stats(self.port)
            # +1: the probe reading these stats
            assert int(after["total-connections"]) == self.before + self.allowed + 1, after
            assert int(after["cmd-put"]) == 0, after
            if not self.allowed:
                assert after["current-connections"] == "1", after  # the probe alone


class LogReader:
    """Reads the child's stderr line by line in a thread, so tests await log lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> list[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while len([ln for ln in self.lines if regex.search(ln)]) < count:
                assert self.proc.stderr is not None
                line = await asyncio.to_thread(self.proc.stderr.readline)
                if not line:
                    raise AssertionError(f"process exited; log so far:\n{''.join(self.lines)}")
                self.lines.append(line)
        return [ln for ln in self.lines if regex.search(ln)]


async def start_serve(config: Path, *args: str) -> asyncio.subprocess.Process:
    """``python -m proxy serve --config CONFIG ARGS`` as an asyncio child process, run in the
    config's folder (the repository on ``PYTHONPATH``), its stderr (the log) piped."""
    root = Path(__file__).resolve().parent.parent
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=config.parent,
        env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"},
    )


class ProcessLog:
    """The stderr of an asyncio child process, collected line by line by a task (``pump``);
    a test awaits a line instead of sleeping."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._eof = False
        self.pump = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._eof = True
        self._changed.set()

    async def wait_for(self, pattern: str, start: int = 0, timeout: float = 15) -> int:
        """Index of the first line at or after ``start`` matching ``pattern`` (a regex); fails
        the test, showing the log, if the process ends before logging one."""
        rx = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for i in range(start, len(self.lines)):
                    if rx.search(self.lines[i]):
                        return i
                if self._eof:
                    raise AssertionError(
                        f"exited without logging {pattern!r}:\n" + "\n".join(self.lines)
                    )
                self._changed.clear()
                await self._changed.wait()


@contextlib.contextmanager
def serve_process(cfg: Path, *args: str) -> Iterator[LogReader]:
    """``spawn_serve`` for the length of a ``with`` block: yields a ``LogReader`` of its log
    (the process is its ``proc``); ``stop_serve`` when the block ends."""
    proc = spawn_serve(cfg, *args)
    try:
        yield LogReader(proc)
    finally:
        stop_serve(proc)


# --------------------------------------------------------------------------------------------
# Automatic ``integration`` marking: ``pytest -m "not integration"`` is the fast, pure suite.

#: Fixtures that start beanstalkd or a proxy (a test using any fixture built on them, directly
#: or through other fixtures, is an integration test).
_IO_FIXTURES = frozenset({"beanstalkd", "proxy", "conn_log"})
#: Names whose use marks a test (or a module-level helper it calls) as integration: the socket,
#: subprocess and server helpers here, and the asyncio calls that open connections.
_IO_NAMES = frozenset(
    {
        "socket",
        "subprocess",
        "start_proxy",
        "serving",
        "status_listener",
        "http",
        "served",
        "served_at",
        "start_tunnel",
        "spawn_serve",
        "serve_process",
        "start_serve",
        "stop_serve",
        "run_bench",
        "direct",
        "server_stats",
        "free_port",
        "wait_for_port",
        "tls_attempt",
        "open_connection",
        "open_unix_connection",
        "start_server",
        "start_unix_server",
        "create_connection",
        "create_server",
        "sock_connect",
        "CliRunner",
    }
)


def _names_used(code: Any, into: set[str]) -> None:
    into.update(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            _names_used(const, into)


def _uses_io(function: Callable[..., Any]) -> bool:
    """Does ``function``, or any function of its module it calls (transitively), name one of
    ``_IO_NAMES``?"""
    module = sys.modules.get(function.__module__)
    seen: set[str] = set()
    todo: list[Callable[..., Any]] = [function]
    while todo:
        names: set[str] = set()
        _names_used(inspect.unwrap(todo.pop()).__code__, names)
        if names & _IO_NAMES:
            return True
        for name in names - seen:
            seen.add(name)
            helper = getattr(module, name, None)
            if inspect.isfunction(helper) and helper.__module__ == function.__module__:
                todo.append(helper)
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is not None:
            continue
        function = getattr(item, "function", None)
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _IO_FIXTURES or (function is not None and _uses_io(function)):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_sockets_outside_integration(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test left unmarked must not open a network connection or listen: if it does, the
    automatic marking above missed it, and the fast suite would not be socket-free."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(self: socket.socket, *args: Any) -> None:
        pytest.fail(
            f"{request.node.nodeid} uses a socket ({args!r}) but is not marked integration: "
            "use a fixture or helper of conftest.py (or mark it)"
        )

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket.socket, "bind", refuse)

"""Hot rotation of certificates and CRLs (issue 4) against the real ``serve`` command.

The proxy runs as a subprocess (``python -m proxy serve``) with JSON logs on stderr, which the
test reads line by line: it waits for the ``ready`` line and for ``reload`` lines instead of
sleeping. The server certificate and key are mounted the way Kubernetes mounts a Secret:

    live/server.pem -> ..data/server.pem
    live/server.key -> ..data/server.key
    live/..data     -> ..v1/             (swapped atomically to ..v2/ by rename(2))

Cases: a symlink swap while a client keeps putting jobs on a held connection; a broken
replacement keeps the old certificate; SIGHUP does the same as the file watcher; a CRL update
closes only the revoked client's live connection; a client certificate that expires while
connected is cut at expiry; the server certificate expiry warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    PKI,
    TEST_ACL,
    Beanstalkd,
    Client,
    free_port,
    server_stats,
    serving,
    start_serve,
)
from cryptography import x509
from pki_helpers import make_client_cert, make_crl, utcnow

from proxy.certs import issue_server, revoke
from proxy.logs import render_text

RELOADED = "reload: TLS certificate, key, CA and CRL reloaded"
NOT_RELOADED = "reload: TLS files not reloaded"

Line = dict[str, Any]


# --- the proxy process ---------------------------------------------------------------------


class ProxyProcess:
    """``python -m proxy serve`` with its stderr (JSON log lines) pumped into ``lines``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[Line] = []
        self._changed = asyncio.Event()
        self._pump = asyncio.get_running_loop().create_task(self._read())
        self.port = 0

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:  # a traceback or other non-JSON output: keep it visible
                line = {"level": "raw", "message": text}
            if not isinstance(line, dict):
                line = {"level": "raw", "message": text}
            self.lines.append(line)
            self._changed.set()
        self._changed.set()

    @classmethod
    async def start(cls, config: Path) -> ProxyProcess:
        self = cls(await start_serve(config))
        ready = await self.wait_for(lambda m: m.get("event") == "ready", timeout=20)
        self.port = int(ready["listen"].rsplit(":", 1)[1])
        return self

    def mark(self) -> int:
        """Position in the log; ``wait_for(..., since=mark)`` only looks at later lines."""
        return len(self.lines)

    async def wait_for(
        self, predicate: Callable[[Line], bool], since: int = 0, timeout: float = 10.0
    ) -> Line:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines[since:]:
                        if predicate(line):
                            return line
                    if self._pump.done():
                        raise AssertionError("the proxy exited")
                    self._changed.clear()
                    await self._changed.wait()
        except (TimeoutError, AssertionError):
            text = "\n".join(json.dumps(x) for x in self.lines[since:])
            pytest.fail(f"no matching log line (returncode {self.proc.returncode}):\n{text}")

    async def message(self, fragment: str, since: int = 0, timeout: float = 10.0) -> Line:
        return await self.wait_for(lambda m: fragment in m.get("message", ""), since, timeout)

    def messages(self, since: int = 0) -> list[str]:
        return [str(m.get("message", "")) for m in self.lines[since:]]

    async def arm_watcher(self, path: Path) -> None:
        """Make sure the file watcher is running.

        Changing the ACL file's content (a comment; a mere touch is not a change) until a
        "files changed" line and the ACL reload appear proves it (bounded log polling)."""
        original = path.read_text()
        for attempt in range(10):
            mark = self.mark()
            tmp = path.with_name(f".{path.name}.arm")
            tmp.write_text(f"{original}# arm {attempt}\n")
            os.replace(tmp, path)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    while not any("files changed on disk" in m for m in self.messages(mark)):
                        self._changed.clear()
                        await self._changed.wait()
                    await self.message("reload: ACL", since=mark)
                    return
        pytest.fail("the file watcher never noticed a change")

    async def stop(self) -> int | None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._pump
        return self.proc.returncode


# --- certificates mounted the Kubernetes way --------------------------------------------------


@dataclass
class Mount:
    """A directory laid out like a Kubernetes Secret volume holding server.pem / server.key."""

    dir: Path
    versions: int = 0

    def add_version(self, cert: bytes, key: bytes) -> str:
        self.versions += 1
        name = f"..v{self.versions}"
        version = self.dir / name
        version.mkdir(parents=True)
        (version / "server.pem").write_bytes(cert)
        (version / "server.key").write_bytes(key)
        (version / "server.key").chmod(0o600)
        return name

    def swap(self, name: str) -> None:
        """Point ``..data`` at ``name`` atomically, as the kubelet does (symlink + rename)."""
        tmp = self.dir / "..data_tmp"
        os.symlink(name, tmp)
        os.replace(tmp, self.dir / "..data")

    @classmethod
    def create(cls, directory: Path, cert: bytes, key: bytes) -> Mount:
        mount = cls(directory)
        first = mount.add_version(cert, key)
        os.symlink(first, directory / "..data")
        os.symlink("..data/server.pem", directory / "server.pem")
        os.symlink("..data/server.key", directory / "server.key")
        return mount

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server.key"


@dataclass
class Setup:
    tmp: Path
    ca: Path  # a private copy of the test PKI (CA key, client certs, crl.pem)
    mount: Mount
    acl: Path
    pki: PKI
    upstream: int

    def new_server_cert(self, days: int = 825) -> tuple[bytes, bytes]:
        """A fresh server certificate and key from the same CA (a new random serial)."""
        d = self.tmp / f"issue-{len(list(self.tmp.glob('issue-*')))}"
        d.mkdir()
        shutil.copy(self.ca / "ca.pem", d / "ca.pem")
        shutil.copy(self.ca / "ca.key", d / "ca.key")
        issue_server(d, days=days)
        return (d / "server.pem").read_bytes(), (d / "server.key").read_bytes()

    def config(
        self,
        *,
        watch: bool = True,
        crl: bool = False,
        extra_tls: str = "",
        metrics_port: int | None = None,
    ) -> Path:
        path = self.tmp / "proxy.yaml"
        crl_line = f"\n  crl: {self.ca / 'crl.pem'}" if crl else ""
        metrics = f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n" if metrics_port else ""
        path.write_text(
            f"""\
listen: 127.0.0.1:0
upstream: 127.0.0.1:{self.upstream}
tls:
  cert: {self.mount.cert}
  key: {self.mount.key}
  client_ca: {self.ca / "ca.pem"}{crl_line}{extra_tls}
acl: {self.acl}
reload: {{watch: {str(watch).lower()}, interval: 0.2s}}
limits: {{handshake_timeout: 5s, shutdown_timeout: 5s}}
log: {{format: json, level: info}}
{metrics}"""
        )
        return path

    def client_context(self, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca / "ca.pem")
        ctx.load_cert_chain(self.ca / f"{name}.pem", self.ca / f"{name}.key")
        return ctx

    async def connect(self, port: int, name: str = "admin") -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.client_context(name), server_hostname="localhost"
        )
        return Client(reader, writer)


@pytest.fixture
def setup(tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd) -> Setup:
    ca = tmp_path / "ca"
    shutil.copytree(pki.dir, ca)  # revoke() rewrites crl.pem: never touch the shared PKI
    mount = Mount.create(
        tmp_path / "live", (ca / "server.pem").read_bytes(), (ca / "server.key").read_bytes()
    )
    acl = tmp_path / "acl.yaml"
    acl.write_text(yaml.safe_dump(TEST_ACL))
    return Setup(tmp_path, ca, mount, acl, pki, beanstalkd.port)


@pytest.fixture
async def running(request: pytest.FixtureRequest) -> AsyncIterator[list[ProxyProcess]]:
    """Collects the proxy processes a test starts; stops them (cleanly: exit status 0)."""
    procs: list[ProxyProcess] = []
    yield procs
    codes = [await p.stop() for p in procs]
    assert codes == [0] * len(procs), codes


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def cert_serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def peer_serial(c: Client) -> int:
    ssl_object = c.writer.get_extra_info("ssl_object")
    assert ssl_object is not None
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(der)


async def peer_serial_of_new_connection(setup: Setup, port: int) -> int:
    c = await setup.connect(port)
    try:
        assert await c.line(b"list-tube-used") == b"USING default"
        return peer_serial(c)
    finally:
        await c.close()


async def tls_reload_failures(metrics_port: int) -> float:
    """``beanstalk_proxy_reloads_total{kind="tls",result="failure"}`` from /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        async with asyncio.timeout(10):
            text = (await reader.read()).decode()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert text.startswith("HTTP/1.") and " 200 " in text.split("\r\n", 1)[0], text[:200]
    for line in text.splitlines():
        if (
            line.startswith("beanstalk_proxy_reloads_total{")
            and 'kind="tls"' in line
            and ('result="failure"' in line)
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Producer:
    """Keeps putting jobs on one held connection; every reply must be ``INSERTED <id>``."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.replies: list[bytes] = []
        self._stop = False
        self._progress = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop:
            self.replies.append(await self.client.put(b"job %d" % len(self.replies)))
            self._progress.set()
            await asyncio.sleep(0.002)  # pacing, not synchronization: keep the CPUs usable

    async def more(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` more puts have been answered (and the producer is still alive)."""
        target = len(self.replies) + n
        async with asyncio.timeout(timeout):
            while len(self.replies) < target:
                if self.task.done():
                    self.task.result()  # re-raise what killed it
                    pytest.fail("producer stopped")
                self._progress.clear()
                await self._progress.wait()

    async def finish(self) -> list[bytes]:
        self._stop = True
        await asyncio.wait_for(self.task, 10)
        return self.replies


def assert_all_inserted(replies: list[bytes]) -> None:
    assert replies, "no put was answered"
    ids = []
    for r in replies:
        assert r.startswith(b"INSERTED "), r
        ids.append(int(r.split()[1]))
    assert ids == list(range(ids[0], ids[0] + len(ids))), "replies out of order or lost"


# --- (a) symlink swap with a busy held connection ---------------------------------------------


async def test_symlink_swap_rotates_server_cert_without_dropping_connections(
    setup: Setup, running: list[ProxyProcess], beanstalkd: Beanstalkd
) -> None:
    v1_serial = cert_serial(setup.mount.cert.read_bytes())
    cert2, key2 = setup.new_server_cert()
    v2_serial = cert_serial(cert2)
    assert v1_serial != v2_serial
    proxy = await ProxyProcess.start(setup.config())
    running.append(proxy)
    # a long-lived certificate: no expiry warning at startup
    assert not any("expires in" in m for m in proxy.messages())
    await proxy.arm_watcher(setup.acl)

    held = await setup.connect(proxy.port)
    assert peer_serial(held) == v1_serial
    assert await held.line(b"use rotation") == b"USING rotation"
    producer = Producer(held)
    await producer.more(20)

    second = setup.mount.add_version(cert2, key2)
    mark = proxy.mark()
    setup.mount.swap(second)
    changed = await proxy.message("files changed on disk", since=mark)
    assert changed["event"] == "files_changed" and changed["what"] == ["tls"], changed
    assert str(setup.mount.cert) in changed["paths"]
    assert str(setup.mount.key) in changed["paths"]
    await proxy.message(RELOADED, since=mark)
    await producer.more(20)  # the held connection keeps working across the reload

    assert await peer_serial_of_new_connection(setup, proxy.port) == v2_serial
    await producer.more(5)
    replies = await producer.finish()
    assert_all_inserted(replies)
    assert peer_serial(held) == v1_serial  # still the session negotiated before the swap
    st = await held.stats(b"stats-tube rotation")
    assert int(st["current-jobs-ready"]) == len(replies)
    await held.close()
    # the held connection was never closed by the proxy before the client left
    assert not any(
        m.get("event") == "close" and m.get("reason") != "client closed" for m in proxy.lines[mark:]
    ), proxy.lines[mark:]


# --- (b) a broken replacement keeps the old material ------------------------------------------


@pytest.mark.parametrize("breakage", ["garbage PEM", "key does not match"])
async def test_broken_replacement_keeps_the_old_certificate(
    setup: Setup, running: list[ProxyProcess], breakage: str
) -> None:
    v1_cert, v1_key = setup.mount.cert.read_bytes(), setup.mount.key.read_bytes()
    v1_serial = cert_serial(v1_cert)
    cert2, key2 = setup.new_server_cert()
    if breakage == "garbage PEM":
        bad_cert, bad_key, key_path = b"-----BEGIN CERTIFICATE-----\ngarbage\n", key2, "tls.cert"
    else:
        bad_cert, bad_key, key_path = cert2, v1_key, "tls.key"  # new cert, old key
    metrics_port = free_port()
    proxy = await ProxyProcess.start(setup.config(metrics_port=metrics_port))
    running.append(proxy)
    await proxy.arm_watcher(setup.acl)
    held = await setup.connect(proxy.port)
    assert await held.put(b"before") == b"INSERTED 1"
    failures_before = await tls_reload_failures(metrics_port)

    broken = setup.mount.add_version(bad_cert, bad_key)
    mark = proxy.mark()
    setup.mount.swap(broken)
    err = await proxy.message(NOT_RELOADED, since=mark)
    assert err["level"] == "error", err
    assert err["event"] == "reload_failed" and err["what"] == "tls", err
    assert err["key"] == key_path and err["line"] > 0, err  # names the config key at fault
    if breakage == "key does not match":
        assert "does not match" in err["error"], err
    assert not any(RELOADED in m for m in proxy.messages(mark))
    assert await tls_reload_failures(metrics_port) == failures_before + 1  # counted

    # the old certificate stays in force for new connections; the held one is untouched
    assert await peer_serial_of_new_connection(setup, proxy.port) == v1_serial
    assert await held.put(b"after") == b"INSERTED 2"

    # a good replacement afterwards is picked up
    good = setup.mount.add_version(cert2, key2)
    mark = proxy.mark()
    setup.mount.swap(good)
    await proxy.message(RELOADED, since=mark)
    assert await peer_serial_of_new_connection(setup, proxy.port) == cert_serial(cert2)
    assert await held.put(b"later") == b"INSERTED 3"
    await held.close()


# --- (c) SIGHUP ---------------------------------------------------------------------------------


async def test_sighup_rotates_like_the_watcher(setup: Setup, running: list[ProxyProcess]) -> None:
    v1_serial = cert_serial(setup.mount.cert.read_bytes())
    cert2, key2 = setup.new_server_cert()
    proxy = await ProxyProcess.start(setup.config(watch=False))
    running.append(proxy)
    held = await setup.connect(proxy.port)
    producer = Producer(held)
    await producer.more(10)

    setup.mount.swap(setup.mount.add_version(cert2, key2))
    # without the watcher nothing happens on its own...
    assert await peer_serial_of_new_connection(setup, proxy.port) == v1_serial
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.message(RELOADED, since=mark)
    assert not any("files changed on disk" in m for m in proxy.messages())
    await producer.more(10)
    # ...and after SIGHUP new connections get the new certificate, the held one keeps working
    assert await peer_serial_of_new_connection(setup, proxy.port) == cert_serial(cert2)
    await producer.more(5)
    assert_all_inserted(await producer.finish())
    assert peer_serial(held) == v1_serial
    await held.close()

    # a broken file on SIGHUP is refused the same way
    setup.mount.swap(setup.mount.add_version(b"not a certificate", key2))
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    err = await proxy.message(NOT_RELOADED, since=mark)
    assert err["key"] == "tls.cert", err
    assert await peer_serial_of_new_connection(setup, proxy.port) == cert_serial(cert2)


# --- (d) CRL update ------------------------------------------------------------------------------


async def test_crl_update_closes_only_the_revoked_live_connection(
    setup: Setup, running: list[ProxyProcess], beanstalkd: Beanstalkd
) -> None:
    proxy = await ProxyProcess.start(setup.config(crl=True))
    running.append(proxy)
    await proxy.arm_watcher(setup.acl)
    keeper = await setup.connect(proxy.port, "admin")
    victim = await setup.connect(proxy.port, "inspector")
    assert await keeper.line(b"list-tube-used") == b"USING default"
    assert await victim.line(b"list-tube-used") == b"USING default"
    assert (await server_stats(beanstalkd.port))["current-connections"] == "3"

    mark = proxy.mark()
    assert revoke(setup.ca, setup.ca / "inspector.pem") is True
    await proxy.message(RELOADED, since=mark)

    # the revoked client's live connection is closed...
    assert await victim.closed() == b""
    await victim.close()
    # ...the other keeps working
    assert await keeper.put(b"still here") == b"INSERTED 1"
    assert await keeper.line(b"list-tube-used") == b"USING default"
    await proxy.wait_for(lambda m: m.get("event") == "close", since=mark)
    closes = [m for m in proxy.lines[mark:] if m.get("event") == "close"]
    assert [m.get("principal") for m in closes] == ["inspector"], closes
    assert closes[0]["reason"] == "client certificate revoked", closes
    assert closes[0]["closed_by"] == "proxy", closes

    # and a new connection with the revoked certificate is refused
    before = int((await server_stats(beanstalkd.port))["total-connections"])
    mark = proxy.mark()
    try:
        again = await setup.connect(proxy.port, "inspector")
    except (ssl.SSLError, OSError):
        pass
    else:
        with contextlib.suppress(ssl.SSLError, OSError):
            await again.send(b"list-tube-used\r\n")
        assert await again.closed() == b""
        await again.close()
    line = await proxy.wait_for(
        lambda m: (
            m.get("logger") == "beanstalk_proxy.conn" and "handshake failed" in m.get("message", "")
        ),
        since=mark,
    )
    assert line["event"] == "handshake_failed" and line["reason"] == "verify_failed", line
    assert "certificate revoked" in line["error"], line
    after = await server_stats(beanstalkd.port)
    assert int(after["total-connections"]) == before + 1  # only this stats probe
    assert after["current-connections"] == "2"  # the keeper's upstream and the probe
    await keeper.close()


# --- (e) a client certificate expiring while connected --------------------------------------


@pytest.fixture
def conn_records(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    caplog.set_level(logging.INFO, logger="beanstalk_proxy.conn")
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(render_text(record))

    handler = Keep()
    logger = logging.getLogger("beanstalk_proxy.conn")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


async def test_connection_is_closed_when_the_client_certificate_expires(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path, conn_records: list[str]
) -> None:
    now = utcnow()
    # X.509 times have whole seconds: round up so at least 2 s are left
    not_after = (now + dt.timedelta(seconds=3)).replace(microsecond=0)
    cert, key = make_client_cert(
        pki.dir,
        tmp_path,
        "short-lived",
        cn="admin",
        not_before=now - dt.timedelta(minutes=5),
        not_after=not_after,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(cert, key)
    async with serving(pki, beanstalkd.port) as proxy:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=ctx, server_hostname="localhost"
        )
        c = Client(reader, writer)
        assert await c.line(b"list-tube-used") == b"USING default"
        assert await c.put(b"while valid") == b"INSERTED 1"
        assert time.time() < not_after.timestamp(), "too slow: the certificate already expired"
        assert await c.closed(timeout=10) == b""
        closed_at = time.time()
        await c.close()
        assert closed_at >= not_after.timestamp() - 0.1, "closed before the certificate expired"
        assert closed_at < not_after.timestamp() + 5
        assert any('reason="client certificate expired"' in m for m in conn_records), conn_records
        assert proxy.server.connections == set()


async def test_expiry_closes_only_the_live_connections_of_expired_certificates(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path, conn_records: list[str]
) -> None:
    """One timer serves every connection's expiry (``ProxyServer.expiries``): the certificate
    that expires first closes its connection first, even when it connected last; a
    connection its client closed before is not closed again; a long-lived one stays."""
    now = utcnow()
    base = now.replace(microsecond=0)
    certs = {}
    for name, seconds in (("late", 5), ("early", 3), ("gone", 3)):
        certs[name] = make_client_cert(
            pki.dir,
            tmp_path,
            f"short-{name}",
            cn="admin",
            not_before=now - dt.timedelta(minutes=5),
            not_after=base + dt.timedelta(seconds=seconds),
        )

    async def connect(port: int, name: str) -> Client:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca)
        if name == "admin":
            ctx.load_cert_chain(pki.dir / "admin.pem", pki.dir / "admin.key")
        else:
            ctx.load_cert_chain(*certs[name])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        c = Client(reader, writer)
        assert await c.line(b"list-tube-used") == b"USING default"
        return c

    async with serving(pki, beanstalkd.port) as proxy:
        clients = {name: await connect(proxy.port, name) for name in ("late", "gone", "early")}
        keeper = await connect(proxy.port, "admin")
        assert len(proxy.server.expiries) == 4
        await clients.pop("gone").close()
        assert time.time() < base.timestamp() + 3, "too slow: a certificate already expired"
        early_closed = await clients["early"].closed(timeout=10)
        early_at = time.time()
        late_closed = await clients["late"].closed(timeout=10)
        late_at = time.time()
        assert early_closed == late_closed == b""
        assert base.timestamp() + 3 - 0.1 <= early_at < late_at
        assert late_at >= base.timestamp() + 5 - 0.1
        assert await keeper.line(b"list-tube-used") == b"USING default"
        expired = [m for m in conn_records if 'reason="client certificate expired"' in m]
        assert len(expired) == 2, expired
        assert len(proxy.server.expiries) == 1  # the keeper's (its certificate lives on)
        assert len(proxy.server.connections) == 1
        for c in (*clients.values(), keeper):
            await c.close()


# --- (f) server certificate expiry warning --------------------------------------------------


async def test_server_certificate_expiry_warning(setup: Setup, running: list[ProxyProcess]) -> None:
    cert, key = setup.new_server_cert(days=5)
    setup.mount.swap(setup.mount.add_version(cert, key))
    proxy = await ProxyProcess.start(
        setup.config(watch=False, extra_tls="\n  expiry_warning_days: 14")
    )
    running.append(proxy)
    ready_at = next(i for i, m in enumerate(proxy.lines) if m.get("event") == "ready")
    warnings = [m for m in proxy.lines[:ready_at] if m.get("event") == "cert_expiry"]
    assert len(warnings) == 1, proxy.lines
    warning = warnings[0]
    assert warning["level"] == "warning"
    assert warning["file"] == str(setup.mount.cert), warning
    assert warning["expiry_warning_days"] == 14, warning
    assert 4.9 < float(warning["days_left"]) <= 5.0

    # and again on every reload
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.message(RELOADED, since=mark)
    assert any(m.get("event") == "cert_expiry" for m in proxy.lines[mark:])


# --- start-up race and CRL failure policy --------------------------------------------------


async def test_a_rotation_during_startup_is_not_missed(setup: Setup) -> None:
    from proxy.app import serve
    from proxy.loading import load_acl, load_config
    from proxy.reloading import watched_files
    from proxy.tlsctx import server_context
    from proxy.watch import snapshot

    config = load_config(str(setup.config()))
    baseline = snapshot(watched_files(config))  # what serve() records before loading
    policy = load_acl(config.acl)
    ctx = server_context(config.tls, source=config.source)  # what serve() loads first
    cert2, key2 = setup.new_server_cert()
    setup.mount.swap(setup.mount.add_version(cert2, key2))  # rotated while it starts up

    seen: list[logging.LogRecord] = []
    changed = asyncio.Event()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)
            changed.set()

    async def record(predicate: Callable[[logging.LogRecord], bool], timeout: float):
        async with asyncio.timeout(timeout):
            while True:
                for r in seen:
                    if predicate(r):
                        return r
                changed.clear()
                await changed.wait()

    handler = Keep()
    logger = logging.getLogger("beanstalk_proxy")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    task = asyncio.get_running_loop().create_task(serve(config, ctx, policy, baseline=baseline))
    try:
        ready = await record(lambda r: getattr(r, "fields", {}).get("event") == "ready", 10)
        port = int(ready.fields["listen"].rsplit(":", 1)[1])  # type: ignore[attr-defined]
        # the files on disk differ from what was loaded: the watcher must reload them
        # (ten watch intervals of 0.2 s)
        await record(lambda r: r.getMessage() == RELOADED, 2.0)
        assert await peer_serial_of_new_connection(setup, port) == cert_serial(cert2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.parametrize("mode", [None, "refuse", "keep_last"])
@pytest.mark.parametrize("breakage", ["unreadable", "expired"])
async def test_unusable_crl_on_reload(
    setup: Setup,
    running: list[ProxyProcess],
    beanstalkd: Beanstalkd,
    breakage: str,
    mode: str | None,
) -> None:
    """An unreadable or expired CRL on reload is logged as an error; by default (and with
    ``tls.crl_failure: refuse``) every new client is then refused (fail closed), with
    ``keep_last`` the last good CRL stays in force. Live connections are not cut."""
    extra = f"\n  crl_failure: {mode}" if mode else ""
    proxy = await ProxyProcess.start(setup.config(crl=True, extra_tls=extra))
    running.append(proxy)
    await proxy.arm_watcher(setup.acl)
    live = await setup.connect(proxy.port)
    assert await live.line(b"list-tube-used") == b"USING default"

    crl = setup.ca / "crl.pem"
    tmp = crl.with_name(".crl.tmp")
    if breakage == "unreadable":
        tmp.write_bytes(b"-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
    else:
        now = utcnow()
        make_crl(
            setup.ca,
            tmp,
            last_update=now - dt.timedelta(days=2),
            next_update=now - dt.timedelta(days=1),
        )
    mark = proxy.mark()
    os.replace(tmp, crl)
    err = await proxy.wait_for(
        lambda m: m.get("level") == "error" and m.get("event") == "reload_failed", since=mark
    )
    assert err["key"].startswith("tls.crl") and err["line"] > 0, err
    assert err["kept"] == ("previous" if mode == "keep_last" else "refuse_all"), err
    if breakage == "expired":
        assert "expired" in err["error"], err

    before = int((await server_stats(beanstalkd.port))["total-connections"])
    answer = None
    try:
        c = await setup.connect(proxy.port)
    except (ssl.SSLError, OSError):
        pass
    else:
        try:
            await c.send(b"list-tube-used\r\n")
            answer = (await c.reply(timeout=5))[0]
        except (ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        await c.close()
    after = int((await server_stats(beanstalkd.port))["total-connections"])
    if mode == "keep_last":
        assert answer == b"USING default"
        assert after == before + 2  # the admitted client's upstream and the probe
    else:
        assert answer is None, f"a client was admitted while the CRL is {breakage}: {answer!r}"
        assert after == before + 1  # only the probe: nothing reached beanstalkd
        refused = await proxy.wait_for(
            lambda m: "handshake failed" in m.get("message", ""), since=mark
        )
        assert refused["event"] == "handshake_failed" and refused["reason"], refused
    # the connection made before the bad CRL keeps working either way
    assert await live.put(b"still here") == b"INSERTED 1"
    await live.close()

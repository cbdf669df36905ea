"""The real ``serve`` command as a subprocess: SIGTERM in the middle of a stream of pipelined
puts loses no acknowledged job and releases reserved ones; SIGHUP with a broken ACL keeps the
old policy, with a good one changes what a live connection may do.

Synchronisation is on the proxy's own log lines (read from its stderr as they come) and on
protocol replies; nothing sleeps to wait for something to happen."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PKI, Beanstalkd, Client, ProcessLog, direct, parse_yaml_map, start_serve

SHUTDOWN_TIMEOUT = 5.0
DISCONNECTED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)

ACL_V1: dict[str, Any] = {
    "principals": [
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
    ],
    "rules": [
        {"principal": "admin", "tubes": ["*"], "allow": ["all"]},
        {"principal": "billing", "tubes": ["invoices", "invoices.*"], "allow": ["produce"]},
    ],
}


class ProxyProcess(ProcessLog):
    """``python -m proxy serve`` with its stderr collected line by line."""

    port = 0

    async def connect(self, pki: PKI, name: str) -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=pki.client_context(name), server_hostname="localhost"
        )
        return Client(reader, writer)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self.pump
        return code


def write_config(tmp: Path, pki: PKI, upstream_port: int, **limits: Any) -> Path:
    acl = tmp / "acl.yaml"
    if not acl.exists():
        acl.write_text(yaml.safe_dump(ACL_V1))
    config = {
        "listen": "127.0.0.1:0",
        "upstream": f"127.0.0.1:{upstream_port}",
        "tls": {
            "cert": str(pki.dir / "server.pem"),
            "key": str(pki.dir / "server.key"),
            "client_ca": pki.ca,
        },
        "acl": str(acl),
        "limits": {"shutdown_timeout": SHUTDOWN_TIMEOUT, "max_job_size": 1024, **limits},
        "log": {"format": "text", "level": "info"},
        "reload": {"watch": False},  # SIGHUP only: the tests decide when a reload happens
    }
    path = tmp / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def serve(pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    proc = await start_serve(write_config(tmp_path, pki, beanstalkd.port))
    p = ProxyProcess(proc)
    try:
        i = await p.wait_for(r"ready: listening ")
        m = re.search(r"ready: listening event=ready listen=127\.0\.0\.1:(\d+)", p.lines[i])
        assert m, p.lines[i]
        p.port = int(m.group(1))
        yield p
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(p.pump, 5)


async def close(c: Client) -> None:
    """Close a client connection whose peer may already be gone, never waiting forever."""
    try:
        async with asyncio.timeout(5):
            await c.close()
    except TimeoutError:
        c.writer.transport.abort()


async def stats_jobs(port: int, ids: list[int]) -> dict[int, dict[str, str]]:
    """``stats-job`` for every id over one direct, pipelined connection; missing ids omitted."""
    d = await direct(port)
    try:
        await d.send(b"".join(b"stats-job %d\r\n" % i for i in ids))
        out = {}
        for i in ids:
            line, body = await d.reply()
            if line.startswith(b"OK "):
                assert body is not None
                out[i] = parse_yaml_map(body)
            else:
                assert line == b"NOT_FOUND", line
        return out
    finally:
        await d.close()


# --------------------------------------------------------------------------------------------
# SIGTERM


async def test_sigterm_during_pipelined_puts_loses_no_acknowledged_job(
    serve: ProxyProcess, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    c = await serve.connect(pki, "admin")
    inserted: list[int] = []
    other: list[bytes] = []
    enough = asyncio.Event()
    closed = asyncio.Event()
    body = b"payload-%05d"
    batch = 64
    window = 2048  # puts written but not yet answered: always plenty in flight
    progress = asyncio.Event()

    written = 0

    async def writer() -> None:
        # Pipelined, but flow-controlled by the replies: StreamWriter.drain() does not always
        # suspend, so an unbounded writer could starve the reader (and the test's timeouts).
        nonlocal written
        n = 0
        with contextlib.suppress(*DISCONNECTED):
            while not closed.is_set():
                if n - len(inserted) - len(other) > window:
                    progress.clear()
                    await progress.wait()
                    continue
                chunk = []
                for _ in range(batch):
                    data = body % n
                    chunk.append(b"put 0 0 60 %d\r\n%s\r\n" % (len(data), data))
                    n += 1
                written = n  # handed to the connection (sent, or failing to be sent)
                await c.send(b"".join(chunk))

    async def reader() -> None:
        try:
            while True:
                line = (await c.reader.readuntil(b"\r\n"))[:-2]
                if line.startswith(b"INSERTED "):
                    inserted.append(int(line.split()[1]))
                    if len(inserted) >= 500:
                        enough.set()
                else:
                    other.append(line)
                progress.set()
        except DISCONNECTED:
            pass
        finally:
            closed.set()  # the proxy closed the connection: stop writing into it
            progress.set()

    w = asyncio.create_task(writer())
    r = asyncio.create_task(reader())
    try:
        async with asyncio.timeout(20):
            await enough.wait()
        mark = len(serve.lines)
        serve.signal(signal.SIGTERM)
        sent_at = time.monotonic()
        await serve.wait_for(r"shutting down event=shutdown connections=1 ", start=mark)
        async with asyncio.timeout(SHUTDOWN_TIMEOUT + 5):
            await r  # until the proxy closes the connection
        code = await serve.exit_code(timeout=SHUTDOWN_TIMEOUT + 5)
        elapsed = time.monotonic() - sent_at
    finally:
        w.cancel()
        r.cancel()
        await asyncio.gather(w, r, return_exceptions=True)
        await close(c)

    assert code == 0, "\n".join(serve.lines)
    assert elapsed < SHUTDOWN_TIMEOUT, elapsed  # drained, not cut at the deadline
    assert other == [], other[:5]
    assert len(inserted) >= 500
    assert inserted == sorted(inserted)
    assert written >= len(inserted) + len(other)
    found = await stats_jobs(beanstalkd.port, inserted)
    missing = [i for i in inserted if i not in found]
    assert missing == [], f"{len(missing)} acknowledged jobs lost, e.g. {missing[:5]}"
    stats = parse_yaml_map(await _direct_stats(beanstalkd.port))
    # Every job beanstalkd stored is ready (nothing half-done), and the client saw the
    # acknowledgement of every one: the proxy lets its TLS layer finish closing before it
    # exits, so no reset destroys replies the client has not read yet.
    assert int(stats["current-jobs-ready"]) == int(stats["cmd-put"])
    assert int(stats["cmd-put"]) == len(inserted)
    assert serve.lines and any("close peer=" in line for line in serve.lines)


async def _direct_stats(port: int) -> bytes:
    d = await direct(port)
    try:
        line, body = await d.call(b"stats")
        assert line.startswith(b"OK") and body is not None
        return body
    finally:
        await d.close()


async def test_sigterm_releases_reserved_jobs_and_answers_blocked_reserves(
    serve: ProxyProcess, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    producer = await serve.connect(pki, "admin")
    job = int((await producer.put(b"work")).split()[1])
    holder = await serve.connect(pki, "admin")
    line, payload = await holder.call(b"reserve-with-timeout 5")
    assert (line, payload) == (b"RESERVED %d 4" % job, b"work")
    # A worker blocked on another tube (so the job released below cannot go to it; if it
    # could, beanstalkd might hand it over in the instant before this connection closes too).
    waiter = await serve.connect(pki, "admin")
    assert await waiter.line(b"watch other") == b"WATCHING 2"
    assert await waiter.line(b"ignore default") == b"WATCHING 1"
    await waiter.send(b"reserve-with-timeout 60\r\n")
    assert (await stats_jobs(beanstalkd.port, [job]))[job]["state"] == "reserved"

    mark = len(serve.lines)
    sent_at = time.monotonic()
    serve.signal(signal.SIGTERM)
    await serve.wait_for(r"shutting down event=shutdown connections=3 ", start=mark)
    # The blocked reserve gets beanstalkd's answer, then every connection is closed.
    assert await waiter.closed(timeout=SHUTDOWN_TIMEOUT + 5) == b"TIMED_OUT\r\n"
    assert await holder.closed(timeout=SHUTDOWN_TIMEOUT + 5) == b""
    assert await producer.closed(timeout=SHUTDOWN_TIMEOUT + 5) == b""
    assert await serve.exit_code(timeout=SHUTDOWN_TIMEOUT + 5) == 0
    assert time.monotonic() - sent_at < SHUTDOWN_TIMEOUT
    for c in (producer, holder, waiter):
        await close(c)

    # The job the holder had reserved is ready again for the next worker.
    info = (await stats_jobs(beanstalkd.port, [job]))[job]
    assert info["state"] == "ready"
    assert info["reserves"] == "1"
    d = await direct(beanstalkd.port)
    line, payload = await d.call(b"reserve-with-timeout 0")
    assert (line, payload) == (b"RESERVED %d 4" % job, b"work")
    await d.close()


async def test_sigterm_with_no_connections_exits_at_once(serve: ProxyProcess) -> None:
    sent_at = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert await serve.exit_code(timeout=SHUTDOWN_TIMEOUT) == 0
    assert time.monotonic() - sent_at < 2
    await serve.wait_for(r"shutting down event=shutdown connections=0 ")


# --------------------------------------------------------------------------------------------
# SIGHUP


async def test_sighup_broken_acl_keeps_policy_good_acl_changes_live_connection(
    serve: ProxyProcess, pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.yaml"
    billing = await serve.connect(pki, "billing")
    assert await billing.line(b"use invoices") == b"USING invoices"
    assert (await billing.put(b"one")).startswith(b"INSERTED ")

    # 1. A broken ACL (valid YAML, unknown verb): rejected whole, the old policy stays.
    broken = {
        **ACL_V1,
        "rules": [*ACL_V1["rules"], {"principal": "billing", "tubes": ["x"], "allow": ["fly"]}],
    }
    acl.write_text(yaml.safe_dump(broken))
    mark = len(serve.lines)
    serve.signal(signal.SIGHUP)
    i = await serve.wait_for(r"reload: ACL not reloaded, keeping the previous policy", start=mark)
    assert f"file={acl}" in serve.lines[i] and "key=rules[2]" in serve.lines[i], serve.lines[i]
    assert (await billing.put(b"two")).startswith(b"INSERTED ")

    # 2. Not even YAML: same.
    acl.write_text("rules: [ {principal: billing\n")
    mark = len(serve.lines)
    serve.signal(signal.SIGHUP)
    await serve.wait_for(r"reload: ACL not reloaded", start=mark)
    assert (await billing.put(b"three")).startswith(b"INSERTED ")

    # 3. A good new ACL: billing may now only produce to invoices.v2. The live connection's
    # next put (its used tube is still `invoices`) is denied, v2 is allowed.
    good = {
        **ACL_V1,
        "rules": [
            ACL_V1["rules"][0],
            {"principal": "billing", "tubes": ["invoices.v2"], "allow": ["produce"]},
        ],
    }
    acl.write_text(yaml.safe_dump(good))
    mark = len(serve.lines)
    serve.signal(signal.SIGHUP)
    await serve.wait_for(
        rf"reload: ACL loaded event=reload what=acl file={re.escape(str(acl))} ", start=mark
    )
    assert await billing.put(b"four") == b"UNKNOWN_COMMAND"  # acl_denial_reply: compatible
    assert await billing.line(b"use invoices.v2") == b"USING invoices.v2"
    assert (await billing.put(b"five")).startswith(b"INSERTED ")
    await serve.wait_for(r'command=put|"command": ?"put"', start=mark)  # the denial's audit line

    stats = parse_yaml_map(await _direct_stats(beanstalkd.port))
    assert stats["cmd-put"] == "4"  # one, two, three, five; the denied put never arrived

    serve.signal(signal.SIGTERM)
    assert await billing.closed(timeout=SHUTDOWN_TIMEOUT + 5) == b""
    await close(billing)
    assert await serve.exit_code(timeout=SHUTDOWN_TIMEOUT + 5) == 0

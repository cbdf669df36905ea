"""Client mode: an unmodified beanstalkd client library (greenstalk, plain TCP) talks to the
local tunnel, which carries it over mutual TLS to the proxy and on to a real beanstalkd."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import greenstalk
import pytest
from conftest import (
    PKI,
    Beanstalkd,
    LogReader,
    RunningProxy,
    free_port,
    server_stats,
    start_tunnel,
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
        await log.wait_for(r"reload: client certificate, key and CA reloaded", timeout=15)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        assert proc.stderr is not None
        proc.stderr.close()

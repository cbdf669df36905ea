"""Live sessions: ``/connections`` on the status listener of a real proxy in front of a real
beanstalkd (contents per session, a client waiting in ``reserve``, the bound), ``beanstalk-proxy
status`` printing it as a table, ``/connections`` off by default (404 and a clear CLI message),
an unreachable URL, the ``metrics.connections`` config key, and the CLI's ``serve`` wiring (on
uvloop when installed: build_info says which loop runs)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PKI,
    Beanstalkd,
    Client,
    StatusListener,
    free_port,
    serve_process,
    serving,
    start_proxy,
    status_listener,
    write_serve_config,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from test_metrics import http, scrape

from proxy.config import Endpoint, parse_config
from proxy.errors import ConfigError
from proxy.httpd import StatusServer
from proxy.sessions_view import render, snapshot

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def _live(pki: PKI, beanstalkd: Beanstalkd, enabled: bool) -> AsyncIterator[StatusListener]:
    async with serving(pki, beanstalkd.port) as running:
        connections = (lambda: render(running.server)) if enabled else None
        async with status_listener(running, connections=connections) as listener:
            yield listener


@pytest.fixture
async def live(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[StatusListener]:
    async with _live(pki, beanstalkd, enabled=True) as status:
        yield status


@pytest.fixture
async def off(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[StatusListener]:
    async with _live(pki, beanstalkd, enabled=False) as status:
        yield status


async def sessions(port: int) -> dict[str, Any]:
    code, headers, body = await http(port, "/connections")
    assert code == 200, body
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def by_principal(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {e["principal"]: e for e in doc["connections"]}
    assert len(out) == len(doc["connections"])
    return out


async def until_state(port: int, principal: str, state: str) -> dict[str, Any]:
    """Bounded polling: the session's state is server-side bookkeeping with no event."""
    async with asyncio.timeout(10):
        while True:
            entry = by_principal(await sessions(port)).get(principal)
            if entry is not None and entry["state"] == state:
                return entry
            await asyncio.sleep(0.01)


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``beanstalk-proxy`` in a subprocess (the event loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def fingerprint(pki: PKI, name: str) -> str:
    cert = x509.load_pem_x509_certificate(Path(pki.cert(name)[0]).read_bytes())
    return "sha256:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def subject(pki: PKI, name: str) -> str:
    cert = x509.load_pem_x509_certificate(Path(pki.cert(name)[0]).read_bytes())
    return cert.subject.rfc4514_string()


# --------------------------------------------------------------------------------------------


async def test_connections_lists_each_session(live: StatusListener, pki: PKI) -> None:
    assert (await sessions(live.port))["connections"] == []

    admin = await live.proxy.connect("admin")
    sent = 0

    async def call(c: Client, line: bytes, body: bytes | None = None) -> bytes:
        nonlocal sent
        sent += len(line) + 2 + (len(body) + 2 if body is not None else 0)
        return await c.line(line, body)

    assert await call(admin, b"use jobs") == b"USING jobs"
    assert await call(admin, b"watch jobs") == b"WATCHING 2"
    assert (await call(admin, b"put 0 0 60 3", b"one")).startswith(b"INSERTED ")
    assert await call(admin, b"use secrets.keys") == b"NOT_PERMITTED"
    reserved = await admin.call(b"reserve-with-timeout 0")
    sent += len(b"reserve-with-timeout 0\r\n")
    assert reserved[0].startswith(b"RESERVED ") and reserved[1] == b"one"

    # The worker blocks in reserve: invoices is empty.
    worker = await live.proxy.connect("worker")
    assert await worker.line(b"watch invoices") == b"WATCHING 2"
    assert await worker.line(b"ignore default") == b"WATCHING 1"
    await worker.send(b"reserve\r\n")
    w = await until_state(live.port, "worker", "waiting")

    doc = await sessions(live.port)
    assert doc["count"] == 2 and doc["truncated"] is False
    assert doc["pid"] == os.getpid()
    entries = by_principal(doc)
    assert set(entries) == {"admin", "worker"}
    a = entries["admin"]
    assert a["state"] == "idle"
    assert a["subject"] == subject(pki, "admin") and "CN=admin" in a["subject"]
    assert a["fingerprint"] == fingerprint(pki, "admin")
    assert a["peer"].startswith("127.0.0.1:")
    assert a["used"] == "jobs"  # the denied use left the used tube alone
    assert a["watched"] == ["default", "jobs"] and a["watched_count"] == 2
    assert a["reserved"] == 1
    assert a["commands"] == 5 and a["denied"] == 1 and a["pending"] == 0
    assert a["rate_limited"] == 0
    assert a["bytes_in"] == sent
    assert a["bytes_out"] > 0
    since = datetime.fromisoformat(a["since"])
    assert since.tzinfo is not None
    assert abs(datetime.now(UTC) - since) < timedelta(minutes=5)
    assert a["age"] >= 0 and a["idle"] >= 0
    # Oldest first.
    assert [e["principal"] for e in doc["connections"]] == ["admin", "worker"]

    assert w["subject"] == subject(pki, "worker") and "OU=jobs" in w["subject"]
    assert w["fingerprint"] == fingerprint(pki, "worker")
    assert w["used"] == "default"
    assert w["watched"] == ["invoices"] and w["watched_count"] == 1
    assert w["reserved"] == 0 and w["pending"] == 1 and w["commands"] == 3

    # The table: a header, one line per session, a count.
    code, out, err = await cli("status", "--metrics-url", f"http://127.0.0.1:{live.port}")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "PEER",
        "PRINCIPAL",
        "STATE",
        "AGE",
        "IDLE",
        "IN",
        "OUT",
        "CMDS",
        "DENIED",
        "USED",
        "WATCHED",
        "RSV",
        "FINGERPRINT",
        "SUBJECT",
    ]
    rows = {line.split()[1]: line.split() for line in lines[1:3]}
    assert rows["admin"][2] == "idle"
    assert rows["admin"][5] == str(sent)
    assert rows["admin"][7:12] == ["5", "1", "jobs", "default,jobs", "1"]
    assert rows["admin"][12] == fingerprint(pki, "admin")[:19]
    assert rows["worker"][2] == "waiting"
    assert rows["worker"][9:12] == ["default", "invoices", "0"]
    assert lines[3] == "2 connections"
    # --json prints the document itself.
    code, out, err = await cli("status", "--json", "--metrics-url", f"127.0.0.1:{live.port}")
    assert code == 0, err
    assert {e["principal"] for e in json.loads(out)["connections"]} == {"admin", "worker"}

    # A job in invoices ends the wait: the worker holds it and is idle again.
    assert await admin.line(b"use invoices") == b"USING invoices"
    assert (await admin.put(b"two")).startswith(b"INSERTED ")
    line, body = await worker.reply()
    assert line.startswith(b"RESERVED ") and body == b"two"
    w = await until_state(live.port, "worker", "idle")
    assert w["reserved"] == 1 and w["pending"] == 0

    # Closed sessions leave the list.
    await worker.close()
    await admin.close()
    async with asyncio.timeout(10):
        while (await sessions(live.port))["connections"]:
            await asyncio.sleep(0.01)
    code, out, err = await cli("status", "--metrics-url", f"http://127.0.0.1:{live.port}/")
    assert (code, out) == (0, "no client connections\n0 connections\n"), err


async def test_refused_clients_are_not_listed(live: StatusListener, pki: PKI) -> None:
    from test_metrics import _refused

    await _refused(live.proxy, pki.client_context("stranger"))
    await _refused(live.proxy, pki.client_context(None))
    c = await live.proxy.connect("inspector")
    assert await c.line(b"list-tube-used") == b"USING default"
    doc = await sessions(live.port)
    assert [e["principal"] for e in doc["connections"]] == ["inspector"]
    assert doc["count"] == 1
    await c.close()


async def test_the_list_is_bounded(live: StatusListener) -> None:
    clients = [await live.proxy.connect("admin") for _ in range(3)]
    for c in clients:
        assert await c.line(b"list-tube-used") == b"USING default"
    doc = snapshot(live.proxy.server, limit=2)
    assert doc["count"] == 3 and doc["truncated"] is True
    assert len(doc["connections"]) == 2
    ages = [e["age"] for e in doc["connections"]]
    assert ages == sorted(ages, reverse=True)  # the oldest are kept
    full = snapshot(live.proxy.server)
    assert full["truncated"] is False and len(full["connections"]) == 3
    # render() builds the same document a slice at a time, whatever the slice size.
    for chunk in (1, 2, 3, 200):
        for limit in (2, 3):
            doc = json.loads(await render(live.proxy.server, limit=limit, chunk=chunk))
            want = snapshot(live.proxy.server, limit=limit)
            assert {k: v for k, v in doc.items() if k not in ("time", "connections")} == {
                k: v for k, v in want.items() if k not in ("time", "connections")
            }
            strip = ("age", "idle")
            assert [{k: v for k, v in e.items() if k not in strip} for e in doc["connections"]] == [
                {k: v for k, v in e.items() if k not in strip} for e in want["connections"]
            ]
    empty = json.loads(await render(live.proxy.server, limit=0))
    assert empty["connections"] == [] and empty["truncated"] is True
    # Each entry lists at most MAX_WATCHED tubes, with the full count beside.
    from proxy.sessions_view import MAX_WATCHED

    c = clients[0]
    for i in range(MAX_WATCHED + 5):
        assert (await c.line(b"watch t%d" % i)).startswith(b"WATCHING ")
    entry = next(e for e in (await sessions(live.port))["connections"] if e["watched_count"] > 1)
    assert entry["watched_count"] == MAX_WATCHED + 6
    assert len(entry["watched"]) == MAX_WATCHED
    for c in clients:
        await c.close()


async def test_connections_is_off_unless_enabled(off: StatusListener) -> None:
    c = await off.proxy.connect("admin")
    assert await c.line(b"list-tube-used") == b"USING default"
    code, _, body = await http(off.port, "/connections")
    assert code == 404
    assert b"metrics.connections" in body
    assert await c.line(b"list-tube-used") == b"USING default"  # nothing else changed
    code, _, _ = await http(off.port, "/metrics")
    assert code == 200
    code, out, err = await cli("status", "--metrics-url", f"http://127.0.0.1:{off.port}")
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert "404" in err and "metrics.connections: true" in err
    await c.close()


async def test_status_cli_errors() -> None:
    port = free_port()  # nothing listens there
    code, out, err = await cli("status", "--metrics-url", f"http://127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{port}/connections")
    assert "metrics.listen" in err
    code, out, err = await cli("status", "--metrics-url", "file:///etc/passwd")
    assert code == 1 and out == ""
    assert "only http:// and https://" in err
    code, _, err = await cli("status")
    assert code == 2 and "--metrics-url" in err


async def test_status_cli_rejects_a_document_that_is_not_a_session_list(
    live: StatusListener,
) -> None:
    # /healthz answers 200 with text: not what status expects.
    code, out, err = await cli(
        "status", "--metrics-url", f"http://127.0.0.1:{live.port}/healthz?x=/connections"
    )
    assert code == 1 and out == ""
    assert "not a /connections document" in err


# --------------------------------------------------------------------------------------------
# the config key


def _config(metrics: object) -> dict[str, Any]:
    return {
        "upstream": "127.0.0.1:11300",
        "tls": {"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"},
        "acl": "acl.yaml",
        "metrics": metrics,
    }


def test_metrics_connections_key() -> None:
    assert (
        parse_config(_config({"listen": "127.0.0.1:9400"}), "p.yaml").metrics_connections is False
    )
    assert parse_config(_config(None), "p.yaml").metrics_connections is False
    on = parse_config(_config({"listen": "127.0.0.1:9400", "connections": True}), "p.yaml")
    assert on.metrics_connections is True
    off = parse_config(_config({"listen": "127.0.0.1:9400", "connections": False}), "p.yaml")
    assert off.metrics_connections is False


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"listen": "127.0.0.1:9400", "connections": "yes"}, "expected true or false, got"),
        ({"listen": "127.0.0.1:9400", "connections": 1}, "expected true or false, got"),
        ({"connections": True}, "needs metrics.listen"),
        ({"listen": "127.0.0.1:9400", "conections": True}, "did you mean 'connections'"),
    ],
)
def test_metrics_connections_key_rejections(metrics: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(metrics), "p.yaml")
    assert info.value.key.startswith("metrics.")
    assert reason in str(info.value)


# --------------------------------------------------------------------------------------------
# through `serve`: the wiring in the CLI, on the loop the CLI picks


def _write_config(tmp: Path, pki: PKI, upstream: int, port: int, status: int, on: bool) -> Path:
    metrics = {"listen": f"127.0.0.1:{status}", "connections": on}
    return write_serve_config(tmp, pki, upstream, port, metrics=metrics)


@pytest.mark.parametrize("on", [True, False])
async def test_serve_wires_connections_and_build_info(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd, on: bool
) -> None:
    port, status = free_port(), free_port()
    cfg = _write_config(tmp_path, pki, beanstalkd.port, port, status, on)
    with serve_process(cfg) as log:
        proc = log.proc
        await log.wait_for(r"ready: listening")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki.client_context("admin"), server_hostname="localhost"
        )
        c = Client(reader, writer)
        assert await c.line(b"use jobs") == b"USING jobs"
        s = await scrape(status)
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        info = [dict(labels) for (name, labels), _ in s.items() if name.endswith("build_info")]
        assert [i["loop"] for i in info] == [loop]
        code, _, body = await http(status, "/connections")
        if on:
            assert code == 200
            doc = json.loads(body)
            assert doc["pid"] == proc.pid
            assert [(e["principal"], e["used"]) for e in doc["connections"]] == [("admin", "jobs")]
        else:
            assert code == 404
        await c.close()


async def test_status_cli_reads_several_listeners(live: StatusListener) -> None:
    # With --workers N each worker has its own listener; here the same one twice.
    c = await live.proxy.connect("billing")
    assert await c.line(b"use invoices") == b"USING invoices"
    url = f"http://127.0.0.1:{live.port}"
    code, out, err = await cli("status", "--metrics-url", url, "--metrics-url", url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["PID", "PEER", "PRINCIPAL"]
    assert [line.split()[0] for line in lines[1:3]] == [str(os.getpid())] * 2
    assert [line.split()[2] for line in lines[1:3]] == ["billing", "billing"]
    assert lines[3:] == ["2 connections"]
    await c.close()


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
async def test_connections_on_a_non_loopback_listener_is_warned_about(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    running = await start_proxy(pki, beanstalkd.port)
    srv = StatusServer(
        Endpoint(host, 0, None),
        running.server.metrics,
        running.server.config.upstream,
        connections=lambda: render(running.server),
    )
    with caplog.at_level("INFO", logger="beanstalk_proxy"):
        await srv.start()
    try:
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert [("not loopback" in r.getMessage()) for r in warnings] == ([True] if warned else [])
        paths = [getattr(r, "fields", {}).get("paths", "") for r in caplog.records]
        assert any("/connections" in p for p in paths), paths
    finally:
        await srv.close()
        await running.server.close()

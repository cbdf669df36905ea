"""The status listener against a real proxy and a real beanstalkd: /healthz, /metrics counters
moving as commands are allowed and denied, handshake failures by reason, and /readyz following
beanstalkd down, draining and back."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import signal
import ssl
from collections.abc import AsyncIterator

import pytest
from conftest import (
    PKI,
    Beanstalkd,
    Client,
    RunningProxy,
    StatusListener,
    http,
    serving,
    status_listener,
    until,
)
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import proxy


@pytest.fixture
async def status(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[StatusListener]:
    async with (
        serving(pki, beanstalkd.port) as running,
        status_listener(running, timeout=2.0) as listener,
    ):
        yield listener


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    code, headers, body = await http(port, "/metrics")
    assert code == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --------------------------------------------------------------------------------------------


async def test_healthz_and_prometheus_content_type(status: StatusListener) -> None:
    code, headers, body = await http(status.port, "/healthz")
    assert (code, body) == (200, b"ok\n")
    code, headers, body = await http(status.port, "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert int(headers["content-length"]) == len(body)
    assert b"# TYPE beanstalk_proxy_connections_total counter" in body
    code, _, _ = await http(status.port, "/nope")
    assert code == 404
    code, _, _ = await http(status.port, "/metrics", method="POST")
    assert code == 405
    code, headers, body = await http(status.port, "/healthz", method="HEAD")
    assert code == 200 and body == b"" and headers["content-length"] == "3"


async def test_commands_denials_connections_and_bytes(status: StatusListener) -> None:
    port = status.port
    before = await scrape(port)
    assert value(before, "beanstalk_proxy_connections_open") == 0

    sent: dict[str, int] = {"billing": 0, "inspector": 0}
    received: dict[str, int] = {"billing": 0, "inspector": 0}

    async def call(name: str, c: Client, data: bytes) -> bytes:
        sent[name] += len(data)
        await c.send(data)
        line, body = await c.reply()
        received[name] += len(line) + 2 + (len(body) + 2 if body is not None else 0)
        return line

    billing = await status.proxy.connect("billing")
    inspector = await status.proxy.connect("inspector")
    assert await call("billing", billing, b"use invoices\r\n") == b"USING invoices"
    assert (await call("billing", billing, b"put 0 0 60 3\r\nabc\r\n")).startswith(b"INSERTED ")
    assert await call("inspector", inspector, b"use reports\r\n") == b"USING reports"
    assert await call("inspector", inspector, b"put 0 0 60 3\r\nxyz\r\n") == b"NOT_PERMITTED"
    assert await call("inspector", inspector, b"put 0 0 60 3\r\nxyz\r\n") == b"NOT_PERMITTED"
    assert await call("billing", billing, b"use secrets.keys\r\n") == b"NOT_PERMITTED"

    live = await scrape(port)
    assert value(live, "beanstalk_proxy_connections_open") == 2
    assert value(live, "beanstalk_proxy_connections_total") == 2
    assert value(live, "beanstalk_proxy_commands_total", command="put", decision="allowed") == 1
    assert value(live, "beanstalk_proxy_commands_total", command="put", decision="denied") == 2
    assert value(live, "beanstalk_proxy_commands_total", command="use", decision="allowed") == 2
    assert value(live, "beanstalk_proxy_commands_total", command="use", decision="denied") == 1
    assert (
        value(
            live,
            "beanstalk_proxy_denials_total",
            principal="inspector",
            tube="reports",
            command="put",
        )
        == 2
    )
    assert (
        value(
            live,
            "beanstalk_proxy_denials_total",
            principal="billing",
            tube="secrets.keys",
            command="use",
        )
        == 1
    )
    assert value(live, "beanstalk_proxy_command_latency_seconds_count") >= 1
    # Bytes are plaintext, counted exactly, while the connections are still open ...
    total_sent, total_received = sum(sent.values()), sum(received.values())
    assert value(live, "beanstalk_proxy_bytes_total", direction="client_to_proxy") == total_sent
    assert value(live, "beanstalk_proxy_bytes_total", direction="proxy_to_client") == (
        total_received
    )

    await billing.close()
    await inspector.close()

    async def closed() -> bool:
        s = await scrape(port)
        return value(s, "beanstalk_proxy_connections_open") == 0

    await until(closed)
    # ... and nothing is lost when they are folded into the totals of closed connections.
    after = await scrape(port)
    assert value(after, "beanstalk_proxy_commands_total", command="put", decision="allowed") == 1
    assert value(after, "beanstalk_proxy_commands_total", command="put", decision="denied") == 2
    assert value(after, "beanstalk_proxy_bytes_total", direction="client_to_proxy") == total_sent
    assert value(after, "beanstalk_proxy_bytes_total", direction="proxy_to_client") == (
        total_received
    )
    assert value(after, "beanstalk_proxy_connections_total") == 2


async def _refused(proxy: RunningProxy, ctx: ssl.SSLContext) -> None:
    """Connect with ``ctx``; the proxy must end the connection (during or right after the
    handshake). Returns once the client has seen that."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", proxy.port, ssl=ctx, server_hostname="localhost"),
            10,
        )
    except (ssl.SSLError, ConnectionError):
        return
    try:
        writer.write(b"list-tubes\r\n")
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_handshake_failures_by_reason(status: StatusListener, pki: PKI) -> None:
    proxy = status.proxy
    # No client certificate at all.
    await _refused(proxy, pki.client_context(None))
    # A valid certificate that no principal matches.
    await _refused(proxy, pki.client_context("stranger"))
    # A certificate from a CA the proxy does not trust.
    await _refused(proxy, pki.client_context("admin", ca_dir=pki.other))

    want = {"no_certificate": 1, "no_principal": 1, "verify_failed": 1}

    async def counted() -> bool:
        s = await scrape(status.port)
        got = {
            reason: value(s, "beanstalk_proxy_handshake_failures_total", reason=reason)
            for reason in want
        }
        return got == want

    await until(counted)
    s = await scrape(status.port)
    assert value(s, "beanstalk_proxy_connections_total") == 3
    assert value(s, "beanstalk_proxy_connections_open") == 0
    # A good connection afterwards is counted, and not as a failure.
    c = await proxy.connect("admin")
    assert await c.line(b"list-tube-used") == b"USING default"
    s = await scrape(status.port)
    assert value(s, "beanstalk_proxy_connections_total") == 4
    assert (
        sum(v for (name, _), v in s.items() if name == "beanstalk_proxy_handshake_failures_total")
        == 3
    )
    await c.close()


async def test_readyz_follows_beanstalkd(status: StatusListener, beanstalkd: Beanstalkd) -> None:
    code, _, body = await http(status.port, "/readyz")
    assert (code, body) == (200, b"ok\n")

    await asyncio.to_thread(beanstalkd.stop)
    code, _, body = await http(status.port, "/readyz")
    assert code == 503
    assert b"unreachable" in body
    # /healthz is about the process, not the upstream.
    code, _, _ = await http(status.port, "/healthz")
    assert code == 200

    await asyncio.to_thread(beanstalkd.restart)
    code, _, body = await http(status.port, "/readyz")
    assert (code, body) == (200, b"ok\n")
    # And the proxy itself works again without a restart.
    c = await status.proxy.connect("admin")
    assert (await c.put(b"back")).startswith(b"INSERTED ")
    await c.close()


async def test_readyz_fails_while_beanstalkd_drains(
    status: StatusListener, beanstalkd: Beanstalkd
) -> None:
    code, _, _ = await http(status.port, "/readyz")
    assert code == 200
    beanstalkd.proc.send_signal(signal.SIGUSR1)  # beanstalkd's drain mode

    async def draining() -> bool:
        code, _, body = await http(status.port, "/readyz")
        return code == 503 and b"draining" in body

    await until(draining)


async def test_standard_series_and_no_created(status: StatusListener) -> None:
    # One connection so every counter family has moved at least once.
    c = await status.proxy.connect("admin")
    assert await c.line(b"list-tube-used") == b"USING default"
    code, _, body = await http(status.port, "/metrics")
    assert code == 200
    text = body.decode()
    names = {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    created = sorted(n for n in names if n.endswith("_created"))
    assert created == []
    assert "_created" not in text
    s = await scrape(status.port)
    # The standard process and Python collectors run on the proxy's own registry.
    assert value(s, "process_open_fds") > 0
    assert value(s, "process_resident_memory_bytes") > 0
    assert value(s, "process_start_time_seconds") > 0
    assert ("process_cpu_seconds_total", frozenset()) in s
    assert any(name == "python_info" for name, _ in s)
    assert any(name == "python_gc_collections_total" for name, _ in s)
    # build_info: one series, value 1, labels saying what runs (pytest runs the default loop).
    info = [(labels, v) for (name, labels), v in s.items() if name == "beanstalk_proxy_build_info"]
    assert len(info) == 1
    labels, v = info[0]
    assert v == 1
    assert dict(labels) == {
        "version": proxy.__version__,
        "python": platform.python_version(),
        "openssl": " ".join(ssl.OPENSSL_VERSION.split()[:2]),
        "loop": "asyncio",
    }
    assert dict(labels)["openssl"].startswith(("OpenSSL ", "LibreSSL "))
    await c.close()

"""``proxy.aggregate``: the whole proxy's status endpoints, asked of the workers. Against fake
workers on unix sockets: sums and ``worker_up``, a worker that does not answer (counters kept,
``/healthz`` 503 naming it), a replaced worker (counters carried, never backwards),
``/connections`` merged oldest first, and a worker answering garbage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Beanstalkd
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import http

from proxy.aggregate import AggregateStatus, merge_sessions
from proxy.config import Endpoint


class FakeWorker:
    """Answers every request with ``status`` and ``body`` (or not at all when ``down``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status = 200
        self.metrics = ""
        self.sessions: dict[str, Any] = {"pid": 1, "count": 0, "connections": []}
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.path.unlink(missing_ok=True)  # Python 3.13 removes it on close

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1]
        body = {
            b"/metrics": self.metrics.encode(),
            b"/connections": json.dumps(self.sessions).encode(),
            b"/healthz": b"ok\n",
        }[path]
        writer.write(
            b"HTTP/1.0 %d X\r\nContent-Length: %d\r\n\r\n" % (self.status, len(body)) + body
        )
        await writer.drain()
        writer.close()


def metrics(started: float, accepted: int, open_now: int) -> str:
    return (
        "# TYPE beanstalk_proxy_connections_total counter\n"
        f"beanstalk_proxy_connections_total {accepted}\n"
        "# TYPE beanstalk_proxy_connections_open gauge\n"
        f"beanstalk_proxy_connections_open {open_now}\n"
        "# TYPE process_start_time_seconds gauge\n"
        f"process_start_time_seconds {started}\n"
    )


@pytest.fixture
async def setup(
    tmp_path: Path, beanstalkd: Beanstalkd
) -> AsyncIterator[tuple[AggregateStatus, list[FakeWorker]]]:
    workers = [FakeWorker(tmp_path / f"w{k}.sock") for k in range(2)]
    for w in workers:
        await w.start()
    agg = AggregateStatus(
        Endpoint("127.0.0.1", 0, None),
        Endpoint("127.0.0.1", beanstalkd.port, None),
        [Endpoint(None, None, str(w.path)) for w in workers],
        connections=True,
        timeout=2.0,
    )
    await agg.start()
    yield agg, workers
    await agg.close()
    for w in workers:
        if w.server is not None and w.server.is_serving():
            await w.stop()


async def scrape(agg: AggregateStatus) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert agg.port is not None
    code, _, body = await http(agg.port, "/metrics")
    assert code == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


ACCEPTED = ("beanstalk_proxy_connections_total", ())
OPEN = ("beanstalk_proxy_connections_open", ())


def up(k: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("beanstalk_proxy_worker_up", (("worker", str(k)),))


async def test_counters_never_go_backwards_when_a_worker_is_down_or_replaced(
    setup: tuple[AggregateStatus, list[FakeWorker]],
) -> None:
    agg, (w0, w1) = setup
    w0.metrics, w1.metrics = metrics(100.0, 5, 2), metrics(100.0, 3, 1)
    s = await scrape(agg)
    assert (s[ACCEPTED], s[OPEN], s[up(0)], s[up(1)]) == (8, 3, 1, 1)

    await w1.stop()  # down: its counters stay in the sum, its gauges do not
    s = await scrape(agg)
    assert (s[ACCEPTED], s[OPEN], s[up(0)], s[up(1)]) == (8, 2, 1, 0)
    assert agg.port is not None
    code, _, body = await http(agg.port, "/healthz")
    assert code == 503 and body.startswith(b"worker 1: no answer"), body

    w1.metrics = metrics(200.0, 1, 1)  # replaced: a new process counting from zero
    await w1.start()
    s = await scrape(agg)
    assert (s[ACCEPTED], s[OPEN], s[up(1)]) == (5 + 3 + 1, 3, 1)
    w0.metrics = metrics(100.0, 6, 2)
    s = await scrape(agg)
    assert s[ACCEPTED] == 6 + 3 + 1
    assert (await http(agg.port, "/healthz"))[:1] == (200,)
    per_worker = {k: v for k, v in s.items() if k[0] == "process_start_time_seconds"}
    assert sorted(per_worker.values()) == [100.0, 200.0]


async def test_a_worker_answering_an_error_is_reported(
    setup: tuple[AggregateStatus, list[FakeWorker]],
) -> None:
    agg, (w0, w1) = setup
    w0.metrics = w1.metrics = metrics(1.0, 1, 0)
    w1.status = 500
    s = await scrape(agg)
    assert (s[ACCEPTED], s[up(0)], s[up(1)]) == (1, 1, 0)
    assert agg.port is not None
    code, _, body = await http(agg.port, "/healthz")
    assert code == 503 and body.startswith(b"worker 1: HTTP 500"), body
    code, _, body = await http(agg.port, "/connections")
    assert code == 503 and body.startswith(b"worker 1"), body


async def test_connections_are_merged_and_ready_is_the_upstreams(
    setup: tuple[AggregateStatus, list[FakeWorker]],
) -> None:
    agg, (w0, w1) = setup
    w0.sessions = {
        "pid": 10,
        "count": 2,
        "connections": [{"peer": "a", "age": 5.0}, {"peer": "b", "age": 1.0}],
    }
    w1.sessions = {
        "pid": 11,
        "count": 1,
        "truncated": False,
        "connections": [{"peer": "c", "age": 3.0}],
    }
    assert agg.port is not None
    code, headers, body = await http(agg.port, "/connections")
    assert code == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert [(e["peer"], e["worker"], e["pid"]) for e in doc["connections"]] == [
        ("a", 0, 10),
        ("c", 1, 11),
        ("b", 0, 10),
    ]
    assert doc["count"] == 3 and doc["truncated"] is False
    assert doc["workers"] == [
        {"worker": 0, "pid": 10, "count": 2},
        {"worker": 1, "pid": 11, "count": 1},
    ]
    assert (await http(agg.port, "/readyz"))[0] == 200
    assert (await http(agg.port, "/metrics", "POST"))[0] == 405


def test_merge_sessions_is_bounded() -> None:
    docs = [
        (k, {"pid": k, "count": 3, "connections": [{"age": float(k * 3 + i)} for i in range(3)]})
        for k in range(2)
    ]
    doc = merge_sessions(docs, limit=4)
    assert [e["age"] for e in doc["connections"]] == [5.0, 4.0, 3.0, 2.0]
    assert doc["count"] == 6 and doc["truncated"] is True

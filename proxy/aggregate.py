"""The status endpoints of ``serve --workers N`` on the one configured ``metrics.listen``.

The aggregator is a child of the supervisor. On each request it asks every worker, on the
worker's private unix socket, concurrently and under a timeout, and answers for the whole
proxy:

- ``/metrics``: the workers' expositions merged by ``proxy.expo_merge`` (counters and
  histograms summed, per-process figures labelled ``worker``), plus
  ``beanstalk_proxy_worker_up{worker}``. A worker that does not answer contributes its last
  counters, so whole-proxy counters do not dip while it restarts; a replaced worker's last
  counters are carried from then on (its gauges are dropped), so the sums never go backwards.
  Counts a worker made after the last scrape before it died are lost.
- ``/healthz``: 200 when every worker answers its own ``/healthz``, else 503 naming the ones
  that do not.
- ``/readyz``: the aggregator's own upstream check (the workers share the upstream).
- ``/connections`` (when enabled): the workers' lists in one document, oldest first, each
  entry with its ``worker`` and ``pid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from proxy.config import Endpoint
from proxy.expo_merge import merge, merge_counters
from proxy.httpd import StatusServer
from proxy.metrics import Metrics

__all__ = ["AggregateStatus", "fetch", "merge_sessions"]

#: Seconds to wait for a worker's answer.
WORKER_TIMEOUT = 2.0
#: At most this many bytes of one worker's answer.
MAX_ANSWER = 64 * 1024 * 1024
#: At most this many sessions in one merged /connections document.
MAX_SESSIONS = 10_000

_START = re.compile(rb"^process_start_time_seconds(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


async def fetch(
    endpoint: Endpoint, path: str, timeout: float = WORKER_TIMEOUT
) -> tuple[int, bytes]:
    """GET ``path`` from a worker's status socket: (HTTP status, body)."""
    assert endpoint.path is not None
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(endpoint.path)
            writer.write(b"GET %s HTTP/1.0\r\nHost: worker\r\n\r\n" % path.encode())
            data = await reader.read(MAX_ANSWER)
            while chunk := await reader.read(MAX_ANSWER):
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise ValueError("answer too large")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(parts[1]), body


def merge_sessions(
    docs: Sequence[tuple[int, dict[str, Any]]], limit: int = MAX_SESSIONS
) -> dict[str, Any]:
    """One ``/connections`` document from ``(worker, document)`` pairs: every entry tagged
    with its worker and pid, the oldest first, at most ``limit`` of them."""
    entries: list[dict[str, Any]] = []
    workers = []
    count = 0
    truncated = False
    for worker, doc in docs:
        pid = doc.get("pid")
        listed = [e for e in doc.get("connections") or [] if isinstance(e, dict)]
        for entry in listed:
            entries.append({**entry, "worker": worker, "pid": pid})
        n = int(doc.get("count") or 0)
        count += n
        truncated = truncated or bool(doc.get("truncated"))
        workers.append({"worker": worker, "pid": pid, "count": n})
    entries.sort(key=_age, reverse=True)
    return {
        "pid": os.getpid(),
        "time": datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds"),
        "count": count,
        "truncated": truncated or len(entries) > limit,
        "workers": workers,
        "connections": entries[:limit],
    }


class _Worker:
    """What the aggregator remembers of one worker between scrapes."""

    __slots__ = ("endpoint", "last", "started")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.last: str | None = None  # its last exposition
        self.started: bytes | None = None  # its process_start_time_seconds, to see a new one


class AggregateStatus(StatusServer):
    """``StatusServer`` whose answers come from the workers."""

    def __init__(
        self,
        listen: Endpoint,
        upstream: Endpoint,
        workers: Sequence[Endpoint],
        connections: bool,
        timeout: float = 2.0,
    ) -> None:
        build = self._no_build if connections else None
        super().__init__(listen, Metrics(), upstream, timeout, connections=build)
        self.workers = [_Worker(e) for e in workers]
        self.retired = ""  # the summed counters of replaced workers
        self._one_scrape = asyncio.Lock()

    async def _no_build(self) -> bytes:  # pragma: no cover - /connections is routed below
        return b""

    async def _ask(self, path: str) -> list[tuple[int, bytes] | BaseException]:
        return await asyncio.gather(
            *(fetch(w.endpoint, path, self.timeout) for w in self.workers), return_exceptions=True
        )

    async def _route(self, head: bytes) -> tuple[int, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        path = (
            parts[1].split(b"?", 1)[0] if len(parts) == 3 and parts[0] in (b"GET", b"HEAD") else b""
        )
        if path == b"/metrics":
            async with self._one_scrape:
                return 200, CONTENT_TYPE_LATEST, await self._metrics()
        if path == b"/healthz":
            answers = await self._ask("/healthz")
            down = [f"worker {k}: {_why(a)}" for k, a in enumerate(answers) if _why(a) != "ok"]
            if down:
                return 503, "text/plain", ("\n".join(down) + "\n").encode()
            return 200, "text/plain", b"ok\n"
        if path == b"/connections" and self.connections is not None:
            answers = await self._ask("/connections")
            docs: list[tuple[int, dict[str, Any]]] = []
            for k, answer in enumerate(answers):
                if isinstance(answer, BaseException) or answer[0] != 200:
                    return 503, "text/plain", f"worker {k}: {_why(answer)}\n".encode()
                docs.append((k, json.loads(answer[1])))
            body = json.dumps(merge_sessions(docs), separators=(",", ":")).encode() + b"\n"
            return 200, "application/json", body
        return await super()._route(head)

    async def _metrics(self) -> bytes:
        answers = await self._ask("/metrics")
        inputs: list[tuple[str | None, str]] = []
        up = []
        for k, (worker, answer) in enumerate(zip(self.workers, answers, strict=True)):
            if isinstance(answer, BaseException) or answer[0] != 200:
                up.append(f'beanstalk_proxy_worker_up{{worker="{k}"}} 0\n')
                if worker.last is not None:
                    inputs.append((None, worker.last))  # its counters, until it is back
                continue
            up.append(f'beanstalk_proxy_worker_up{{worker="{k}"}} 1\n')
            text = answer[1].decode("utf-8")
            started = _START.search(answer[1])
            started_at = started[1] if started else None
            if worker.last is not None and started_at != worker.started:
                # A new process in this column: carry what the old one counted.
                self.retired = merge_counters([(None, self.retired), (None, worker.last)])
            worker.last, worker.started = text, started_at
            inputs.append((str(k), text))
        if self.retired:
            inputs.append((None, self.retired))
        inputs.append(
            (
                "-",
                "# HELP beanstalk_proxy_worker_up 1 if the worker answered this scrape\n"
                "# TYPE beanstalk_proxy_worker_up gauge\n" + "".join(up),
            )
        )
        return merge(inputs).encode("utf-8")


def _why(answer: tuple[int, bytes] | BaseException) -> str:
    if isinstance(answer, BaseException):
        detail = f": {answer}" if str(answer) else ""
        return f"no answer ({type(answer).__name__}{detail})"
    if answer[0] == 200:
        return "ok"
    return f"HTTP {answer[0]}: {answer[1][:200].decode('utf-8', 'replace').strip()}"


def _age(entry: dict[str, Any]) -> float:
    age = entry.get("age")
    return float(age) if isinstance(age, int | float) else 0.0

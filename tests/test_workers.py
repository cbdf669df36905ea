"""``serve --workers N``, run through the real CLI (so on uvloop when installed): N processes
share the listen port with SO_REUSEPORT; SIGHUP and SIGTERM sent to the supervisor reach every
worker; the workers behave as one proxy: one metrics address with the sums of all workers,
``/connections`` merged, connection limits for the whole proxy, and a worker killed with
SIGKILL releases its share and is replaced."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from conftest import (
    PKI,
    Beanstalkd,
    Client,
    LogReader,
    free_port,
    spawn_serve,
    until,
    write_serve_config,
)
from test_metrics import http, scrape, value


def _write_config(tmp: Path, pki: PKI, upstream: int, port: int) -> Path:
    return write_serve_config(tmp, pki, upstream, port)


async def _connect(pki: PKI, port: int) -> Client:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client_context("admin"), server_hostname="localhost"
    )
    return Client(reader, writer)


async def test_workers_share_port_and_receive_signals(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    port = free_port()
    cfg = _write_config(tmp_path, pki, beanstalkd.port, port)
    proc = spawn_serve(cfg, "--workers", "2")
    log = LogReader(proc)
    try:
        ready = await log.wait_for(r"ready: listening", count=2)
        pids = {re.search(r"pid=(\d+)", line)[1] for line in ready}  # type: ignore[index]
        assert len(pids) == 2, ready

        # Concurrent handshakes: under uvloop (which the CLI uses when installed) an earlier
        # design lost ClientHellos that arrived before start_tls took over the socket.
        clients = await asyncio.gather(*[_connect(pki, port) for _ in range(16)])
        for i, c in enumerate(clients):
            assert await c.put(b"job %d" % i) == b"INSERTED %d" % (i + 1)
        for c in clients:
            await c.close()

        proc.send_signal(signal.SIGHUP)
        await log.wait_for(r"reload: ACL loaded", count=2)

        proc.send_signal(signal.SIGTERM)
        await log.wait_for(r"shutting down", count=2)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            # The workers first (found by their parent pid), then the supervisor.
            subprocess.run(["pkill", "-9", "-P", str(proc.pid)], check=False)
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# --- workers that behave as one proxy ---------------------------------------------------------


class _Proxy:
    """``serve --workers 2`` with its status endpoints on one address."""

    def __init__(self, proc: subprocess.Popen[str], port: int, metrics_port: int) -> None:
        self.proc = proc
        self.port = port
        self.metrics_port = metrics_port
        self.log = LogReader(proc)

    async def sessions(self) -> dict[str, Any]:
        code, _, body = await http(self.metrics_port, "/connections")
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                subprocess.run(["pkill", "-9", "-P", str(self.proc.pid)], check=False)
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


async def _start(
    tmp: Path, pki: PKI, beanstalkd: Beanstalkd, rate: dict[str, float] | None = None, **limits: int
) -> _Proxy:
    port, metrics_port = free_port(), free_port()
    extra: dict[str, Any] = {
        "metrics": {"listen": f"127.0.0.1:{metrics_port}", "connections": True}
    }
    if limits:
        extra["limits"] = limits
    cfg = write_serve_config(tmp, pki, beanstalkd.port, port, **extra)
    if rate is not None:
        acl = tmp / "acl.yaml"
        doc = yaml.safe_load(acl.read_text())
        doc["principals"][0]["rate"] = rate
        acl.write_text(yaml.safe_dump(doc))
    proxy = _Proxy(spawn_serve(cfg, "--workers", "2"), port, metrics_port)
    await proxy.log.wait_for(r"ready: listening", count=2)
    await proxy.log.wait_for(rf"status endpoints listening .*listen=127\.0\.0\.1:{metrics_port}")
    return proxy


async def _served(pki: PKI, port: int, body: bytes) -> Client | None:
    """A connection that could put a job, or None when the proxy refused it."""
    try:
        c = await _connect(pki, port)
    except (OSError, ssl.SSLError):
        return None
    try:
        reply = await c.put(body)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        await c.close()
        return None
    assert reply.startswith(b"INSERTED "), reply
    return c


def _local_port(c: Client) -> int:
    return int(c.writer.get_extra_info("sockname")[1])


async def _on_both_workers(pki: PKI, proxy: _Proxy, at_most: int = 64) -> list[Client]:
    """Connections until the kernel has put some on each worker (bounded: all of ``at_most``
    on one worker has a probability of 2 ** (1 - at_most))."""
    clients: list[Client] = []
    for _ in range(at_most):
        c = await _served(pki, proxy.port, b"x")
        assert c is not None
        clients.append(c)
        doc = await proxy.sessions()
        if len(clients) >= 4 and {e["worker"] for e in doc["connections"]} == {0, 1}:
            return clients
    raise AssertionError(f"{at_most} connections all landed on one worker")


async def test_one_metrics_address_sums_both_workers(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    proxy = await _start(tmp_path, pki, beanstalkd)
    try:
        clients = await _on_both_workers(pki, proxy)
        for c in clients:
            assert (await c.put(b"more")).startswith(b"INSERTED ")
        doc = await proxy.sessions()
        assert doc["count"] == len(clients) == len(doc["connections"])
        by_port = {int(e["peer"].rsplit(":", 1)[1]): e for e in doc["connections"]}
        assert set(by_port) == {_local_port(c) for c in clients}
        assert {e["worker"] for e in doc["connections"]} == {0, 1}
        assert len({e["pid"] for e in doc["connections"]}) == 2
        assert sorted(w["count"] for w in doc["workers"]) == sorted(
            [sum(1 for e in doc["connections"] if e["worker"] == k) for k in (0, 1)]
        )
        assert all(e["commands"] == 2 for e in doc["connections"])

        samples = await scrape(proxy.metrics_port)
        n = len(clients)
        assert value(samples, "beanstalk_proxy_connections_total") == n
        put = {"command": "put", "decision": "allowed"}
        assert value(samples, "beanstalk_proxy_commands_total", **put) == 2 * n
        assert value(samples, "beanstalk_proxy_connections_open") == n
        assert value(samples, "beanstalk_proxy_client_sockets") == n
        assert value(samples, "beanstalk_proxy_worker_up", worker="0") == 1
        assert value(samples, "beanstalk_proxy_worker_up", worker="1") == 1
        # Per-process figures are per worker; build info is one series with value 1.
        rss = [k for k in samples if k[0] == "process_resident_memory_bytes"]
        assert sorted(dict(labels)["worker"] for _, labels in rss) == ["0", "1"]
        started = [v for k, v in samples.items() if k[0] == "beanstalk_proxy_start_time_seconds"]
        assert len(set(started)) == 2  # each worker's own start
        info = [v for k, v in samples.items() if k[0] == "beanstalk_proxy_build_info"]
        assert info == [1.0]
        # The histogram is summed bucket by bucket: +Inf equals the summed count.
        inf = value(samples, "beanstalk_proxy_command_latency_seconds_bucket", le="+Inf")
        assert inf == value(samples, "beanstalk_proxy_command_latency_seconds_count") > 0

        # `status` prints the merged list with each session's worker pid.
        out = subprocess.run(
            [sys.executable, "-m", "proxy", "status", "--metrics-url",
             f"http://127.0.0.1:{proxy.metrics_port}"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.splitlines()  # fmt: skip
        assert out[0].split()[:2] == ["PID", "PEER"]
        pids = {str(e["pid"]) for e in doc["connections"]}
        assert {line.split()[0] for line in out[1:-1]} == pids
        assert out[-1] == f"{len(clients)} connections"

        assert (await http(proxy.metrics_port, "/healthz"))[0] == 200
        code, _, body = await http(proxy.metrics_port, "/readyz")
        assert (code, body) == (200, b"ok\n")
        assert (await http(proxy.metrics_port, "/nope"))[0] == 404
        # No worker listens on metrics port + k any more.
        for c in clients:
            await c.close()
        await until(lambda: _count_is(proxy, 0))
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


async def _count_is(proxy: _Proxy, n: int) -> bool:
    return int((await proxy.sessions())["count"]) == n


async def test_max_connections_holds_for_the_whole_proxy(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    # max_handshakes defaults to max_connections: room for all 12 at once, so each refusal
    # is for max_connections.
    proxy = await _start(tmp_path, pki, beanstalkd, max_connections=3, max_handshakes=64)
    try:
        results = await asyncio.gather(*[_served(pki, proxy.port, b"x") for _ in range(12)])
        served = [c for c in results if c is not None]
        assert len(served) == 3
        samples = await scrape(proxy.metrics_port)
        refused = value(
            samples, "beanstalk_proxy_handshake_failures_total", reason="max_connections"
        )
        assert refused == 9
        assert value(samples, "beanstalk_proxy_client_sockets") == 3
        # Refused one after another too, whichever worker accepts.
        for _ in range(6):
            assert await _served(pki, proxy.port, b"y") is None
        # A closed connection frees its place for the whole proxy.
        await served.pop().close()
        again = await _eventually_served(pki, proxy.port)
        assert await _served(pki, proxy.port, b"z") is None
        for c in [*served, again]:
            await c.close()
    finally:
        proxy.stop()


async def _eventually_served(pki: PKI, port: int, timeout: float = 10.0) -> Client:
    """Bounded polling: the release of a count happens when the proxy sees the socket close."""
    deadline = time.monotonic() + timeout
    while (c := await _served(pki, port, b"again")) is None:
        assert time.monotonic() < deadline, "no connection served in time"
        await asyncio.sleep(0.05)
    return c


async def test_max_connections_per_principal_holds_for_the_whole_proxy(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    proxy = await _start(
        tmp_path, pki, beanstalkd, max_connections_per_principal=2, max_handshakes=64
    )
    try:
        results = await asyncio.gather(*[_served(pki, proxy.port, b"x") for _ in range(10)])
        served = [c for c in results if c is not None]
        assert len(served) == 2
        samples = await scrape(proxy.metrics_port)
        reason = "max_connections_per_principal"
        assert value(samples, "beanstalk_proxy_handshake_failures_total", reason=reason) == 8
        for c in served:
            await c.close()
        again = [await _eventually_served(pki, proxy.port) for _ in range(2)]
        assert await _served(pki, proxy.port, b"z") is None
        for c in again:
            await c.close()
    finally:
        proxy.stop()


async def test_a_killed_worker_releases_its_connections(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    limit = 16
    proxy = await _start(tmp_path, pki, beanstalkd, max_connections=limit)
    try:
        clients = await _on_both_workers(pki, proxy, at_most=limit)
        while len(clients) < limit:
            c = await _served(pki, proxy.port, b"x")
            assert c is not None
            clients.append(c)
        assert await _served(pki, proxy.port, b"no") is None  # the limit is reached
        doc = await proxy.sessions()
        worker_of = {int(e["peer"].rsplit(":", 1)[1]): e for e in doc["connections"]}
        victim = doc["connections"][0]
        victim_pid = int(victim["pid"])
        held = [c for c in clients if worker_of[_local_port(c)]["pid"] == victim_pid]
        kept = [c for c in clients if c not in held]
        assert held and kept
        before = await scrape(proxy.metrics_port)

        os.kill(victim_pid, signal.SIGKILL)
        victim_name = f"worker {victim['worker']}"
        await proxy.log.wait_for(
            rf'worker_restart worker="{victim_name}" pid={victim_pid} ended="killed by SIGKILL"'
        )
        for c in held:
            await c.closed()
        # Its places are free again for the whole proxy, the other worker's are still held.
        fresh = [await _eventually_served(pki, proxy.port) for _ in held]
        assert await _served(pki, proxy.port, b"no") is None
        for c in kept:
            assert (await c.put(b"still")).startswith(b"INSERTED ")
        await proxy.log.wait_for(r"ready: listening", count=3)  # the replacement
        await until(lambda: _count_is(proxy, len(kept) + len(fresh)), timeout=10)
        after = await scrape(proxy.metrics_port)
        assert value(after, "beanstalk_proxy_worker_up", worker=str(victim["worker"])) == 1
        # The whole-proxy counters did not go backwards when the worker was replaced.
        accepted = "beanstalk_proxy_connections_total"
        assert value(after, accepted) >= value(before, accepted) + len(fresh)
        for c in [*kept, *fresh]:
            await c.close()
    finally:
        proxy.stop()


async def test_each_worker_holds_its_share_of_a_rate(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    # burst 6 for the whole proxy: 3 per worker (a token per 1000 s: no refill meanwhile).
    proxy = await _start(tmp_path, pki, beanstalkd, rate={"per_second": 0.002, "burst": 6})
    try:
        clients = await _on_both_workers_idle(pki, proxy)
        per_worker: dict[int, list[bytes]] = {0: [], 1: []}
        doc = await proxy.sessions()
        worker_of = {int(e["peer"].rsplit(":", 1)[1]): e["worker"] for e in doc["connections"]}
        for c in clients:
            await c.send(b"list-tube-used\r\n" * 4)
            per_worker[worker_of[_local_port(c)]] += [(await c.reply())[0] for _ in range(4)]
        for replies in per_worker.values():
            assert replies.count(b"USING default") == 3, replies
        samples = await scrape(proxy.metrics_port)
        limited = value(samples, "beanstalk_proxy_rate_limited_total", principal="admin")
        assert limited == 4 * len(clients) - 6
        for c in clients:
            await c.close()
    finally:
        proxy.stop()


async def _on_both_workers_idle(pki: PKI, proxy: _Proxy, at_most: int = 32) -> list[Client]:
    """Connections (sending nothing) until each worker has one."""
    clients: list[Client] = []
    for _ in range(at_most):
        clients.append(await _connect(pki, proxy.port))
        await until(lambda: _count_is(proxy, len(clients)))
        if {e["worker"] for e in (await proxy.sessions())["connections"]} == {0, 1}:
            return clients
    raise AssertionError(f"{at_most} connections all landed on one worker")


async def test_a_replacement_worker_reads_the_files_as_they_are_now(
    tmp_path: Path, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    proxy = await _start(tmp_path, pki, beanstalkd)
    try:
        clients = await _on_both_workers_idle(pki, proxy)
        doc = await proxy.sessions()
        old_pids = {e["pid"] for e in doc["connections"]}
        victim = next(e for e in doc["connections"] if e["worker"] == 0)
        # The ACL changes on disk, with no SIGHUP (and no file watching): the running workers
        # keep theirs, a replacement must not resurrect the startup one.
        acl = tmp_path / "acl.yaml"
        text = acl.read_text().replace("admin", "root")
        acl.write_text(text.replace("cn: root", "cn: admin"))
        os.kill(int(victim["pid"]), signal.SIGKILL)
        await proxy.log.wait_for(r"ready: listening", count=3)
        principals: dict[bool, set[str]] = {True: set(), False: set()}
        for _ in range(32):
            c = await _connect(pki, proxy.port)
            clients.append(c)
            assert await c.line(b"list-tube-used") == b"USING default"
            doc = await proxy.sessions()
            entry = next(
                e for e in doc["connections"] if int(e["peer"].rsplit(":", 1)[1]) == _local_port(c)
            )
            principals[entry["pid"] in old_pids].add(entry["principal"])
            if principals[True] and principals[False]:
                break
        assert principals == {True: {"admin"}, False: {"root"}}
        for c in clients:
            await c.close()
    finally:
        proxy.stop()

#!/usr/bin/env python3
"""What ``serve --workers N`` costs for behaving as one proxy.

1. ``admission``: the shared counts (``proxy.sharedlimits``) in one process and with two
   processes contending: microseconds per admission plus release of a connection, a pending
   handshake, a principal's connection and a source address's pending handshake (each
   admission takes the ``fcntl`` lock once).
2. ``scrape``: a real ``python -m proxy serve`` with ``--workers N`` (the aggregator asks N
   workers and merges) and, for comparison, with one process (``/metrics`` served directly),
   each holding ``--conns`` idle mTLS connections: latency of sequential ``GET /metrics`` and
   ``GET /connections`` on the one metrics address (p50, p99, max, in milliseconds), and the
   size of the exposition; and the resident memory of each process (supervisor, workers,
   aggregator) with the connections open.

Usage: ``python bench/workers.py [--workers 2] [--conns 50] [--requests 200]``. Needs
beanstalkd. Self-contained: a throwaway PKI and beanstalkd in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _pki import client_context, make_pki

from proxy.sharedlimits import SharedCounts

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def admission(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        c = SharedCounts(os.path.join(d, "counts"), 2)
        c.attach(0)
        for name, op in (
            ("connection", lambda: (c.add_connection(), c.remove_connection())),
            ("handshake", lambda: (c.try_add_handshake(10**9), c.remove_handshake())),
            (
                "principal",
                lambda: (c.try_add_principal("bench", 10**9), c.remove_principal("bench")),
            ),
            (
                "source",
                lambda: (c.try_add_source("192.0.2.1", 10**9), c.remove_source("192.0.2.1")),
            ),
        ):
            t0 = time.perf_counter()
            for _ in range(rounds):
                op()
            us = (time.perf_counter() - t0) / rounds * 1e6
            print(f"admission+release  {name:<11} 1 process   {us:6.2f} us")
        pid = os.fork()
        if pid == 0:  # a second worker admitting as fast as it can meanwhile
            c.attach(1)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                c.add_connection()
                c.remove_connection()
            os._exit(0)
        try:
            time.sleep(0.2)
            t0 = time.perf_counter()
            for _ in range(rounds):
                c.add_connection()
                c.remove_connection()
            us = (time.perf_counter() - t0) / rounds * 1e6
            print(f"admission+release  connection  2 processes {us:6.2f} us (both admitting)")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def scrape(workers: int, conns: int, requests: int, work: Path, upstream: int) -> None:
    port, metrics_port = free_port(), free_port()
    cfg = work / f"proxy-{workers}.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\nupstream: 127.0.0.1:{upstream}\n"
        f"tls: {{cert: {work}/server.pem, key: {work}/server.key, client_ca: {work}/ca.pem}}\n"
        f"acl: {work}/acl.yaml\nreload: {{watch: false}}\n"
        f"metrics: {{listen: 127.0.0.1:{metrics_port}, connections: true}}\n"
        "log: {level: warning}\n"
    )
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(cfg)]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    held: list[ssl.SSLSocket] = []
    try:
        wait_port(port)
        wait_port(metrics_port)
        ctx = client_context(work)
        for _ in range(conns):
            s = ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
            )
            s.sendall(b"list-tube-used\r\n")
            assert s.recv(100).startswith(b"USING")
            held.append(s)
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        pids = [proc.pid, *children(proc.pid)]
        print(f"RSS {label}: " + ", ".join(f"pid {p} {rss_mib(p):.1f} MiB" for p in pids))
        for path in ("/metrics", "/connections"):
            times, size = [], 0
            for _ in range(requests):
                t0 = time.perf_counter()
                with socket.create_connection(("127.0.0.1", metrics_port)) as s:
                    s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                    data = b""
                    while chunk := s.recv(1 << 16):
                        data += chunk
                times.append((time.perf_counter() - t0) * 1000)
                assert data.startswith(b"HTTP/1.0 200"), data[:100]
                size = len(data)
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(
                f"GET {path:<12} {label:<9} {conns} conns: p50 {statistics.median(times):6.2f} ms"
                f"  p99 {p99:6.2f} ms  max {times[-1]:6.2f} ms  ({size} bytes)"
            )
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=100_000)
    args = parser.parse_args()
    admission(args.rounds)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        make_pki(work)
        (work / "acl.yaml").write_text(
            "principals: [{name: bench, match: {cn: bench}}]\n"
            "rules: [{principal: bench, allow: [all]}]\n"
        )
        upstream = free_port()
        bs = subprocess.Popen(["beanstalkd", "-l", "127.0.0.1", "-p", str(upstream)])
        try:
            wait_port(upstream)
            for workers in (1, args.workers):
                scrape(workers, args.conns, args.requests, work, upstream)
        finally:
            bs.terminate()
            bs.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where the bytes of an idle mTLS connection go: OpenSSL's share, the proxy's Python objects,
and the rest, each measured on its own (Linux with glibc: ``mallinfo2``).

1. *The proxy.* A real ``ProxyServer`` (the configured default TLS transport, or
   ``--transport``) on uvloop in this process, in front of a real beanstalkd; a child process
   opens ``--conns`` mTLS connections (handshake + ``list-tube-used``) and holds them. Per
   connection: RSS growth, C-heap growth (OpenSSL, libuv, uvloop's native parts), and Python
   objects (``tracemalloc``, in a second pass so its own overhead stays out of the first),
   with the allocation sites that hold the most.
2. *OpenSSL, server side.* Pairs of ``ssl.SSLObject`` over ``ssl.MemoryBIO`` (the proxy's
   server context, a test client certificate) complete a TLS 1.3 handshake and one request and
   reply, then the client halves are freed; the C heap still held (``mallinfo2``: in-use
   ``malloc`` bytes) per server half is OpenSSL's state for one idle connection. Repeated with
   ``verify_mode = CERT_NONE`` to show what keeping the verified client certificate costs.

With ``--burst N`` each connection first puts and peeks one job of N bytes (then deletes it):
what an idle connection keeps after it once moved data (``ssl.MemoryBIO`` buffers keep their
largest size until freed).

Usage: ``python bench/memory.py [--conns 200] [--transport builtin|stock] [--top 15]
[--burst 0]``.
Numbers are for the machine it runs on; `bench/README.md` records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _pki import client_context, make_pki  # noqa: E402

from proxy.acl import parse_acl  # noqa: E402
from proxy.config import Config, Endpoint, Limits, LogConfig, TLSConfig  # noqa: E402
from proxy.relay import PolicyHolder, ProxyServer  # noqa: E402
from proxy.tlsctx import server_context  # noqa: E402

ACL = {
    "principals": [{"name": "bench", "match": {"cn": "bench"}}],
    "rules": [{"principal": "bench", "tubes": ["*"], "allow": ["all"]}],
}

#: The child process that holds the client connections (so its objects stay out of the count).
HOLDER = r"""
import socket, ssl, sys
port, ca, cert, key, n, burst = sys.argv[1:7]
burst = int(burst)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
held = []
for _ in range(int(n)):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port))),
                        server_hostname="localhost")
    s.sendall(b"list-tube-used\r\n")
    assert s.recv(100) == b"USING default\r\n"
    if burst:  # one job of that size in (put) and out (peek), then deleted
        s.sendall(b"put 0 0 60 %d\r\n%s\r\n" % (burst, b"x" * burst))
        line = b""
        while not line.endswith(b"\r\n"):
            line += s.recv(100)
        job = line.split()[1]
        s.sendall(b"peek %s\r\n" % job)
        left = len(b"FOUND %s %d\r\n" % (job, burst)) + burst + 2
        while left > 0:
            left -= len(s.recv(65536))
        s.sendall(b"delete %s\r\n" % job)
        assert s.recv(100) == b"DELETED\r\n"
    held.append(s)
print("held", flush=True)
sys.stdin.read()
"""


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def c_heap() -> int:
    """Bytes in use in the C heap (``malloc``), not counting pymalloc's own arenas."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _pump(out_bio: ssl.MemoryBIO, in_bio: ssl.MemoryBIO) -> None:
    data = out_bio.read()
    if data:
        in_bio.write(data)


def _ssl_pair(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> tuple[object, object]:
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = sctx.wrap_bio(si, so, server_side=True)
    client = cctx.wrap_bio(ci, co, server_hostname="localhost")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        _pump(co, si)
        _pump(so, ci)
    client.write(b"list-tube-used\r\n")
    _pump(co, si)
    assert server.read(100) == b"list-tube-used\r\n"
    server.write(b"USING default\r\n")
    _pump(so, ci)
    assert client.read(100) == b"USING default\r\n"
    _pump(co, si)  # the client's TLS 1.3 ticket acknowledgements, if any
    with contextlib.suppress(ssl.SSLWantReadError):
        server.read(100)
    return (server, si, so), (client, ci, co)


def openssl_share(tls: TLSConfig, cctx: ssl.SSLContext, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, verify in (("verify required", True), ("no client verification", False)):
        sctx = server_context(tls)
        if not verify:
            sctx.verify_mode = ssl.CERT_NONE
        [_ssl_pair(sctx, cctx) for _ in range(5)]  # warm-up (caches, lazy tables)
        gc.collect()
        before = c_heap()
        pairs = [_ssl_pair(sctx, cctx) for _ in range(n)]
        servers = [p[0] for p in pairs]
        del pairs
        gc.collect()
        out[label] = (c_heap() - before) / n
        del servers
    return out


async def _proxy_pass(
    config: Config, tls_dir: Path, n: int, traced: bool, burst: int = 0
) -> tuple[float, float, float, list[tracemalloc.StatisticDiff]]:
    server = ProxyServer(config, server_context(config.tls), PolicyHolder(parse_acl(ACL, "<m>")))
    await server.start()
    try:
        argv = [
            sys.executable,
            "-c",
            HOLDER,
            str(server.port),
            str(tls_dir / "ca.pem"),
            str(tls_dir / "bench.pem"),
            str(tls_dir / "bench.key"),
        ]
        warm = await asyncio.create_subprocess_exec(
            *argv, "5", str(burst), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert warm.stdout is not None and warm.stdin is not None
        await warm.stdout.readline()
        warm.stdin.close()
        await warm.wait()
        while server.connections:
            await asyncio.sleep(0.01)
        gc.collect()
        if traced:
            tracemalloc.start(1)
            snap0 = tracemalloc.take_snapshot()
        heap0, rss0 = c_heap(), rss()
        holder = await asyncio.create_subprocess_exec(
            *argv, str(n), str(burst), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert holder.stdout is not None and holder.stdin is not None
        assert await holder.stdout.readline() == b"held\n"
        deadline = time.monotonic() + 30
        while len(server.connections) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        gc.collect()
        heap1, rss1 = c_heap(), rss()
        stats: list[tracemalloc.StatisticDiff] = []
        python = 0.0
        if traced:
            stats = tracemalloc.take_snapshot().compare_to(snap0, "lineno")
            tracemalloc.stop()
            python = sum(s.size_diff for s in stats) / n
        holder.stdin.close()
        await holder.wait()
        return (rss1 - rss0) / n, (heap1 - heap0) / n, python, stats
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=200, help="idle connections (default 200)")
    ap.add_argument("--transport", choices=("builtin", "stock"), help="tls.transport")
    ap.add_argument("--top", type=int, default=15, help="allocation sites to list (default 15)")
    ap.add_argument(
        "--burst",
        type=int,
        default=0,
        help="before idling, each connection puts and peeks one job of this many bytes",
    )
    args = ap.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tls = make_pki(d)
        cctx = client_context(d)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        beanstalkd = subprocess.Popen(["beanstalkd", "-l", "127.0.0.1", "-p", str(port)])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            config = Config(
                listen=Endpoint("127.0.0.1", 0, None),
                upstream=Endpoint("127.0.0.1", port, None),
                allow_remote_upstream=False,
                tls=tls if args.transport is None else replace(tls, transport=args.transport),
                acl="<memory>",
                limits=Limits(
                    max_connections=args.conns + 100,
                    handshake_timeout=10.0,
                    max_job_size=65535,
                    upstream_connect_timeout=5.0,
                ),
                metrics_listen=None,
                log=LogConfig("text", "warning"),
                source="<memory>",
            )
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
            with runner:
                per_rss, per_heap, _, _ = runner.run(
                    _proxy_pass(config, d, args.conns, False, args.burst)
                )
                _, _, per_py, stats = runner.run(
                    _proxy_pass(config, d, args.conns, True, args.burst)
                )
        finally:
            beanstalkd.terminate()
            beanstalkd.wait()
        # after the proxy's pass, whose RSS growth is measured in a fresh process
        openssl = openssl_share(tls, cctx, args.conns)
    print(
        f"{ssl.OPENSSL_VERSION}, CPython {sys.version.split()[0]}, "
        f"uvloop {getattr(uvloop, '__version__', '?')}"
    )
    print(
        f"\n1. The proxy (uvloop, tls.transport {config.tls.transport}), {args.conns} idle "
        f"connections{f' (after a {args.burst}-byte job in and out)' if args.burst else ''}, "
        "per connection (bytes):"
    )
    print(f"   RSS growth                {per_rss:>8.0f}   first pass, fresh process")
    print(f"   C heap (malloc) growth    {per_heap:>8.0f}   OpenSSL, libuv, uvloop's C parts")
    print(f"   Python objects            {per_py:>8.0f}   tracemalloc, second pass")
    print(f"\n   Python allocation sites holding the most, per connection (top {args.top}):")
    for stat in stats[: args.top]:
        frame = stat.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        print(
            f"   {stat.size_diff / args.conns:>8.0f} B {stat.count_diff / args.conns:>5.1f} "
            f"objects  {where}"
        )
    print("\n2. OpenSSL alone: server-side state per idle TLS 1.3 connection (C heap, bytes):")
    for label, value in openssl.items():
        print(f"   {label:<24} {value:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

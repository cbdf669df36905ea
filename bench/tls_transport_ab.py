#!/usr/bin/env python3
"""Transport-only A/B of the proxy's TLS transports: ``tls.transport: builtin``
(``proxy/tlsbio.py``) against the event loop's own SSL transport (``stock``), on the stdlib
asyncio loop and on uvloop, without the relay, beanstalkd or a second process in the way.

A server loop in this process runs an echo protocol behind each transport; a client thread
drives it with blocking ``ssl`` sockets. The figure is the *server thread's* CPU time
(``time.thread_time``, user + system) per operation, which a busy machine disturbs far less than
wall-clock rates: per 16-byte echo round trip (one TLS read, one TLS write) and per handshake
(accept, mutual-TLS handshake with an ECDSA P-256 client certificate, one echo, close). Kinds
alternate in every repetition; medians are printed.

Usage: ``python bench/tls_transport_ab.py [--reps 15] [--echoes 2000] [--handshakes 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _pki import client_context, make_pki  # noqa: E402

from proxy.tlsbio import accept_tls  # noqa: E402
from proxy.tlsctx import server_context  # noqa: E402

KINDS = ("builtin", "stock")


class Echo(asyncio.Protocol):
    """Echoes every read; resolves ``done`` with the server-thread CPU time after ``n`` reads."""

    def __init__(self, n: int, done: asyncio.Future[float] | None) -> None:
        self.left = n
        self.done = done
        self.t0 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.t0 == 0.0:
            self.t0 = time.thread_time()
        assert self.transport is not None
        self.transport.write(data)
        self.left -= 1
        if self.left == 0 and self.done is not None:
            self.done.set_result(time.thread_time() - self.t0)


def _client(port: int, ctx: ssl.SSLContext, conns: int, echoes: int) -> None:
    for _ in range(conns):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            for _ in range(echoes):
                s.sendall(b"list-tube-used\r\n")
                s.recv(100)


async def _serve(
    kind: str, sctx: ssl.SSLContext, cctx: ssl.SSLContext, conns: int, echoes: int
) -> float:
    """Server-thread CPU seconds for ``conns`` connections of ``echoes`` round trips each
    (for one connection: only the round trips, not the handshake)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(128)
        lsock.setblocking(False)
        thread = threading.Thread(
            target=_client, args=(lsock.getsockname()[1], cctx, conns, echoes)
        )
        thread.start()
        t0 = time.thread_time()
        cpu = 0.0
        for _ in range(conns):
            sock, _ = await loop.sock_accept(lsock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done: asyncio.Future[float] = loop.create_future()
            factory: Callable[[], asyncio.BaseProtocol] = lambda: Echo(echoes, done)  # noqa: B023,E731
            if kind == "builtin":
                tr, _ = await accept_tls(loop, factory, sock, sctx, ssl_handshake_timeout=10)
            else:
                tr, _ = await loop.connect_accepted_socket(
                    factory, sock, ssl=sctx, ssl_handshake_timeout=10
                )
            cpu = await done
            tr.close()
        total = time.thread_time() - t0
        await asyncio.to_thread(thread.join)
    return cpu if conns == 1 else total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--echoes", type=int, default=2000)
    ap.add_argument("--handshakes", type=int, default=100)
    args = ap.parse_args(argv)
    loops: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [
        ("asyncio", asyncio.new_event_loop)
    ]
    try:
        import uvloop

        loops.append(("uvloop", uvloop.new_event_loop))
    except ImportError:
        print("uvloop not installed: asyncio only")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tls = make_pki(d)
        sctx = server_context(tls)
        cctx = client_context(d)
        print(f"server-thread CPU per operation, us: median (min) over {args.reps} repetitions")
        print(f"{'loop':<9}{'transport':<10}{'echo round trip':>20}{'handshake':>20}")
        for name, factory in loops:
            echo: dict[str, list[float]] = {k: [] for k in KINDS}
            hs: dict[str, list[float]] = {k: [] for k in KINDS}
            with asyncio.Runner(loop_factory=factory) as runner:
                for rep in range(args.reps):
                    for kind in KINDS if rep % 2 else KINDS[::-1]:
                        cpu = runner.run(_serve(kind, sctx, cctx, 1, args.echoes))
                        echo[kind].append(cpu / args.echoes * 1e6)
                        cpu = runner.run(_serve(kind, sctx, cctx, args.handshakes, 1))
                        hs[kind].append(cpu / args.handshakes * 1e6)
            for kind in KINDS:
                e, h = echo[kind], hs[kind]
                print(
                    f"{name:<9}{kind:<10}"
                    f"{f'{statistics.median(e):.1f} ({min(e):.1f})':>20}"
                    f"{f'{statistics.median(h):.0f} ({min(h):.0f})':>20}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

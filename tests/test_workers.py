"""``serve --workers N``, run through the real CLI (so on uvloop when installed): N processes
share the listen port with SO_REUSEPORT; SIGHUP and
SIGTERM sent to the supervisor reach every worker."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path

from conftest import PKI, Beanstalkd, Client, LogReader, free_port, spawn_serve, write_serve_config


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

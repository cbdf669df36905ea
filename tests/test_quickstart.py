"""``scripts/quickstart.sh`` owns what it fronts.

The script runs for real (bash, beanstalkd, the proxy and the tunnel as processes) from a
scratch copy of the repository layout, so its development certificates never land in the
checkout. A busy port (a bare listener or somebody else's beanstalkd) on any of the four
ports stops it before anything is made or started, naming the port and the variable that moves
it; with every port moved, a put/reserve/delete through the tunnel reaches the beanstalkd the
script started (and no other), and Ctrl-C or SIGTERM stops every piece and frees every port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from conftest import Beanstalkd, direct, free_port, server_stats

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
VARS = ("BEANSTALKD_PORT", "PROXY_PORT", "TUNNEL_PORT", "METRICS_PORT")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The files the quickstart uses, in a scratch directory, with a ``.venv`` whose
    ``beanstalk-proxy`` runs this checkout's package with the test interpreter."""
    root = tmp_path / "repo"
    for rel in ("scripts/quickstart.sh", "config/proxy.yaml", "config/acl.yaml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "beanstalk-proxy"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m proxy "$@"\n', encoding="utf-8"
    )
    wrapper.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return root


def ports() -> dict[str, int]:
    chosen: dict[str, int] = {}
    while len(chosen) < len(VARS):
        port = free_port()
        if port not in chosen.values():
            chosen[VARS[len(chosen)]] = port
    return chosen


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def listener(port: int) -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


async def run_quickstart(root: Path, env_ports: Mapping[str, object]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(root / "scripts" / "quickstart.sh"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **{k: str(v) for k, v in env_ports.items()}},
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_nothing_started(root: Path, env_ports: dict[str, int], busy: str) -> None:
    assert not (root / "certs").exists()  # not even the certificates
    for var, port in env_ports.items():
        if var != busy:
            assert bindable(port), f"{var} ({port}) is taken after a refused quickstart"


@pytest.mark.parametrize("busy", VARS)
async def test_a_busy_port_stops_it_before_anything_starts(checkout: Path, busy: str) -> None:
    env_ports = ports()
    with listener(env_ports[busy]) as sock:
        code, out, err = await run_quickstart(checkout, env_ports)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.accept()  # not even probed with a connection
    assert code == 1, (out, err)
    assert f"port {env_ports[busy]} on 127.0.0.1 is busy" in err
    assert f"move it with {busy}=<port>" in err
    assert "nothing was started" in err
    assert out == ""
    assert_nothing_started(checkout, env_ports, busy)


async def test_somebody_elses_beanstalkd_is_not_fronted(
    checkout: Path, beanstalkd: Beanstalkd
) -> None:
    env_ports = {**ports(), "BEANSTALKD_PORT": beanstalkd.port}
    before = int((await server_stats(beanstalkd.port))["total-connections"])
    code, out, err = await run_quickstart(checkout, env_ports)
    assert code == 1, (out, err)
    assert f"port {beanstalkd.port} on 127.0.0.1 is busy" in err
    assert "BEANSTALKD_PORT=<port>" in err
    assert_nothing_started(checkout, env_ports, "BEANSTALKD_PORT")
    # the only connection beanstalkd saw since is this second stats call
    assert int((await server_stats(beanstalkd.port))["total-connections"]) == before + 1


@pytest.mark.parametrize(
    ("env_ports", "reason"),
    [
        ({"PROXY_PORT": 0}, "PROXY_PORT='0' is not a port number"),
        ({"TUNNEL_PORT": "x"}, "TUNNEL_PORT='x' is not a port number"),
        ({"METRICS_PORT": 70000}, "METRICS_PORT='70000' is not a port number"),
        ({"TUNNEL_PORT": 23456, "PROXY_PORT": 23456}, "are both 23456"),
    ],
)
async def test_bad_port_settings_are_refused(
    checkout: Path, env_ports: dict[str, object], reason: str
) -> None:
    all_ports: dict[str, object] = {**ports(), **env_ports}
    code, out, err = await run_quickstart(checkout, all_ports)
    assert code == 1, (out, err)
    assert reason in err
    assert not (checkout / "certs").exists()


async def get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        async with asyncio.timeout(10):
            return (await reader.read()).decode()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
async def test_moved_ports_work_end_to_end_and_stop_cleanly(
    checkout: Path, tmp_path: Path, stop: str
) -> None:
    env_ports = ports()
    log = (tmp_path / "quickstart.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(checkout / "scripts" / "quickstart.sh"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env={**os.environ, **{k: str(v) for k, v in env_ports.items()}},
        start_new_session=True,  # its own process group: Ctrl-C is SIGINT to the group
    )
    try:
        assert proc.stdout is not None
        banner = b""
        async with asyncio.timeout(60):
            while b"Stop: " not in banner:
                line = await proc.stdout.readline()
                assert line, f"quickstart exited: {(tmp_path / 'quickstart.log').read_text()}"
                banner += line
        text = banner.decode()
        for var in ("BEANSTALKD_PORT", "PROXY_PORT", "TUNNEL_PORT", "METRICS_PORT"):
            assert f"127.0.0.1:{env_ports[var]}" in text, (var, text)

        # put / reserve / delete through the tunnel, the proxy and the ACL
        c = await direct(env_ports["TUNNEL_PORT"])
        assert await c.line(b"use quickstart") == b"USING quickstart"
        assert await c.put(b"hello") == b"INSERTED 1"
        assert await c.line(b"watch quickstart") == b"WATCHING 2"
        line, body = await c.call(b"reserve-with-timeout 5")
        assert (line, body) == (b"RESERVED 1 5", b"hello")
        assert await c.line(b"delete 1") == b"DELETED"
        await c.close()
        # ... into the beanstalkd the script started on the moved port
        stats = await server_stats(env_ports["BEANSTALKD_PORT"])
        assert (stats["cmd-put"], stats["cmd-delete"]) == ("1", "1")
        assert " 200 " in (await get(env_ports["METRICS_PORT"], "/readyz")).split("\r\n")[0]

        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)  # `kill <pid of the script>`
        async with asyncio.timeout(30):
            rest = await proc.stdout.read()
            assert await proc.wait() == 0
        assert b"== stopping" in rest
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.close()
    # nothing of it is left running, and every port is free again
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    for var, port in env_ports.items():
        assert bindable(port), f"{var} ({port}) still taken"

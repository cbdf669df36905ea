#!/usr/bin/env python3
"""Benchmark beanstalk-proxy against direct beanstalkd, stunnel and HAProxy in one run.

Everything is self-contained: a throwaway PKI (``proxy.certs``) in a temporary directory, a
fresh beanstalkd on a free port for every target, and one front per target:

* ``direct``        plain TCP straight to beanstalkd (the baseline of every ratio);
* ``proxy``         ``python -m proxy serve --config <generated yaml>`` (the CLI; it runs on
                    uvloop when uvloop is installed), ACL: the bench client may do ``all`` on
                    ``*``;
* ``proxy-asyncio`` the same CLI forced onto the stdlib asyncio event loop;
* ``stunnel``       stunnel in server mode, ``verify = 2`` (client certificate required);
* ``haproxy``       HAProxy ``mode tcp``, ``ssl crt ... ca-file ... verify required``, with
                    ``nbthread`` equal to the proxy's processes (``--proxy-workers``, default 1):
                    equal parallelism. ``haproxy-auto`` (opt-in) keeps HAProxy's own default
                    thread count (one per CPU).

stunnel and HAProxy are skipped with a note when not installed. Every front runs as its own
process; the client is this process (plain blocking sockets + ``ssl``, identical for every
target), so client and front can run on different cores.

Workloads (each on a fresh connection after a short warm-up). ``--seconds`` per workload and
target is split into ``--rounds`` slices; the rounds interleave the targets so background load
hits all of them alike, and throughputs are the medians over the rounds:

1. ``puts``: pipelined ``put`` of ``--body`` bytes, ``--batch`` commands per write, at most
   two batches in flight; every reply must be ``INSERTED``: puts/s.
2. ``cycles``: put + reserve-with-timeout 0 + delete, one command at a time: cycles/s.
3. ``rtt``: sequential ``list-tube-used`` round trips: p50 / p99 in microseconds.
4. ``conns``: connect, TLS handshake with the client certificate (plain TCP for ``direct``),
   one ``list-tube-used``, close; sequential: connections/s.

5. ``idle`` (after the rounds, ``--idle N``): a fresh front per target, N mTLS connections
   opened (handshake + one ``list-tube-used``) and held idle; the front's RSS growth per
   connection in KiB (``/proc/PID/status``; for ``direct``, beanstalkd's).

``proxy-builtin``, ``proxy-stock``, ``proxy-asyncio-builtin`` and ``proxy-asyncio-stock`` force
the proxy's TLS transport (``tls.transport``); they run only when named in ``--targets``.
``proxy-shadow`` (also only when named) is ``proxy`` with a shadow ACL (``acl_shadow``) that
decides every workload command as the enforced ACL does: the cost of the shadow evaluation.
``proxy-baseline`` (with ``--baseline DIR``) is ``proxy`` run from another checkout, so a change
and the commit before it are measured in the same interleaved rounds.

``--fairness`` runs the ``fairness`` workload instead (direct and proxy targets): beanstalkd gets
``--tubes`` tubes (100,000 by default, held by direct connections that watch them), then a
bystander connection (all rights) does sequential round trips for ``--seconds`` in each of
three phases, alternating ``list-tube-used`` (answered by beanstalkd) and an unknown command
(answered by the proxy itself: the proxy's own share, whatever beanstalkd is busy with). The
phases: idle; while a client with no rights pipelines distinct denied ``use`` commands as
fast as it can (its own process); while a tube-restricted client (``t1*``) runs five
pipelined ``list-tubes`` at a time. It prints the bystander's p50, p99 and worst round trip
of both kinds per phase, the flood's rate, the time per ``list-tubes``, and how many bytes
the proxy's log grew per byte the flood sent. ``direct`` (no ACL, so no flood phase) shows
what beanstalkd itself costs the bystander with that many tubes.

Usage: ``python bench/bench.py [--quick] [--targets direct,proxy,...] [--json PATH]``;
``python bench/bench.py --fairness [--targets proxy,proxy-asyncio] [--seconds S]``.
``--profile DIR`` runs the proxy targets under cProfile (slower; for finding hot spots).
``--principals 1,2000`` runs each proxy target once per ACL size (target ``proxy@2000p``: 1,999
other principals and rules before the bench client's; ``--principal-kind exact|glob``).
Exit status: 0 when every requested, installed target ran; 1 when one failed; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import pstats
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import _pki  # noqa: E402

ALL_TARGETS = ("direct", "proxy", "proxy-asyncio", "stunnel", "haproxy")
#: Opt-in targets: the proxy with its TLS transport forced (``tls.transport``); ``proxy`` and
#: ``proxy-asyncio`` use the configured default.
TRANSPORT_TARGETS = (
    "proxy-builtin",
    "proxy-stock",
    "proxy-asyncio-builtin",
    "proxy-asyncio-stock",
)
#: Opt-in: ``proxy`` with a shadow ACL (``acl_shadow``, ``SHADOW_ACL``) decided next to it.
SHADOW_TARGETS = ("proxy-shadow",)
#: Opt-in: ``proxy`` run from another checkout (``--baseline DIR``, e.g. a ``git worktree`` of
#: the commit before a change), so a change and its baseline share one interleaved run.
BASELINE_TARGETS = ("proxy-baseline",)
#: Opt-in: HAProxy with its own default thread count (one per CPU); ``haproxy`` runs as many
#: threads as the proxy has processes (``--proxy-workers``), the fair comparison.
HAPROXY_TARGETS = ("haproxy-auto",)
KNOWN_TARGETS = (
    ALL_TARGETS + TRANSPORT_TARGETS + SHADOW_TARGETS + BASELINE_TARGETS + HAPROXY_TARGETS
)
WORKLOADS = ("puts", "cycles", "rtt", "conns")
BEANSTALKD = os.environ.get("BEANSTALKD", "beanstalkd")
STUNNEL = os.environ.get("STUNNEL", "stunnel")
HAPROXY = os.environ.get("HAPROXY", "haproxy")
CLIENT_CN = "bench"
FLOOD_CN = "flood"  # fairness workload: a principal with no rights at all
LISTER_CN = "lister"  # fairness workload: sees only the tubes t1*
BENCH_ACL = f"""\
principals:
  - name: bench
    match: {{cn: {CLIENT_CN}}}
  - name: flood
    match: {{cn: {FLOOD_CN}}}
  - name: lister
    match: {{cn: {LISTER_CN}}}
rules:
  - principal: bench
    tubes: ["*"]
    allow: [all]
  - principal: lister
    tubes: ["t1*"]
    allow: [inspect]
"""
#: The shadow of ``proxy-shadow``: the bench ACL plus a deny on tubes the workloads never use,
#: so it decides every command like the enforced ACL (no mismatch, only the evaluation's
#: cost), but is not uniform: job-id commands are decided on the job's tube, which the proxy
#: then remembers.
SHADOW_ACL = BENCH_ACL + """\
  - principal: bench
    tubes: ["never.*"]
    deny: [all]
"""
PROXY_TARGETS = ("proxy", "proxy-asyncio")
PRINCIPAL_KINDS = ("exact", "glob")


def bench_acl(principals: int, kind: str = "exact") -> str:
    """The bench ACL with ``principals - 1`` other principals, each with one rule, before the
    bench client's principal and rule. ``exact`` principals match one CN, URI or DNS name (in
    turn); ``glob`` ones a pattern of the same key that the bench certificate does not match."""
    if principals <= 1:
        return BENCH_ACL
    head, rules = BENCH_ACL.split("rules:\n")
    extra_p: list[str] = []
    extra_r: list[str] = []
    for i in range(principals - 1):
        if kind == "exact":
            match = (f"cn: client-{i}", f"uri: spiffe://bench/svc-{i}", f"dns: svc-{i}.bench")[
                i % 3
            ]
        else:
            match = (
                f'cn: "client-{i}-*"',
                f'uri: "spiffe://bench/svc-{i}/*"',
                f'dns: "*.svc-{i}.bench"',
            )[i % 3]
        extra_p.append(f"  - name: c{i}\n    match: {{{match}}}\n")
        extra_r.append(f"  - principal: c{i}\n    tubes: [t{i}]\n    allow: [produce]\n")
    body = head.split("  - name: bench")
    return (
        body[0]
        + "".join(extra_p)
        + "  - name: bench"
        + body[1]
        + "rules:\n"
        + "".join(extra_r)
        + rules
    )


class BenchError(Exception):
    """A target could not be started or answered something unexpected."""


# --------------------------------------------------------------------------------------------
# machine information


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    for line in text.splitlines():
        if line and not line.startswith("Initializing"):
            return line.strip()
    return None


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count() or 0
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "cpu": cpu,
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "openssl": ssl.OPENSSL_VERSION,
        "openssl_cli": _first_line(["openssl", "version"]),
        "uvloop": uvloop_version,
        "beanstalkd": _first_line([BEANSTALKD, "-v"]),
        "stunnel": _first_line([STUNNEL, "-version"]) if shutil.which(STUNNEL) else None,
        "haproxy": _first_line([HAPROXY, "-v"]) if shutil.which(HAPROXY) else None,
    }


# --------------------------------------------------------------------------------------------
# child processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the bench dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Every child process of one target; ``stop`` terminates them all (idempotent)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(
        self, name: str, argv: list[str], log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.procs.append((name, proc, log))
        return proc

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    | " + x for x in text.splitlines()[-lines:])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(
                f"{Path(str(proc.args[0])).name} exited with status {proc.returncode} before "
                f"listening on port {port}; log {log}:\n{log_tail(log)}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"nothing listening on port {port} after {timeout:.0f}s; log {log}:\n"
                    f"{log_tail(log)}"
                ) from None
            time.sleep(0.02)  # polling a port: there is no readiness event to wait on


# --------------------------------------------------------------------------------------------
# the throwaway PKI


@dataclass
class PKI:
    dir: Path

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    @property
    def server_cert(self) -> str:
        return str(self.dir / "server.pem")

    @property
    def server_key(self) -> str:
        return str(self.dir / "server.key")

    @property
    def server_combined(self) -> str:
        """Certificate and key in one PEM (HAProxy's ``crt``)."""
        return str(self.dir / "server-combined.pem")

    def client_context(self, cn: str = CLIENT_CN) -> ssl.SSLContext:
        return _pki.client_context(self.dir, cn)


def make_pki(directory: Path) -> PKI:
    _pki.make_pki(directory, (CLIENT_CN, FLOOD_CN, LISTER_CN))
    pki = PKI(directory)
    combined = Path(pki.server_combined)
    combined.write_bytes(Path(pki.server_cert).read_bytes() + Path(pki.server_key).read_bytes())
    combined.chmod(0o600)
    return pki


# --------------------------------------------------------------------------------------------
# targets


@dataclass
class Env:
    """What every target starter gets."""

    work: Path
    pki: PKI
    procs: Processes
    upstream_port: int
    profile_dir: Path | None
    workers: int = 1  # serve --workers N (only passed when > 1)
    principals: int = 1  # ACL size: the bench client's principal comes last of this many
    principal_kind: str = "exact"  # exact | glob: the other principals' match patterns
    shadow: bool = False  # also an acl_shadow (SHADOW_ACL)
    source: Path = REPO  # the checkout whose ``proxy`` package runs (--baseline: another one)
    wrapper: tuple[str, ...] = ()  # argv prefix for the proxy (bench/callgrind.py: valgrind)
    start_timeout: float = 20  # seconds until the proxy must listen
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def start_beanstalkd(env_work: Path, procs: Processes) -> int:
    port = free_port()
    log = env_work / f"beanstalkd-{port}.log"
    proc = procs.spawn("beanstalkd", [BEANSTALKD, "-l", "127.0.0.1", "-p", str(port)], log)
    wait_for_port(port, proc, log, 10)
    return port


def _uses_uvloop(pid: int) -> bool | None:
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def start_proxy(env: Env, loop: str, transport: str | None = None) -> tuple[int, dict[str, Any]]:
    port = free_port()
    tag = (
        f"proxy-{loop}"
        + (f"-{transport}" if transport else "")
        + (f"-{env.principals}p" if env.principals > 1 else "")
        + ("-shadow" if env.shadow else "")
        + ("-baseline" if env.source != REPO else "")
    )
    transport_line = f"  transport: {transport}\n" if transport else ""
    acl = env.work / f"bench-acl-{env.principals}.yaml"
    acl.write_text(bench_acl(env.principals, env.principal_kind))
    shadow_line = ""
    if env.shadow:
        shadow = env.work / "bench-acl-shadow.yaml"
        shadow.write_text(SHADOW_ACL)
        shadow_line = f"acl_shadow: {shadow}\n"
    cfg = env.work / f"{tag}.yaml"
    cfg.write_text(
        f"""\
listen: 127.0.0.1:{port}
upstream: 127.0.0.1:{env.upstream_port}
tls:
  cert: {env.pki.server_cert}
  key: {env.pki.server_key}
  client_ca: {env.pki.ca}
  min_version: "1.2"
{transport_line}acl: {acl}
{shadow_line}limits:
  max_connections: 10000
  handshake_timeout: 5s
  upstream_connect_timeout: 5s
  max_job_size: 65535
log:
  format: text
  level: info
"""
    )
    python = [sys.executable]
    prof: Path | None = None
    if env.profile_dir is not None:
        prof = env.profile_dir / f"{tag}.prof"
        python += ["-m", "cProfile", "-o", str(prof)]

    argv = [*env.wrapper, *python, "-m", "proxy", "serve", "--config", str(cfg), "--loop", loop]
    if env.workers > 1:
        argv += ["--workers", str(env.workers)]
    log = env.work / f"{tag}.log"
    # ``python -m proxy`` imports the package from its working directory first (sys.path[0]),
    # so ``cwd`` picks the checkout that runs.
    proc = env.procs.spawn(tag, argv, log, cwd=env.source)
    try:
        wait_for_port(port, proc, log, env.start_timeout)
    except BenchError as exc:
        raise BenchError(f"{tag}: `serve` did not start: {exc}") from None
    actual = _uses_uvloop(proc.pid) if env.workers == 1 else None
    if actual is not None and actual != (loop == "uvloop"):
        raise BenchError(f"{tag}: asked for {loop} but the process runs uvloop={actual}")
    info = {
        "workers": env.workers,
        "argv": argv,
        "log": str(log),
        "loop": loop,
        "transport": transport or "default",
        "uvloop_loaded": actual,
        "profile": str(prof) if prof else None,
        "principals": env.principals,
        "source": str(env.source),
    }
    return port, info


def start_stunnel(env: Env) -> tuple[int, dict[str, Any]]:
    port = free_port()
    log = env.work / "stunnel.log"
    conf = env.work / "stunnel.conf"
    conf.write_text(
        f"""\
foreground = yes
pid =
syslog = no
[beanstalk]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{env.upstream_port}
cert = {env.pki.server_cert}
key = {env.pki.server_key}
CAfile = {env.pki.ca}
verify = 2
sslVersionMin = TLSv1.2
"""
    )
    proc = env.procs.spawn("stunnel", [STUNNEL, str(conf)], log)
    wait_for_port(port, proc, log, 15)
    return port, {"config": str(conf), "log": str(log)}


def start_haproxy(env: Env, threads: int | None) -> tuple[int, dict[str, Any]]:
    """HAProxy in TCP mode with ``nbthread threads`` (None: HAProxy's default, one per CPU)."""
    port = free_port()
    tag = "haproxy" if threads is not None else "haproxy-auto"
    log = env.work / f"{tag}.log"
    conf = env.work / f"{tag}.cfg"
    nbthread = f"    nbthread {threads}\n" if threads is not None else ""
    conf.write_text(
        f"""\
global
    maxconn 4000
{nbthread}    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend bench
    bind 127.0.0.1:{port} ssl crt {env.pki.server_combined} ca-file {env.pki.ca} verify required
    default_backend beanstalkd
backend beanstalkd
    server b1 127.0.0.1:{env.upstream_port}
"""
    )
    proc = env.procs.spawn(tag, [HAPROXY, "-db", "-f", str(conf)], log)
    wait_for_port(port, proc, log, 15)
    return port, {"config": str(conf), "log": str(log), "nbthread": threads or "default"}


def target_available(name: str) -> str | None:
    """None when ``name`` can run here, else the reason it is skipped."""
    if name == "stunnel" and shutil.which(STUNNEL) is None:
        return f"{STUNNEL} not installed"
    if name.startswith("haproxy") and shutil.which(HAPROXY) is None:
        return f"{HAPROXY} not installed"
    if name.startswith("proxy-asyncio"):
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed, so `proxy` already runs the stdlib asyncio loop"
    return None


# --------------------------------------------------------------------------------------------
# the client


@dataclass(frozen=True)
class Endpoint:
    """Where the client connects: the port and the TLS context (None: plain TCP)."""

    port: int
    ctx: ssl.SSLContext | None


class Conn:
    """One blocking client connection (TLS when ``ctx`` is given) with a read buffer."""

    __slots__ = ("buf", "sock")

    def __init__(self, target: Endpoint) -> None:
        sock = socket.create_connection(("127.0.0.1", target.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = target.ctx
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname="localhost")
            except BaseException:
                sock.close()
                raise
        self.sock: socket.socket = sock
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise BenchError("connection closed by the server")
        self.buf += chunk

    def line(self) -> bytes:
        buf = self.buf
        while (i := buf.find(b"\r\n")) < 0:
            self.fill()
            buf = self.buf
        out = bytes(buf[:i])
        del buf[: i + 2]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def call(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.line()

    def expect(self, data: bytes, prefix: bytes) -> bytes:
        reply = self.call(data)
        if not reply.startswith(prefix):
            raise BenchError(f"{data[:40]!r}: expected {prefix!r}, got {reply!r}")
        return reply


def w_puts(target: Endpoint, seconds: float, batch: int, size: int) -> dict[str, Any]:
    conn = Conn(target)
    try:
        conn.expect(b"use bench-puts\r\n", b"USING")
        payload = (b"put 0 0 60 %d\r\n%s\r\n" % (size, b"x" * size)) * batch
        sock = conn.sock
        sent = got = 0

        def read_until(target: int) -> None:
            nonlocal got
            buf = conn.buf
            while got < target:
                chunk = sock.recv(262144)
                if not chunk:
                    raise BenchError("connection closed during pipelined puts")
                buf += chunk
                end = buf.rfind(b"\r\n") + 2
                if end < 2:
                    continue
                done = buf[:end]
                lines = done.count(b"\r\n")
                if done.count(b"INSERTED ") != lines:
                    bad = next(x for x in bytes(done).split(b"\r\n") if not x.startswith(b"INS"))
                    raise BenchError(f"pipelined put answered {bad!r}")
                got += lines
                del buf[:end]

        # warm-up: a few batches, not timed
        for _ in range(3):
            sock.sendall(payload)
            sent += batch
        read_until(sent)
        sent = got = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            sock.sendall(payload)
            sent += batch
            read_until(sent - batch)  # at most two batches in flight
            if time.perf_counter() >= deadline:
                break
        read_until(sent)
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    return {"puts": sent, "seconds": elapsed, "puts_per_s": sent / elapsed}


def w_cycles(target: Endpoint, seconds: float, size: int) -> dict[str, Any]:
    conn = Conn(target)
    try:
        conn.expect(b"use bench-cycle\r\n", b"USING")
        conn.expect(b"watch bench-cycle\r\n", b"WATCHING")
        conn.expect(b"ignore default\r\n", b"WATCHING")
        put = b"put 0 0 60 %d\r\n%s\r\n" % (size, b"y" * size)
        n = 0

        def cycle() -> None:
            inserted = conn.call(put)
            if not inserted.startswith(b"INSERTED "):
                raise BenchError(f"put answered {inserted!r}")
            reserved = conn.call(b"reserve-with-timeout 0\r\n")
            parts = reserved.split(b" ")
            if parts[0] != b"RESERVED":
                raise BenchError(f"reserve answered {reserved!r}")
            conn.exact(int(parts[2]) + 2)
            deleted = conn.call(b"delete %s\r\n" % parts[1])
            if deleted != b"DELETED":
                raise BenchError(f"delete answered {deleted!r}")

        for _ in range(100):
            cycle()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(50):
                cycle()
            n += 50
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    return {"cycles": n, "seconds": elapsed, "cycles_per_s": n / elapsed}


def _percentile(sorted_values: list[int], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


def w_rtt(target: Endpoint, seconds: float) -> dict[str, Any]:
    conn = Conn(target)
    samples: list[int] = []
    try:
        sock = conn.sock
        cmd = b"list-tube-used\r\n"
        clock = time.perf_counter_ns
        for _ in range(200):
            conn.call(cmd)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                t = clock()
                sock.sendall(cmd)
                reply = conn.line()
                samples.append(clock() - t)
            if reply != b"USING default":
                raise BenchError(f"list-tube-used answered {reply!r}")
    finally:
        conn.close()
    return {"samples_ns": samples}


def rtt_summary(samples: list[int]) -> dict[str, Any]:
    samples = sorted(samples)
    return {
        "samples": len(samples),
        "rtt_p50_us": _percentile(samples, 0.5) / 1000,
        "rtt_p99_us": _percentile(samples, 0.99) / 1000,
        "rtt_mean_us": sum(samples) / len(samples) / 1000,
    }


def w_conns(target: Endpoint, seconds: float, limit: int) -> dict[str, Any]:
    def one() -> None:
        conn = Conn(target)
        try:
            reply = conn.call(b"list-tube-used\r\n")
        finally:
            conn.close()
        if reply != b"USING default":
            raise BenchError(f"list-tube-used answered {reply!r}")

    for _ in range(20):
        one()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while n < limit:
        one()
        n += 1
        if n % 10 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    return {"conns": n, "warmup": 20, "seconds": elapsed, "conns_per_s": n / elapsed}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def front_pid(t: Target) -> int:
    """The process whose memory the idle workload measures: the front (beanstalkd for
    ``direct``)."""
    fronts = [proc for name, proc, _ in t.procs.procs if name != "beanstalkd"]
    if not fronts:
        fronts = [proc for _, proc, _ in t.procs.procs]
    return fronts[-1].pid


def w_idle(t: Target, n: int) -> dict[str, Any]:
    """Hold ``n`` connections (each after one round trip) open; the front's RSS growth."""
    ep = t.endpoint
    assert ep is not None
    pid = front_pid(t)
    for _ in range(20):  # warm-up: lazy imports, caches, the first upstream connections
        c = Conn(ep)
        try:
            c.expect(b"list-tube-used\r\n", b"USING")
        finally:
            c.close()
    time.sleep(0.5)  # let the front finish closing the warm-up connections
    before = _rss_kib(pid)
    conns: list[Conn] = []
    try:
        for _ in range(n):
            c = Conn(ep)
            conns.append(c)
            c.expect(b"list-tube-used\r\n", b"USING")
        time.sleep(1.0)  # settle (deferred frees, timers)
        after = _rss_kib(pid)
    finally:
        for c in conns:
            c.close()
    return {
        "conns": n,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": (after - before) / n,
    }


def tls_details(target: Endpoint) -> dict[str, Any]:
    if target.ctx is None:
        return {"tls": None}
    conn = Conn(target)
    try:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        conn.expect(b"list-tube-used\r\n", b"USING")
        cipher = sock.cipher()
        return {"tls": sock.version(), "cipher": cipher[0] if cipher else None}
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# the fairness workload


def _make_tubes(port: int, n: int, per_conn: int = 5000) -> list[Conn]:
    """``n`` tubes t0..t<n-1> in beanstalkd, which exist while these connections watch them."""
    holders = []
    for start in range(0, n, per_conn):
        conn = Conn(Endpoint(port, None))
        holders.append(conn)
        names = range(start, min(n, start + per_conn))
        conn.sock.sendall(b"".join(b"watch t%d\r\n" % i for i in names))
        for _ in names:
            reply = conn.line()
            if not reply.startswith(b"WATCHING "):
                raise BenchError(f"watch answered {reply!r}")
    return holders


def _load_endpoint(port: int, pki_dir: str | None, cn: str) -> Endpoint:
    return Endpoint(port, PKI(Path(pki_dir)).client_context(cn) if pki_dir else None)


def _flood(
    port: int, pki_dir: str | None, stop: multiprocessing.synchronize.Event, counts: Any
) -> None:  # pragma: no cover - runs in a child process
    """Pipeline distinct denied ``use`` commands until ``stop``; counts[0] = bytes sent,
    counts[1] = replies received."""
    conn = Conn(_load_endpoint(port, pki_dir, FLOOD_CN))
    sock = conn.sock
    sock.setblocking(False)  # one thread: an SSL socket must not be read and written at once
    i = sent = got = 0
    out = b""
    while not stop.is_set():
        if not out:
            out = b"".join(b"use z%07d\r\n" % n for n in range(i, i + 2000))
            i += 2000
        readable, writable, _ = select.select([sock], [sock], [], 0.1)
        if readable or sock.pending():  # type: ignore[attr-defined]
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                while chunk := sock.recv(262144):
                    got += chunk.count(b"\n")
                    counts[1] = got
                    if not sock.pending():  # type: ignore[attr-defined]
                        break
        if writable:
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                n = sock.send(out[:65536])
                out = out[n:]
                sent += n
                counts[0] = sent
    conn.close()


def _lister(
    port: int, pki_dir: str | None, stop: multiprocessing.synchronize.Event, counts: Any
) -> None:  # pragma: no cover - runs in a child process
    """Five pipelined ``list-tubes`` at a time until ``stop``; counts[0] = calls answered,
    counts[1] = names in the last reply."""
    conn = Conn(_load_endpoint(port, pki_dir, LISTER_CN))
    n = 0
    while not stop.is_set():
        conn.sock.sendall(b"list-tubes\r\n" * 5)
        for _ in range(5):
            line = conn.line()
            if not line.startswith(b"OK "):
                raise BenchError(f"list-tubes answered {line!r}")
            body = conn.exact(int(line[3:]) + 2)
            n += 1
            counts[0] = n
            counts[1] = body.count(b"\n- ")
    conn.close()


def _bystander(target: Endpoint, seconds: float) -> tuple[list[int], list[int]]:
    """Sequential round trips for ``seconds``, alternating ``list-tube-used`` (answered by
    beanstalkd) and an unknown command (answered by the proxy itself, so its round trip is
    the proxy's own responsiveness, whatever beanstalkd is busy with): two sample lists, ns."""
    conn = Conn(target)
    upstream: list[int] = []
    local: list[int] = []
    clock = time.perf_counter_ns
    sock = conn.sock
    try:
        for _ in range(50):
            conn.call(b"list-tube-used\r\n")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = clock()
            sock.sendall(b"list-tube-used\r\n")
            reply = conn.line()
            upstream.append(clock() - t)
            if reply != b"USING default":
                raise BenchError(f"list-tube-used answered {reply!r}")
            t = clock()
            sock.sendall(b"no-such-command\r\n")
            reply = conn.line()
            local.append(clock() - t)
            if reply != b"UNKNOWN_COMMAND":
                raise BenchError(f"no-such-command answered {reply!r}")
    finally:
        conn.close()
    return upstream, local


def _latency(samples: tuple[list[int], list[int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prefix, values in zip(("", "local_"), samples, strict=True):
        ordered = sorted(values)
        out[f"{prefix}round_trips"] = len(ordered)
        out[f"{prefix}p50_ms"] = _percentile(ordered, 0.5) / 1e6
        out[f"{prefix}p99_ms"] = _percentile(ordered, 0.99) / 1e6
        out[f"{prefix}worst_ms"] = ordered[-1] / 1e6 if ordered else float("nan")
    return out


def run_fairness(t: Target, pki: PKI, seconds: float, tubes: int) -> dict[str, Any]:
    """The ``fairness`` workload against one proxy target (see the module docstring)."""
    ep = t.endpoint
    assert ep is not None
    t0 = time.monotonic()
    holders = _make_tubes(t.info["beanstalkd_port"], tubes)
    out: dict[str, Any] = {"tubes": tubes, "tube_setup_s": round(time.monotonic() - t0, 2)}
    mp = multiprocessing.get_context("fork")
    log = Path(t.info["log"]) if t.info.get("log") else None
    try:
        out["idle"] = _latency(_bystander(ep, seconds))
        for phase, body in (("flood", _flood), ("list_tubes", _lister)):
            if phase == "flood" and ep.ctx is None:
                continue  # direct: beanstalkd has no ACL; the flood would create tubes
            stop = mp.Event()
            counts = mp.Array("q", 2)
            log_before = log.stat().st_size if log else 0
            pki_dir = str(pki.dir) if ep.ctx is not None else None
            proc = mp.Process(target=body, args=(ep.port, pki_dir, stop, counts))
            proc.start()
            try:
                while counts[1] == 0 and proc.is_alive():  # the load is under way
                    time.sleep(0.01)
                started = time.monotonic()
                first = counts[1]
                result = _latency(_bystander(ep, seconds))
                elapsed = time.monotonic() - started
                progress = counts[1] - first if phase == "flood" else counts[0]
            finally:
                stop.set()
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            if phase == "flood":
                result["denials_per_s"] = round(progress / elapsed)
                result["flood_bytes"] = counts[0]
                grown = (log.stat().st_size if log else 0) - log_before
                result["log_bytes"] = grown
                result["log_per_flood_byte"] = grown / counts[0] if counts[0] else None
            else:
                result["list_tubes_calls"] = counts[0]
                result["ms_per_list_tubes"] = 1000 * elapsed / max(counts[0], 1)
                result["visible_tubes"] = counts[1]
            out[phase] = result
    finally:
        for h in holders:
            h.close()
    return out


def render_fairness(name: str, r: dict[str, Any]) -> str:
    lines = [
        f"fairness {name}: {r['tubes']:,} tubes (made in {r['tube_setup_s']} s); bystander "
        "round trips: list-tube-used (via beanstalkd) | unknown command (answered locally)",
        f"  {'phase':<12}{'trips':>8}{'p50 ms':>9}{'p99 ms':>9}{'worst ms':>10} |"
        f"{'p50 ms':>9}{'p99 ms':>9}{'worst ms':>10}  load",
    ]
    for phase in ("idle", "flood", "list_tubes"):
        if phase not in r:
            lines.append(f"  {phase:<12}{'n/a':>8}")
            continue
        x = r[phase]
        extra = ""
        if phase == "flood":
            ratio = x["log_per_flood_byte"]
            extra = (
                f"{x['denials_per_s']:,} denied commands/s; log grew {x['log_bytes']:,} B for "
                f"{x['flood_bytes']:,} B sent"
                + (f" ({100 * ratio:.3f}%)" if ratio is not None else "")
            )
        elif phase == "list_tubes":
            extra = (
                f"{x['list_tubes_calls']} list-tubes, {x['ms_per_list_tubes']:.1f} ms each, "
                f"{x['visible_tubes']:,} visible"
            )
        lines.append(
            f"  {phase:<12}{x['round_trips']:>8}{x['p50_ms']:>9.2f}{x['p99_ms']:>9.2f}"
            f"{x['worst_ms']:>10.2f} |{x['local_p50_ms']:>9.2f}{x['local_p99_ms']:>9.2f}"
            f"{x['local_worst_ms']:>10.2f}  {extra}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# running the targets


@dataclass
class Params:
    seconds: float  # per workload and target, split evenly over the rounds
    rounds: int
    batch: int
    body: int
    conn_limit: int  # per target, split evenly over the rounds

    @property
    def slice(self) -> float:
        return self.seconds / self.rounds


@dataclass
class Target:
    """One started target: its processes, where to connect, and the per-round results."""

    name: str  # the label: the target name, "@<N>p" added for an ACL of N principals
    kind: str = ""  # the target name (empty: same as ``name``)
    principals: int = 1
    procs: Processes = field(default_factory=Processes)
    endpoint: Endpoint | None = None
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    slices: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {w: [] for w in WORKLOADS}
    )
    status: str = "starting"
    reason: str = ""
    idle: dict[str, Any] | None = None  # the idle workload's result


def start_target(t: Target, work: Path, pki: PKI, args: argparse.Namespace) -> None:
    """Start a fresh beanstalkd and the target's front in front of it."""
    upstream = start_beanstalkd(work, t.procs)
    env = Env(
        work=work,
        pki=pki,
        procs=t.procs,
        upstream_port=upstream,
        profile_dir=args.profile,
        notes=t.notes,
        workers=args.proxy_workers,
        principals=t.principals,
        principal_kind=args.principal_kind,
        shadow=(t.kind or t.name) in SHADOW_TARGETS,
        source=args.baseline if (t.kind or t.name) in BASELINE_TARGETS else REPO,
    )
    ctx: ssl.SSLContext | None = pki.client_context()
    info: dict[str, Any]
    kind = t.kind or t.name
    if kind == "direct":
        port, info, ctx = upstream, {}, None
    elif kind in ("proxy", "proxy-shadow", "proxy-baseline"):
        loop = "uvloop" if target_available("proxy-asyncio") is None else "asyncio"
        port, info = start_proxy(env, loop)
    elif kind == "proxy-asyncio":
        port, info = start_proxy(env, "asyncio")
    elif t.name in TRANSPORT_TARGETS:
        loop = "asyncio" if t.name.startswith("proxy-asyncio") else "uvloop"
        if loop == "uvloop" and target_available("proxy-asyncio") is not None:
            loop = "asyncio"
        port, info = start_proxy(env, loop, t.name.rsplit("-", 1)[1])
    elif kind == "stunnel":
        port, info = start_stunnel(env)
    elif kind == "haproxy":
        port, info = start_haproxy(env, args.proxy_workers)
    elif kind == "haproxy-auto":
        port, info = start_haproxy(env, None)
    else:  # pragma: no cover - validated by the argument parser
        raise BenchError(f"unknown target {kind}")
    t.info.update(info)
    t.info["beanstalkd_port"] = upstream
    t.endpoint = Endpoint(port, ctx)
    t.info.update(tls_details(t.endpoint))
    t.status = "ok"


def front_cpu(t: Target) -> float | None:
    """CPU seconds (user + system, from ``/proc/PID/stat``) the target's front has used so far;
    None for ``direct``, off Linux, or with ``--proxy-workers`` > 1 (workers are not counted)."""
    if t.info.get("workers", 1) > 1:
        return None
    total, found = 0.0, False
    for name, proc, _ in t.procs.procs:
        if name == "beanstalkd":
            continue
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        found = True
    return total if found else None


def run_round(t: Target, p: Params) -> str:
    """One slice of every workload against ``t``; returns a one-line summary."""
    ep = t.endpoint
    assert ep is not None
    pid = front_pid(t)
    cpu = [_cpu_seconds(pid)]
    puts = w_puts(ep, p.slice, p.batch, p.body)
    cpu.append(_cpu_seconds(pid))
    cycles = w_cycles(ep, p.slice, p.body)
    cpu.append(_cpu_seconds(pid))
    rtt = w_rtt(ep, p.slice)
    cpu.append(_cpu_seconds(pid))
    conns = w_conns(ep, p.slice, max(10, p.conn_limit // p.rounds))
    cpu.append(_cpu_seconds(pid))
    results = (puts, cycles, rtt, conns)
    for i, (w, r) in enumerate(zip(WORKLOADS, results, strict=True)):
        r["front_cpu_s"] = cpu[i + 1] - cpu[i]  # warm-up included
        t.slices[w].append(r)
    cpu_note = ""
    made = conns["conns"] + conns["warmup"]
    if made and t.info.get("workers", 1) == 1 and front_cpu(t) is not None:
        # The front's CPU per connection (warm-up included): much less sensitive to other
        # load on the machine than connections/s, at the clock tick's resolution (10 ms).
        conns["cpu_us_per_conn"] = conns["front_cpu_s"] * 1e6 / made
        cpu_note = f" ({conns['cpu_us_per_conn']:,.0f}us CPU each)"
    lat = rtt_summary(rtt["samples_ns"])
    return (
        f"puts {puts['puts_per_s']:>9,.0f}/s  cycles {cycles['cycles_per_s']:>7,.0f}/s  "
        f"rtt p50 {lat['rtt_p50_us']:>6.1f}us p99 {lat['rtt_p99_us']:>7.1f}us  "
        f"conns {conns['conns_per_s']:>7,.0f}/s{cpu_note}"
    )


def run_idle(targets: dict[str, Target], work: Path, pki: PKI, args: argparse.Namespace) -> None:
    """The idle workload: a fresh front per target, one at a time."""
    for name, t in targets.items():
        if t.status != "ok":
            continue
        fresh = Target(name)
        try:
            start_target(fresh, work, pki, args)
            t.idle = w_idle(fresh, args.idle)
        except (BenchError, OSError, ssl.SSLError) as exc:
            t.notes.append(f"{name}: idle workload failed: {diagnose(fresh, exc)}")
            print(f"  {name:<14} idle FAILED: {exc}", flush=True)
            continue
        finally:
            fresh.procs.stop()
        r = t.idle
        print(
            f"  {name:<14} idle: {r['conns']} connections, {r['kib_per_conn']:.1f} KiB each",
            flush=True,
        )


def diagnose(t: Target, exc: BaseException) -> str:
    """Why a target failed: the error, any child that died, the tail of the front's log."""
    lines = [str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"]
    for pname, proc, _ in t.procs.procs:
        rc = proc.poll()
        if rc is not None:
            how = f"signal {-rc}" if rc < 0 else f"status {rc}"
            lines.append(f"{pname} (pid {proc.pid}) is gone: exited with {how}")
    if t.info.get("log"):
        lines.append(f"{t.name} log {t.info['log']}:\n{log_tail(Path(t.info['log']), 12)}")
    return "\n".join(lines)


def summarize(t: Target) -> dict[str, Any]:
    if t.status != "ok":
        return {"status": t.status, "reason": t.reason, "notes": t.notes, **t.info}
    med = statistics.median
    s = t.slices
    samples = [x for r in s["rtt"] for x in r["samples_ns"]]
    out: dict[str, Any] = {"status": "ok", **t.info, "notes": t.notes}
    out["puts_per_s"] = med(r["puts_per_s"] for r in s["puts"])
    out["puts"] = sum(r["puts"] for r in s["puts"])
    out["cycles_per_s"] = med(r["cycles_per_s"] for r in s["cycles"])
    out["cycles"] = sum(r["cycles"] for r in s["cycles"])
    out.update(rtt_summary(samples))
    out["conns_per_s"] = med(r["conns_per_s"] for r in s["conns"])
    out["conns"] = sum(r["conns"] for r in s["conns"])
    if t.idle is not None:
        out["idle"] = t.idle
    # CPU time the front spent per operation: less sensitive to a busy machine than rates.
    ops = {
        "puts": sum(r["puts"] for r in s["puts"]),
        "cycles": sum(r["cycles"] for r in s["cycles"]),
        "rtt": sum(len(r["samples_ns"]) for r in s["rtt"]),
        "conns": sum(r["conns"] for r in s["conns"]),
    }
    out["front_cpu_us_per_op"] = {
        w: 1e6 * sum(r.get("front_cpu_s", 0.0) for r in s[w]) / n for w, n in ops.items() if n
    }
    cpu = [r["cpu_us_per_conn"] for r in s["conns"] if "cpu_us_per_conn" in r]
    if cpu:
        out["conn_cpu_us"] = med(cpu)
    out["rounds"] = {
        "puts_per_s": [round(r["puts_per_s"]) for r in s["puts"]],
        "cycles_per_s": [round(r["cycles_per_s"]) for r in s["cycles"]],
        "rtt_p50_us": [round(rtt_summary(r["samples_ns"])["rtt_p50_us"], 1) for r in s["rtt"]],
        "conns_per_s": [round(r["conns_per_s"]) for r in s["conns"]],
        "conn_cpu_us": [round(x) for x in cpu],
    }
    return out


# --------------------------------------------------------------------------------------------
# report


METRICS = (
    # key, header, format, higher_is_better
    ("puts_per_s", "puts/s", "{:,.0f}", True),
    ("cycles_per_s", "cycles/s", "{:,.0f}", True),
    ("rtt_p50_us", "rtt p50 us", "{:,.1f}", False),
    ("rtt_p99_us", "rtt p99 us", "{:,.1f}", False),
    ("conns_per_s", "conns/s", "{:,.0f}", True),
)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = results.get("direct")
    out: dict[str, dict[str, float]] = {}
    if not base or base.get("status") != "ok":
        return out
    for name, r in results.items():
        if name == "direct" or r.get("status") != "ok":
            continue
        out[name] = {key: r[key] / base[key] for key, *_ in METRICS if base.get(key)}
    return out


def acl_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``proxy@Np/proxy`` (and the same for ``proxy-asyncio``): each metric with an ACL of N
    principals over the same target with one."""
    out: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        base_name = name.split("@")[0]
        base = results.get(base_name)
        if base_name == name or r.get("status") != "ok" or not base or base.get("status") != "ok":
            continue
        out[f"{name}/{base_name}"] = {
            key: r[key] / base[key] for key, *_ in METRICS if base.get(key)
        }
    return out


def render(info: dict[str, Any], p: Params, results: dict[str, dict[str, Any]]) -> str:
    lines = [""]
    lines.append(
        f"machine: {info['cpu']}, nproc {info['nproc']}, {info['platform']}\n"
        f"         {info['python']}, {info['openssl']}, uvloop {info['uvloop'] or 'not installed'}"
    )
    versions = [info.get(k) for k in ("beanstalkd", "stunnel", "haproxy")]
    lines.append("         " + "; ".join(v for v in versions if v))
    start, end = info.get("loadavg_start"), info.get("loadavg_end")
    if start and end:
        busy = max(start[0], end[0]) > 0.5 * info["nproc"]
        lines.append(
            f"load:    1-min load average {start[0]:.2f} at start, {end[0]:.2f} at end"
            + ("  (other processes were busy: expect noise)" if busy else "")
        )
    lines.append(
        f"params:  {p.seconds:g} s per workload and target in {p.rounds} interleaved round(s), "
        f"put body {p.body} B, {p.batch} puts per write, conns capped at {p.conn_limit}"
    )
    sizes = sorted({int(r.get("principals", 1)) for r in results.values()})
    if sizes != [1]:
        lines.append(
            f"acl:     proxy@Np: the bench client's principal and rule come after N-1 other "
            f"({info.get('principal_kind', 'exact')}) principals with one rule each; "
            f"sizes {', '.join(map(str, sizes))}"
        )
    lines.append("")
    labels = {
        n: f"{n} ({r['loop']})" if n.split("@")[0] == "proxy" and r.get("loop") else n
        for n, r in results.items()
    }
    idle = {n: r["idle"] for n, r in results.items() if r.get("idle")}
    width = max(16, *(len(x) + 2 for x in labels.values()))
    head = f"{'target':<{width}}{'tls':<9}" + "".join(f"{h:>13}" for _, h, _, _ in METRICS)
    lines.append(head)
    lines.append("-" * len(head))
    for name, r in results.items():
        label = labels[name]
        if r.get("status") != "ok":
            reason = str(r.get("reason", "")).splitlines()[0] if r.get("reason") else ""
            lines.append(f"{label:<{width}}{r.get('status', '?')}: {reason}")
            continue
        cells = "".join(f"{fmt.format(r[key]):>13}" for key, _, fmt, _ in METRICS)
        lines.append(f"{label:<{width}}{r.get('tls') or 'plain':<9}{cells}")
    rat = ratios(results)
    if rat:
        lines.append("")
        lines.append("ratio target/direct (throughput: higher is better; latency: lower is better)")
        width = max(len(f"ratio {n}/direct") for n in rat) + 2
        lines.append(f"{'':<{width}}" + "".join(f"{h:>13}" for _, h, _, _ in METRICS))
        for name, rr in rat.items():
            label = f"ratio {name}/direct"
            cells = "".join(f"{rr.get(key, float('nan')):>13.2f}" for key, *_ in METRICS)
            lines.append(f"{label:<{width}}{cells}")
    cpu = {n: r["front_cpu_us_per_op"] for n, r in results.items() if r.get("front_cpu_us_per_op")}
    if cpu:
        lines.append("")
        lines.append(
            "front CPU per operation, us (user + system of the front's process; lower is better)"
        )
        lines.append(f"{'target':<{width}}" + "".join(f"{w:>10}" for w in WORKLOADS))
        for name, c in cpu.items():
            cells = "".join(f"{c.get(w, float('nan')):>10.1f}" for w in WORKLOADS)
            lines.append(f"{labels.get(name, name):<{width}}{cells}")
    if idle:
        lines.append("")
        lines.append("idle: connections held open on a fresh front (RSS of the front's process)")
        lines.append(
            f"{'target':<{width}}{'conns':>8}{'RSS before MiB':>16}{'RSS after MiB':>15}"
            f"{'KiB/conn':>10}"
        )
        for name, r in idle.items():
            lines.append(
                f"{labels.get(name, name):<{width}}{r['conns']:>8}"
                f"{r['rss_before_kib'] / 1024:>16.1f}{r['rss_after_kib'] / 1024:>15.1f}"
                f"{r['kib_per_conn']:>10.1f}"
            )
    per_conn = {labels[n]: r["conn_cpu_us"] for n, r in results.items() if r.get("conn_cpu_us")}
    if per_conn:
        lines.append("")
        lines.append("front CPU per connection (conns workload, /proc utime+stime, median):")
        lines.extend(f"  {label:<{width}}{us:>10,.0f} us" for label, us in per_conn.items())
    acl = acl_ratios(results)
    if acl:
        lines.append("")
        lines.append(
            "ratio N principals/1 principal (the ACL-size cost; 1.00 = none; latency: lower is "
            "better)"
        )
        width = max(len(f"ratio {n}") for n in acl) + 2
        lines.append(f"{'':<{width}}" + "".join(f"{h:>13}" for _, h, _, _ in METRICS))
        for label, rr in acl.items():
            cells = "".join(f"{rr.get(key, float('nan')):>13.2f}" for key, *_ in METRICS)
            lines.append(f"{'ratio ' + label:<{width}}{cells}")
    notes = [n for r in results.values() for n in r.get("notes", [])]
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def print_profile(path: Path, top: int = 25) -> None:
    if not path.exists():
        print(f"(no profile written at {path})")
        return
    print(f"\n--- cProfile of {path.name}: top {top} by own time ---")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark beanstalk-proxy vs direct beanstalkd, stunnel and HAProxy."
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run (well under 30 s)")
    ap.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: all)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        help="seconds per workload and target, over all rounds (default 4, quick 0.5)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds over the targets; medians are reported (default 3, quick 1)",
    )
    ap.add_argument("--batch", type=int, default=200, help="puts per write (default 200)")
    ap.add_argument("--body", type=int, default=100, help="put body size in bytes (default 100)")
    ap.add_argument("--conn-limit", type=int, help="max connections in the conns workload")
    ap.add_argument(
        "--idle",
        type=int,
        metavar="N",
        help="idle workload: N connections held open on a fresh front per target, RSS per "
        "connection (default 2000, quick 50; 0 skips it)",
    )
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run proxy targets under cProfile, write DIR/proxy-<loop>.prof and print hot spots",
    )
    ap.add_argument(
        "--proxy-workers",
        type=int,
        default=1,
        metavar="N",
        help="pass --workers N to `serve` (default 1: a single process, the flag is not passed)",
    )
    ap.add_argument(
        "--principals",
        default="1",
        metavar="N[,N...]",
        help="ACL sizes for the proxy targets: each N runs the proxy with N-1 other principals "
        "(one rule each) before the bench client's, as target proxy@Np (1: plain `proxy`; "
        "default 1)",
    )
    ap.add_argument(
        "--principal-kind",
        choices=PRINCIPAL_KINDS,
        default="exact",
        help="match patterns of the other principals: exact CN/URI/DNS values (default) or globs",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument(
        "--fairness",
        action="store_true",
        help="run the fairness workload instead of the others (direct and proxy targets; "
        "default proxy)",
    )
    ap.add_argument(
        "--tubes", type=int, default=100_000, help="tubes for --fairness (default 100000)"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout of the repository (e.g. `git worktree add /tmp/base HEAD~1`): "
        "target proxy-baseline runs its `proxy` package, interleaved with this one's",
    )
    args = ap.parse_args(argv)
    if args.fairness and args.targets == ",".join(ALL_TARGETS):
        args.targets = "proxy"
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in KNOWN_TARGETS]
    if unknown or not names:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_TARGETS)}")
    args.target_list = list(dict.fromkeys(names))
    if ("proxy-baseline" in names) != (args.baseline is not None):
        ap.error("--baseline DIR and the target proxy-baseline go together")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "proxy" / "__main__.py").is_file():
            ap.error(f"--baseline {args.baseline}: no proxy/__main__.py there")
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else 4.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1 or args.proxy_workers < 1:
        ap.error("--rounds and --proxy-workers must be >= 1")
    if args.idle is None:
        args.idle = 50 if args.quick else 2000
    if args.idle < 0:
        ap.error("--idle must be >= 0")
    try:
        args.principal_sizes = sorted({int(x) for x in args.principals.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--principals: expected comma-separated integers, got {args.principals!r}")
    if not args.principal_sizes or args.principal_sizes[0] < 1:
        ap.error("--principals: every size must be >= 1")
    if args.conn_limit is None:
        args.conn_limit = 300 if args.quick else 5000
    if args.batch < 1 or args.body < 0 or args.seconds <= 0:
        ap.error("--batch must be >= 1, --body >= 0 and --seconds > 0")
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` stops its child processes."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which(BEANSTALKD) is None:
        print(f"error: {BEANSTALKD} not found (apt-get install beanstalkd)", file=sys.stderr)
        return 1
    info = machine_info()
    info["loadavg_start"] = os.getloadavg()
    info["principal_kind"] = args.principal_kind
    # (label, target, ACL size): the proxy targets run once per --principals size.
    labels = [
        (name if n == 1 else f"{name}@{n}p", name, n)
        for name in args.target_list
        for n in (args.principal_sizes if name in PROXY_TARGETS else [1])
    ]
    p = Params(args.seconds, args.rounds, args.batch, args.body, args.conn_limit)
    mode = "quick" if args.quick else "default"
    print(f"beanstalk-proxy benchmark ({mode}): targets {', '.join(args.target_list)}", flush=True)
    skipped: dict[str, dict[str, Any]] = {}
    targets: dict[str, Target] = {}
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bsp-bench-"))
    try:
        with _terminate_on_sigterm():
            pki = make_pki(tmp / "pki")
            for name, kind, size in labels:
                skip = target_available(kind)
                if skip is not None:
                    print(f"  {name:<14} skipped: {skip}", flush=True)
                    skipped[name] = {"status": "skipped", "reason": skip}
                    continue
                t = targets[name] = Target(name, kind, size)
                try:
                    start_target(t, tmp, pki, args)
                except (BenchError, OSError, ssl.SSLError) as exc:
                    t.status, t.reason = "failed", diagnose(t, exc)
                    t.procs.stop()
                    print(f"  {name:<14} FAILED to start: {t.reason}", flush=True)
                    continue
                loop = t.info.get("loop", "")
                extra = f", {loop} loop" if loop else ""
                print(f"  {name:<14} started ({t.info.get('tls') or 'plain'}{extra})", flush=True)
            if args.fairness:
                for t in targets.values():
                    if t.status != "ok" or t.name not in ("direct", "proxy", "proxy-asyncio"):
                        continue
                    try:
                        t.info["fairness"] = run_fairness(t, pki, p.seconds, args.tubes)
                    except (BenchError, OSError, ssl.SSLError) as exc:
                        t.status, t.reason = "failed", diagnose(t, exc)
                        print(f"  {t.name:<14} FAILED: {t.reason}", flush=True)
                        continue
                    print(render_fairness(t.name, t.info["fairness"]), flush=True)
            # Rounds interleave the targets, so background load hits them all alike.
            for rnd in range(1, 0 if args.fairness else p.rounds + 1):
                for t in targets.values():
                    if t.status != "ok":
                        continue
                    try:
                        line = run_round(t, p)
                    except (BenchError, OSError, ssl.SSLError) as exc:
                        t.status, t.reason = "failed", diagnose(t, exc)
                        t.procs.stop()
                        print(f"  {t.name:<14} FAILED: {t.reason}", flush=True)
                        continue
                    print(f"  {t.name:<14} round {rnd}/{p.rounds}: {line}", flush=True)
            for t in targets.values():
                t.procs.stop()
            if args.idle:
                run_idle(targets, tmp, pki, args)
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    finally:
        for t in targets.values():
            t.procs.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    total = time.monotonic() - t_start
    if args.fairness:
        return _fairness_report(args, info, targets, skipped, total)
    results = {
        name: skipped[name] if name in skipped else summarize(targets[name])
        for name, _, _ in labels
    }
    print(render(info, p, results))
    print(f"\ntotal {total:.1f} s")
    if args.profile is not None:
        for r in results.values():
            if r.get("profile"):
                print_profile(Path(r["profile"]))
    if args.json is not None:
        doc = {
            "machine": info,
            "params": {
                **vars(p),
                "mode": mode,
                "targets": args.target_list,
                "principals": args.principal_sizes,
                "principal_kind": args.principal_kind,
            },
            "results": results,
            "ratios": ratios(results),
            "acl_ratios": acl_ratios(results),
            "total_seconds": round(total, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(t.status != "ok" for t in targets.values()) else 0


def _fairness_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    targets: dict[str, Target],
    skipped: dict[str, dict[str, Any]],
    total: float,
) -> int:
    start, end = info["loadavg_start"], info["loadavg_end"]
    print(
        f"\nmachine: {info['cpu']}, nproc {info['nproc']}, {info['python']}, "
        f"uvloop {info['uvloop'] or 'not installed'}\n"
        f"load:    1-min load average {start[0]:.2f} at start, {end[0]:.2f} at end\n"
        f"total {total:.1f} s"
    )
    results: dict[str, Any] = dict(skipped)
    for name, t in targets.items():
        results[name] = {"status": t.status, "reason": t.reason, **t.info}
    if args.json is not None:
        doc = {
            "machine": info,
            "params": {"workload": "fairness", "seconds": args.seconds, "tubes": args.tubes},
            "results": results,
            "total_seconds": round(total, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(t.status != "ok" for t in targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

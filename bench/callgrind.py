"""Instructions the proxy executes per round trip, per put/reserve/delete cycle and per
connection, counted by valgrind's callgrind, for one or more checkouts side by side.

Wall-clock and CPU-time figures (``bench.py``) move by several percent with whatever else runs
on a shared machine; an instruction count hardly moves, so this is the stable A/B for a
hot-path change. Each measurement starts ``serve`` from a checkout under ``valgrind
--tool=callgrind`` (``bench.py``'s proxy set-up: same generated config, ACL and PKI, a fresh
beanstalkd), opens one warm-up connection (``use``/``watch``/``ignore``, one
``list-tube-used``), then runs N operations of one workload, waits until the proxy has logged
every connection's close, stops it with SIGTERM and reads the total instructions (Ir) from
callgrind's output file. A run with N = 0 (the warm-up alone) is subtracted, so start-up,
imports and shutdown cancel out: per operation = (Ir(N) - Ir(0)) / N.

Workloads: ``rtt``, N ``list-tube-used`` round trips on the warm-up connection; ``cycles``, N
``put``/``reserve-with-timeout 0``/``delete`` cycles (3 round trips each, 100-byte body) on it;
``conns``, N new connections (TLS handshake with the client certificate, one
``list-tube-used``, close). Instructions are not time (cache misses and system calls are not
in them), so confirm a result with ``bench.py --targets proxy,proxy-baseline`` once.

    python bench/callgrind.py --src /work/wt/base --src .        # ratio: second / first
    python bench/callgrind.py --workloads rtt --rtt 3000 --keep /tmp/cg   # keep the outputs
    callgrind_annotate /tmp/cg/2-<dir>.rtt3000.out | head -60    # where the instructions go

Needs valgrind and beanstalkd. A run takes about a minute (the proxy starts in 20-30 s under
valgrind), so the default, every workload for two checkouts, takes several minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # bench/ is not a package: this directory is on the path

WORKLOADS = ("rtt", "cycles", "conns")
PER = {"rtt": "round trip", "cycles": "put/reserve/delete cycle", "conns": "connection"}
BODY = b"y" * 100
CLOSE_LINE = re.compile(r" INFO \S+ close ")  # the text log's close event
PUT = b"put 0 0 60 %d\r\n%s\r\n" % (len(BODY), BODY)


@dataclass
class Run:
    """One proxy under callgrind: where it listens, its process and its files."""

    endpoint: B.Endpoint
    proc: subprocess.Popen[bytes]
    log: Path
    out: Path
    procs: B.Processes


def start(src: Path, work: Path, pki: B.PKI, out: Path, loop: str) -> Run:
    procs = B.Processes()
    try:
        env = B.Env(
            work=work,
            pki=pki,
            procs=procs,
            upstream_port=B.start_beanstalkd(work, procs),
            profile_dir=None,
            source=src,
            wrapper=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
            start_timeout=300,
        )
        port, _ = B.start_proxy(env, loop)
    except BaseException:
        procs.stop()
        raise
    _, proc, log = procs.procs[-1]
    return Run(B.Endpoint(port, pki.client_context()), proc, log, out, procs)


def warm_up(run: Run) -> B.Conn:
    conn = B.Conn(run.endpoint)
    conn.expect(b"use bench-cycle\r\n", b"USING")
    conn.expect(b"watch bench-cycle\r\n", b"WATCHING")
    conn.expect(b"ignore default\r\n", b"WATCHING")
    conn.expect(b"list-tube-used\r\n", b"USING")
    return conn


def cycle(conn: B.Conn) -> None:
    conn.expect(PUT, b"INSERTED ")
    parts = conn.expect(b"reserve-with-timeout 0\r\n", b"RESERVED ").split(b" ")
    conn.exact(int(parts[2]) + 2)
    conn.expect(b"delete %s\r\n" % parts[1], b"DELETED")


def drive(run: Run, workload: str, n: int) -> int:
    """Run the workload; return how many connections the proxy should log as closed."""
    conn = warm_up(run)
    if workload == "rtt":
        for _ in range(n):
            conn.expect(b"list-tube-used\r\n", b"USING")
    elif workload == "cycles":
        for _ in range(n):
            cycle(conn)
    conn.close()
    if workload == "conns":
        for _ in range(n):
            other = B.Conn(run.endpoint)
            other.expect(b"list-tube-used\r\n", b"USING")
            other.close()
        return n + 1
    return 1


def stop(run: Run, closes: int) -> int:
    """Wait (bounded) until the proxy logged ``closes`` closes, stop it, return its total Ir."""
    deadline = time.monotonic() + 120
    while len(CLOSE_LINE.findall(run.log.read_text(errors="replace"))) < closes:
        if time.monotonic() > deadline:
            raise B.BenchError(f"the proxy logged fewer than {closes} closes; log {run.log}")
        time.sleep(0.2)  # polling a log file: there is no event to wait on
    run.proc.send_signal(signal.SIGTERM)
    try:
        run.proc.wait(300)  # valgrind writes its output when the process exits
    finally:
        run.procs.stop()
    text = run.out.read_text()
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if m is None:
        raise B.BenchError(f"no instruction total in {run.out}")
    return int(m.group(1))


def measure(src: Path, label: str, workload: str, n: int, work: Path, pki: B.PKI, loop: str) -> int:
    """Total Ir of one proxy run from ``src`` that served the warm-up and ``n`` operations
    (its callgrind output is ``<label>.<workload><n>.out`` in ``work``)."""
    out = work / f"{label}.{workload}{n}.out"
    run = start(src, work, pki, out, loop)
    try:
        closes = drive(run, workload, n)
    except BaseException:
        run.procs.stop()
        raise
    return stop(run, closes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--src",
        type=Path,
        action="append",
        help="a checkout whose proxy runs (repeat to compare; ratios are against the first; "
        "default: this checkout)",
    )
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    ap.add_argument("--rtt", type=int, default=3000, help="round trips (default 3000)")
    ap.add_argument("--cycles", type=int, default=2000, help="cycles (default 2000)")
    ap.add_argument("--conns", type=int, default=60, help="connections (default 60)")
    ap.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if B.target_available("proxy-asyncio") is None else "asyncio",  # None: ok
        help="the proxy's event loop (default uvloop when installed)",
    )
    ap.add_argument("--keep", type=Path, help="keep the callgrind output files in this directory")
    args = ap.parse_args(argv)
    args.src = [p.resolve() for p in args.src or [B.REPO]]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; expected some of {','.join(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", B.BEANSTALKD):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 1
    # The same string hashes in every run (dict and set layouts, hence instructions, repeat).
    os.environ["PYTHONHASHSEED"] = "0"
    work = Path(tempfile.mkdtemp(prefix="callgrind-"))
    pki = B.make_pki(work / "pki")
    per: dict[str, dict[Path, float]] = {w: {} for w in args.workloads}
    try:
        for i, src in enumerate(args.src, 1):
            label = f"{i}-{src.name}"  # two checkouts may have the same directory name
            zero = measure(src, label, "rtt", 0, work, pki, args.loop)
            print(f"{src}: warm-up alone {zero:,} Ir", flush=True)
            for w in args.workloads:
                n = getattr(args, w)
                total = measure(src, label, w, n, work, pki, args.loop)
                per[w][src] = (total - zero) / n
                print(f"{src}: {w} x{n} {total:,} Ir, {per[w][src]:,.0f} per {PER[w]}", flush=True)
    finally:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.out"):
                shutil.copy(f, args.keep / f.name)
        shutil.rmtree(work, ignore_errors=True)
    print()
    first = args.src[0]
    header = f"{'instructions per':<26}" + "".join(f"{s.name:>16}" for s in args.src)
    if len(args.src) > 1:
        header += "".join(f"{s.name + '/' + first.name:>24}" for s in args.src[1:])
    print(header)
    for w in args.workloads:
        row = f"{PER[w]:<26}" + "".join(f"{per[w][s]:>16,.0f}" for s in args.src)
        row += "".join(f"{per[w][s] / per[w][first]:>24.4f}" for s in args.src[1:])
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

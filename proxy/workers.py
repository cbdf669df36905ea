"""The ``serve --workers N`` supervisor: N workers that behave as one proxy.

The supervisor makes, before it forks, a private directory (mode 0700) holding the shared
counts of ``proxy.sharedlimits`` (so the connection and handshake limits hold for the whole
proxy) and, when ``metrics.listen`` is set, one unix socket per worker where that worker serves
its own status endpoints. A further child, the aggregator (``proxy.aggregate``), serves the one
configured ``metrics.listen`` address by asking every worker and merging the answers. The
supervisor itself runs no event loop: it forks, forwards SIGHUP (to the workers) and
SIGTERM/SIGINT (to every child), and waits.

When a worker dies, the supervisor zeroes its column of the shared counts (the kernel closed
its sockets, so nothing it counted is held any more) and starts a replacement in the same
column, unless the proxy is stopping, the worker exited by itself with an error (a fault that
a restart would repeat: then the others are stopped, as before), or more than
``MAX_RESPAWNS`` replacements were needed within ``RESPAWN_WINDOW`` seconds. An aggregator
that dies is replaced the same way. Children ask the kernel for SIGTERM when the supervisor
dies (``PR_SET_PDEATHSIG``, Linux), so a killed supervisor leaves no workers holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Final

from proxy.config import Endpoint
from proxy.logs import event
from proxy.sharedlimits import MIN_SOURCE_SLOTS, SharedCounts

__all__ = ["MAX_RESPAWNS", "RESPAWN_WINDOW", "WorkerPlan", "supervise"]

log = logging.getLogger("beanstalk_proxy")

#: Replacements allowed within RESPAWN_WINDOW seconds before the supervisor gives up.
MAX_RESPAWNS: Final = 5
RESPAWN_WINDOW: Final = 60.0
_AGGREGATOR: Final = -1  # the aggregator's index among the children
_PR_SET_PDEATHSIG: Final = 1


class WorkerPlan:
    """What the workers share: the private directory, the shared counts, and each worker's
    status socket (``status_endpoint``; only used when the aggregator runs)."""

    def __init__(self, workers: int, source_slots: int = MIN_SOURCE_SLOTS) -> None:
        self.workers = workers
        self.directory = tempfile.mkdtemp(prefix="beanstalk-proxy-")
        self.shared = SharedCounts(
            os.path.join(self.directory, "counts"), workers, source_slots=source_slots
        )

    def status_endpoint(self, worker: int) -> Endpoint:
        return Endpoint(None, None, os.path.join(self.directory, f"worker-{worker}.sock"))

    def status_endpoints(self) -> list[Endpoint]:
        return [self.status_endpoint(k) for k in range(self.workers)]

    def remove(self) -> None:
        """Delete the directory (the supervisor, at exit)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _in_child() -> None:
    """Signal dispositions for a freshly forked child, until its event loop installs its own
    handlers: a SIGHUP forwarded early must not kill it; SIGTERM/SIGINT do their default.
    And the kernel sends it SIGTERM if the supervisor dies."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(
    plan: WorkerPlan,
    run_worker: Callable[[int, bool], int],
    run_aggregator: Callable[[], int] | None = None,
) -> int:
    """Fork the workers (and the aggregator), supervise them until they are all gone; the
    exit status is 0 unless a child failed. ``run_worker(k, replacement)`` runs worker ``k``
    in the child; ``replacement`` is true when it replaces one that died."""
    children: dict[int, int] = {}  # pid -> worker index (or _AGGREGATOR)
    started: set[int] = set()
    respawns: list[float] = []
    stopping = False

    def start(index: int) -> None:
        replacement = index in started
        started.add(index)
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                _in_child()
                if index == _AGGREGATOR:
                    assert run_aggregator is not None
                    code = run_aggregator()
                else:
                    plan.shared.attach(index)
                    code = run_worker(index, replacement)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid, index in list(children.items()):
            if signum == signal.SIGHUP and index == _AGGREGATOR:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for k in range(plan.workers):
        start(k)
    if run_aggregator is not None:
        start(_AGGREGATOR)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    log.info(
        "supervisor started its workers",
        extra=event(
            "workers_started",
            pid=os.getpid(),
            workers=plan.workers,
            pids=sorted(p for p, i in children.items() if i != _AGGREGATOR),
        ),
    )
    status = 0
    try:
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            if index is None:
                continue
            what = "aggregator" if index == _AGGREGATOR else f"worker {index}"
            code = os.waitstatus_to_exitcode(wait_status)
            if index != _AGGREGATOR:
                plan.shared.reclaim(index)  # its sockets died with it
            if stopping:
                if code != 0:
                    status = status or 1
                continue
            if code > 0:  # it exited by itself with an error: a restart would repeat it
                log.error(
                    "worker exited; stopping the others",
                    extra=event("worker_exited", worker=what, pid=pid, code=code),
                )
                status = status or 1
                forward(signal.SIGTERM, None)
                continue
            now = time.monotonic()
            respawns[:] = [t for t in respawns if now - t < RESPAWN_WINDOW]
            if len(respawns) >= MAX_RESPAWNS:
                log.error(
                    "worker ended too often; stopping the others",
                    extra=event(
                        "worker_exited",
                        worker=what,
                        pid=pid,
                        code=code,
                        ended=_describe(code),
                        restarts=len(respawns),
                        window=RESPAWN_WINDOW,
                    ),
                )
                status = status or 1
                forward(signal.SIGTERM, None)
                continue
            respawns.append(now)
            log.error(
                "worker ended; its connections are released, starting a new one",
                extra=event("worker_restart", worker=what, pid=pid, ended=_describe(code)),
            )
            start(index)
    finally:
        plan.remove()
    return status


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"

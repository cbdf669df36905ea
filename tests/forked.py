"""Forked processes for the tests of the counts the workers of ``serve --workers N`` share
(``proxy.sharedlimits``): run a body in a child process, and let two processes, attached as
workers 0 and 1, admit at once and tell how many each admitted."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from functools import partial

from proxy.sharedlimits import SharedCounts


def in_child(body: Callable[[], object]) -> int:
    """Runs ``body`` in a forked child that exits 0 once it returns (1 if it raises); its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()  # the test sees only the exit code: keep the why on stderr
        finally:
            os._exit(code)
    return pid


def admitted_at_once(counts: SharedCounts, admit: Callable[[SharedCounts], int]) -> list[int]:
    """Two forked processes attach to ``counts`` as workers 0 and 1 and run ``admit`` at once;
    the number each says it admitted. Fails unless both exit cleanly."""
    r, w = os.pipe()

    def child(worker: int) -> None:
        counts.attach(worker)
        os.write(w, b"%d\n" % admit(counts))

    pids = [in_child(partial(child, k)) for k in (0, 1)]
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.close(w)
    with os.fdopen(r) as f:
        return [int(line) for line in f]

"""One event-loop timer for many deadlines that rarely come: ``Deadlines`` calls ``fire(item)``
for each item added with a delay once that delay has passed, unless its entry was discarded
first. The relay schedules each connection's close at its client certificate's expiry this
way: a heap entry (a three-item list) is about 120 bytes per connection where a
``TimerHandle`` of its own (the handle, its bound method and arguments, libuv's timer) held
about 500. Discarding an entry drops its item at once (the heap keeps no closed connection
alive); the empty entry leaves the heap at its deadline or when the heap is compacted, once
such entries outnumber the others (amortised O(1) per discard, so the heap stays within twice
the live entries plus ``SLACK``). Entries fire one at a time: a ``fire`` that raises leaves the
other due entries on the heap, to run on the next timer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["SLACK", "Deadline", "Deadlines"]

T = TypeVar("T")

#: Discarded entries the heap may hold before a compaction is considered.
SLACK = 64

#: A scheduled deadline, as ``add`` returns it: ``[loop time, tie-break, item or None]``
#: (a list, so that ``discard`` can drop the item in place; ``heapq`` compares the first two).
Deadline = list[Any]


class Deadlines(Generic[T]):
    """See the module docstring. Runs on the running event loop (``loop.time()`` clock)."""

    __slots__ = ("_discarded", "_fire", "_heap", "_seq", "_timer", "_timer_at")

    def __init__(self, fire: Callable[[T], None]) -> None:
        self._fire = fire
        self._heap: list[Deadline] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._discarded = 0  # entries in the heap whose item was dropped by ``discard``

    def __len__(self) -> int:
        """Entries in the heap, discarded ones not yet dropped included."""
        return len(self._heap)

    def add(self, item: T, delay: float) -> Deadline:
        """Call ``fire(item)`` in ``delay`` seconds (at once if negative) unless the returned
        entry is discarded first."""
        when = asyncio.get_running_loop().time() + max(delay, 0.0)
        entry: Deadline = [when, next(self._seq), item]
        heapq.heappush(self._heap, entry)
        if self._timer is None or when < self._timer_at:
            self._schedule(when)
        return entry

    def discard(self, entry: Deadline) -> None:
        """Forget ``entry`` (not yet fired): its item is dropped now; compact the heap if
        discarded entries now outnumber the others."""
        if entry[2] is None:
            return
        entry[2] = None
        self._discarded += 1
        if self._discarded > SLACK and 2 * self._discarded > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._discarded = 0
            if not self._heap and self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def cancel(self) -> None:
        """Forget every deadline (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self._discarded = 0

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._run)
        self._timer_at = when

    def _run(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        try:
            # ``self._heap``, not a local: ``fire`` may discard other entries and compact it
            while self._heap and self._heap[0][0] <= now:
                entry = heapq.heappop(self._heap)
                item = entry[2]
                if item is None:
                    self._discarded -= 1
                    continue
                entry[2] = None  # fired: a later discard of it is a no-op
                self._fire(item)
        finally:
            if self._heap and self._timer is None:  # (``fire`` may have scheduled one)
                self._schedule(self._heap[0][0])

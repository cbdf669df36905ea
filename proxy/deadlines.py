"""One event-loop timer for many deadlines that rarely come: ``Deadlines`` calls ``fire(item)``
for each item added with a delay once that delay has passed, unless ``live(item)`` says it no
longer matters. The relay schedules each connection's close at its client certificate's expiry
this way: a heap entry is about 80 bytes per connection where a ``TimerHandle`` of its own (the
handle, its bound method and arguments, libuv's timer) held about 500. An item that stops
mattering (its connection closed) is only counted (``discard``); it leaves the heap at its
deadline or when the heap is compacted, once such items outnumber the others (amortised O(1)
per discard, so the heap stays within twice the live items plus ``SLACK``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["SLACK", "Deadlines"]

T = TypeVar("T")

#: Discarded items the heap may hold before a compaction is considered.
SLACK = 64


class Deadlines(Generic[T]):
    """See the module docstring. Runs on the running event loop (``loop.time()`` clock)."""

    __slots__ = ("_discarded", "_fire", "_heap", "_live", "_seq", "_timer", "_timer_at")

    def __init__(self, fire: Callable[[T], None], live: Callable[[T], bool]) -> None:
        self._fire = fire
        self._live = live
        self._heap: list[tuple[float, int, T]] = []  # (loop time, tie-break, item)
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._discarded = 0  # items in the heap that ``live`` rejects, as told by ``discard``

    def __len__(self) -> int:
        """Items in the heap, discarded ones not yet dropped included."""
        return len(self._heap)

    def add(self, item: T, delay: float) -> None:
        """Call ``fire(item)`` in ``delay`` seconds (at once if negative), if still live."""
        when = asyncio.get_running_loop().time() + max(delay, 0.0)
        heapq.heappush(self._heap, (when, next(self._seq), item))
        if self._timer is None or when < self._timer_at:
            self._schedule(when)

    def discard(self) -> None:
        """One item added earlier is no longer live: compact the heap if such items now
        outnumber the live ones."""
        self._discarded += 1
        if self._discarded > SLACK and 2 * self._discarded > len(self._heap):
            live = self._live
            self._heap = [entry for entry in self._heap if live(entry[2])]
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
        heap = self._heap
        now = asyncio.get_running_loop().time()
        due: list[T] = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        live = self._live
        try:
            for item in due:
                if live(item):
                    self._fire(item)
                elif self._discarded:
                    self._discarded -= 1
        finally:
            if self._heap and self._timer is None:  # (``fire`` may have compacted the heap)
                self._schedule(self._heap[0][0])

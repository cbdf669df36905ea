"""The proxy-wide budget of put bodies in flight (``limits.max_buffered_bytes``); pure.

A ``Budget`` counts bytes reserved by put bodies the proxy holds. A put reserves its declared
size at its command line (``acquire``), before its body is read, and gives it back once the
body was handed to the upstream transport or dropped (``release``). When a reservation does
not fit, its holder (an opaque key: the relay's connection) joins a FIFO queue and is paused;
``release`` and ``cancel`` grant queued reservations in arrival order and return the keys they
were granted to, already charged, so a granted holder never competes again for what it was
given. Rules: a reservation is granted when it fits (``used + n <= limit``) and nobody is
queued before it, or when nothing at all is reserved (so a put larger than the whole budget
still progresses, alone); ``used`` therefore never exceeds ``max(limit, largest reservation)``.
Nothing is granted ahead of the queue's head (no starvation of a large put by small ones), and
after every call the head of the queue does not fit (no waiter is left behind while there is
room). Integer arithmetic only; nothing here knows about sockets or the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["Budget"]


class Budget:
    """See the module docstring. ``used``: bytes reserved now; ``peak``: the most ever
    reserved at once; ``pauses``: reservations that had to wait."""

    __slots__ = ("_waiting", "limit", "pauses", "peak", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.pauses = 0
        self._waiting: OrderedDict[Hashable, int] = OrderedDict()

    @property
    def waiting(self) -> int:
        """Reservations queued now."""
        return len(self._waiting)

    def is_waiting(self, key: Hashable) -> bool:
        return key in self._waiting

    def acquire(self, key: Hashable, n: int) -> bool:
        """Reserve ``n`` bytes for ``key``: True when granted now; otherwise ``key`` is queued
        (once; a key already queued is left where it is) and granted later by ``release`` or
        ``cancel``, which return it."""
        used = self.used
        if not self._waiting and (used + n <= self.limit or not used):
            used += n
            self.used = used
            if used > self.peak:
                self.peak = used
            return True
        if key not in self._waiting:
            self._waiting[key] = n
            self.pauses += 1
        return False

    def release(self, n: int) -> list[Hashable]:
        """Give back ``n`` reserved bytes; the keys granted from the queue as a result."""
        used = self.used - n
        if used < 0:
            raise ValueError(f"released {n} bytes with only {self.used} reserved")
        self.used = used
        return self._grant() if self._waiting else []

    def cancel(self, key: Hashable) -> list[Hashable]:
        """Withdraw ``key``'s queued reservation (its holder is gone); the keys granted from
        the queue as a result (the head may have been the one that did not fit)."""
        if self._waiting.pop(key, None) is None:
            return []
        return self._grant() if self._waiting else []

    def _grant(self) -> list[Hashable]:
        granted: list[Hashable] = []
        waiting = self._waiting
        limit = self.limit
        while waiting:
            key, n = next(iter(waiting.items()))
            used = self.used
            if used + n > limit and used:
                break
            del waiting[key]
            used += n
            self.used = used
            if used > self.peak:
                self.peak = used
            granted.append(key)
        return granted

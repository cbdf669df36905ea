"""Connection and handshake counts shared by the workers of ``serve --workers N``.

One ``SharedCounts`` is made by the supervisor before it forks; every worker inherits the same
``MAP_SHARED`` file mapping and the descriptor of its file. The table holds one column per
worker: its client sockets (what counts against ``max_connections``), its pending handshakes
(``max_handshakes``) and, per principal slot, its connections of that principal
(``max_connections_per_principal``). A worker writes only its own column, so a total is the sum
of N cells, and a dead worker's share is reclaimed by zeroing its column (``reclaim``, called
by the supervisor once ``wait`` reported the death, before a replacement starts).

Admission (check the total, then count) runs under an exclusive ``fcntl.lockf`` lock on the
table's file: a POSIX record lock belongs to the process and the kernel releases it when the
process dies, so a worker killed with SIGKILL while holding it cannot wedge the others (a
``multiprocessing.Lock`` would stay taken). Releases need no lock (a worker decrements its own
cell; a reader that sees the old value is only stricter for an instant). This runs once per
connection, never per command.

Principals are found by a 64-bit BLAKE2b digest of their name in ``slots`` hash slots (linear
probing; a slot keeps its key for the life of the table). Two names share a counter only if
their 64-bit digests are equal, or once more than ``slots`` distinct principal names have been
admitted since the proxy started; then the extra names share the slot their hash points at.
Sharing a counter can only make a per-principal limit stricter, never looser.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from typing import Final

__all__ = ["DEFAULT_SLOTS", "SharedCounts"]

#: Principal slots in the shared table (distinct principal names it keeps apart).
DEFAULT_SLOTS: Final = 4096
_CELL: Final = 8  # bytes per signed 64-bit counter


class SharedCounts:
    """The shared table; ``worker`` (set in each worker with ``attach``) names the column this
    process writes. Layout, in signed 64-bit cells: ``connections[W]``, ``handshakes[W]``, then
    per slot ``key`` followed by ``count[W]``."""

    def __init__(self, path: str, workers: int, slots: int = DEFAULT_SLOTS) -> None:
        if workers < 1 or slots < 1:
            raise ValueError("workers and slots must be >= 1")
        self.workers = workers
        self.slots = slots
        self.worker = -1
        size = (2 * workers + slots * (1 + workers)) * _CELL
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._cells = memoryview(self._map).cast("q")
        self._slot_of: dict[str, int] = {}  # this process's cache: principal -> slot

    def attach(self, worker: int) -> None:
        """Called in a worker right after the fork: the column it writes."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range")
        self.worker = worker
        self._slot_of = {}

    # --- totals (no lock: a snapshot that may be an instant old) ----------------------------

    def connections(self) -> int:
        return sum(self._cells[0 : self.workers])

    def handshakes(self) -> int:
        w = self.workers
        return sum(self._cells[w : 2 * w])

    def principal_total(self, name: str) -> int:
        slot = self._find(_key(name), insert=False)
        if slot < 0:
            return 0
        base = self._base(slot) + 1
        return sum(self._cells[base : base + self.workers])

    # --- admission (under the lock) and release (own column, no lock) -----------------------

    def add_connection(self) -> int:
        """Count one more client socket of this worker; the whole proxy's total after it."""
        cells, w = self._cells, self.worker
        self._lock()
        try:
            cells[w] += 1
            return sum(cells[0 : self.workers])
        finally:
            self._unlock()

    def remove_connection(self) -> None:
        self._cells[self.worker] -= 1

    def try_add_handshake(self, limit: int) -> bool:
        """Count one more pending handshake if the whole proxy has fewer than ``limit``."""
        cells, w = self._cells, self.workers
        self._lock()
        try:
            if sum(cells[w : 2 * w]) >= limit:
                return False
            cells[w + self.worker] += 1
            return True
        finally:
            self._unlock()

    def remove_handshake(self) -> None:
        self._cells[self.workers + self.worker] -= 1

    def try_add_principal(self, name: str, cap: int) -> bool:
        """Count one more connection of ``name`` if the whole proxy has fewer than ``cap``."""
        cells = self._cells
        self._lock()
        try:
            slot = self._slot_of.get(name)
            if slot is None:
                slot = self._slot_of[name] = self._find(_key(name), insert=True)
            base = self._base(slot) + 1
            if sum(cells[base : base + self.workers]) >= cap:
                return False
            cells[base + self.worker] += 1
            return True
        finally:
            self._unlock()

    def remove_principal(self, name: str) -> None:
        slot = self._slot_of.get(name)
        if slot is None:
            slot = self._find(_key(name), insert=False)
        if slot >= 0:
            self._cells[self._base(slot) + 1 + self.worker] -= 1

    def reclaim(self, worker: int) -> None:
        """Zero ``worker``'s column: it died, and the kernel closed its sockets. Call only
        once it is reaped and before a replacement runs in its column."""
        cells, w = self._cells, self.workers
        self._lock()
        try:
            cells[worker] = 0
            cells[w + worker] = 0
            for slot in range(self.slots):
                cells[self._base(slot) + 1 + worker] = 0
        finally:
            self._unlock()

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self._fd)

    # --- internals ---------------------------------------------------------------------------

    def _base(self, slot: int) -> int:
        return 2 * self.workers + slot * (1 + self.workers)

    def _find(self, key: int, insert: bool) -> int:
        """The slot holding ``key``; with ``insert`` (under the lock) an empty one is claimed,
        and a full table answers the slot the key hashes to (shared: stricter). -1 when absent
        and not inserting."""
        cells, n = self._cells, self.slots
        start = key % n
        for i in range(n):
            slot = (start + i) % n
            have = cells[self._base(slot)]
            if have == key:
                return slot
            if have == 0:
                if not insert:
                    return -1
                cells[self._base(slot)] = key
                return slot
        return start if insert else -1

    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


def _key(name: str) -> int:
    """A non-zero signed 64-bit key for ``name`` (0 marks an empty slot)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1

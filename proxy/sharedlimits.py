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

Source addresses (``max_handshakes_per_source``) are unbounded, so they get a table of their
own after the principal slots, ``source_slots`` slots of ``key`` and ``count[W]``, in which a
slot does not keep its key: a slot whose total over all workers is 0 may be taken over by
another address (under the lock). An address is looked for in the ``SOURCE_PROBE`` slots from
the one its key points at (the key is a BLAKE2b digest keyed with a secret drawn when the table
is made, so nobody outside can aim addresses at a slot); it takes the first slot of those that
holds its key, else the first one whose total is 0. When none of them is free (a cluster of
addresses that all have handshakes pending), the address is counted in no slot: that worker
alone applies the cap to it (the per-worker rule, so it may have up to N times the cap across
the proxy) until its own count returns to 0. That fallback is the safer one: counting it in
another address's slot instead would let whoever can fill a cluster get other addresses
refused for its own handshakes, while the looser rule only returns to the per-worker cap
addresses that arrive while the table is crowded (``max_handshakes`` still bounds their
pending handshakes); the table is sized so that it rarely is (``source_slots_for``). A probe
stops at a never-used slot: keys are never cleared, so none is stored past one. Each process
remembers the slot of every address it counts (an address with a count of its own keeps its
slot, since a slot with a non-zero total is never taken over), so a release decrements its own
cell, no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from typing import Final

__all__ = [
    "DEFAULT_SLOTS",
    "MIN_SOURCE_SLOTS",
    "SOURCE_PROBE",
    "SharedCounts",
    "source_slots_for",
]

#: Principal slots in the shared table (distinct principal names it keeps apart).
DEFAULT_SLOTS: Final = 4096
#: Source slots for each handshake the whole proxy may have pending (``source_slots_for``).
SOURCE_SLOTS_PER_HANDSHAKE: Final = 4
#: The fewest source slots a table has.
MIN_SOURCE_SLOTS: Final = 1024
#: Source slots an address may use: the one its key points at and the next ones.
SOURCE_PROBE: Final = 16
_CELL: Final = 8  # bytes per signed 64-bit counter


def source_slots_for(handshake_limit: int) -> int:
    """Source slots for a proxy allowing ``handshake_limit`` pending handshakes: a table at
    most a quarter full of pending handshakes (each from a different address at worst)."""
    return max(MIN_SOURCE_SLOTS, SOURCE_SLOTS_PER_HANDSHAKE * handshake_limit)


class SharedCounts:
    """The shared table; ``worker`` (set in each worker with ``attach``) names the column this
    process writes. Layout, in signed 64-bit cells: ``connections[W]``, ``handshakes[W]``, then
    per principal slot ``key`` followed by ``count[W]``, then the same per source slot."""

    def __init__(
        self,
        path: str,
        workers: int,
        slots: int = DEFAULT_SLOTS,
        source_slots: int = MIN_SOURCE_SLOTS,
    ) -> None:
        if workers < 1 or slots < 1 or source_slots < 1:
            raise ValueError("workers and slots must be >= 1")
        self.workers = workers
        self.slots = slots
        self.source_slots = source_slots
        self.worker = -1
        self._sources_at = 2 * workers + slots * (1 + workers)  # first cell of the source table
        size = (self._sources_at + source_slots * (1 + workers)) * _CELL
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._cells = memoryview(self._map).cast("q")
        self._slot_of: dict[str, int] = {}  # this process's cache: principal -> slot
        # Digest key of source addresses, the same in every worker (drawn before the fork).
        self._secret = os.urandom(16)
        # The sources this worker counts: address -> [first cell of its slot (-1: counted in no
        # slot, by this worker alone), this worker's count of it]. One dict per column, so that
        # tests can play several workers in one process; a forked worker inherits empty ones
        # (the supervisor counts nothing).
        self._mines: dict[int, dict[str, list[int]]] = {}
        self._mine: dict[str, list[int]] = {}

    def attach(self, worker: int) -> None:
        """Called in a worker right after the fork: the column it writes."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range")
        self.worker = worker
        self._slot_of = {}
        self._mine = self._mines.setdefault(worker, {})

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

    def source_total(self, source: str) -> int:
        """Pending handshakes of ``source`` in its slot, over all workers (0 when it has none;
        a source counted in no slot is not in it)."""
        base = self._source_slot(self._source_key(source), take=False)
        return 0 if base < 0 else sum(self._cells[base + 1 : base + 1 + self.workers])

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

    def try_add_source(self, source: str, cap: int | None) -> bool:
        """Count one more pending handshake of ``source`` (an IP address) if the whole proxy
        has fewer than ``cap`` (``None``: no cap, counted all the same, so that a later cap
        sees them); when no slot is free for it, if this worker alone has fewer."""
        mine = self._mine.get(source)
        if mine is not None and mine[0] < 0:  # counted in no slot: this worker's own rule
            if cap is not None and mine[1] >= cap:
                return False
            mine[1] += 1
            return True
        cells, w = self._cells, self.workers
        self._lock()
        try:
            if mine is not None:
                base = mine[0]
            else:
                base = self._source_slot(self._source_key(source), take=True)
                if base < 0:  # no free slot near its key: this worker alone counts it
                    self._mine[source] = [-1, 1]
                    return True
            if cap is not None and sum(cells[base + 1 : base + 1 + w]) >= cap:
                return False
            cells[base + 1 + self.worker] += 1
        finally:
            self._unlock()
        if mine is None:
            self._mine[source] = [base, 1]
        else:
            mine[1] += 1
        return True

    def add_source(self, source: str) -> None:
        """Count one more socket of ``source`` without a cap: one this worker already counts
        passes from pending handshake to lingering refused socket (the caller releases the
        pending one after this). No lock when it does: its slot is its own while it counts."""
        mine = self._mine.get(source)
        if mine is None:
            self.try_add_source(source, None)
            return
        if mine[0] >= 0:
            self._cells[mine[0] + 1 + self.worker] += 1
        mine[1] += 1

    def remove_source(self, source: str) -> None:
        """Release one socket of ``source`` counted by this worker."""
        mine = self._mine.get(source)
        if mine is None:
            return
        if mine[0] >= 0:
            self._cells[mine[0] + 1 + self.worker] -= 1
        mine[1] -= 1
        if mine[1] <= 0:
            del self._mine[source]

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
            stride, first = 1 + w, self._sources_at
            for base in range(first, first + self.source_slots * stride, stride):
                cells[base + 1 + worker] = 0
        finally:
            self._unlock()
        self._mines.pop(worker, None)
        if worker == self.worker:
            self._mine = self._mines.setdefault(worker, {})

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

    def _source_key(self, source: str) -> int:
        digest = hashlib.blake2b(
            source.encode("utf-8", "surrogatepass"), digest_size=8, key=self._secret
        ).digest()
        return int.from_bytes(digest, "little", signed=True) or 1

    def _source_slot(self, key: int, take: bool) -> int:
        """The first cell of the source slot holding ``key`` among the ``SOURCE_PROBE`` slots
        from the one it points at; with ``take`` (under the lock), else the first of them whose
        total is 0, given ``key``. -1 when there is none."""
        cells, n, w = self._cells, self.source_slots, self.workers
        start, stride = key % n, 1 + w
        free = -1
        for i in range(min(SOURCE_PROBE, n)):
            base = self._sources_at + (start + i) % n * stride
            have = cells[base]
            if have == key:
                return base
            if have == 0:  # never used: a key is never stored past one (keys stay non-zero)
                if take and free < 0:
                    free = base
                break
            if take and free < 0 and not any(cells[base + 1 : base + stride]):
                free = base
        if free >= 0:
            cells[free] = key
        return free

    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


def _key(name: str) -> int:
    """A non-zero signed 64-bit key for ``name`` (0 marks an empty slot)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1

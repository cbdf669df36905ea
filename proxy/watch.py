"""Reload files when they change on disk, and only once they have stopped changing.

A watched file's state is its ``stat()`` (following symlinks, so Kubernetes' atomic ``..data``
symlink swap is a change) and the SHA-256 of its content. ``Settle`` is the pure decision, driven
by the caller's clock: a snapshot that differs from the last settled one is reported only once it
has been observed again, identical, at least ``settle`` seconds after it was first seen, so a file
rewritten in place in several writes is not loaded half-written (unless the writer pauses longer
than the settle period: tools should replace files atomically). ``Kinds`` groups the files (the
ACL, the TLS material) and remembers the content each group was last loaded from, so a group is
reloaded only when its own content changed, and a SIGHUP and the watcher seeing the same edit
count it once. ``watch`` is the thin asyncio loop: read every interval (in a thread), feed
``Settle``, call back with what settled.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["FileState", "Kinds", "Settle", "Snapshot", "changed_paths", "snapshot", "watch"]


@dataclass(frozen=True, slots=True)
class FileState:
    """One file as seen at one poll; ``None`` fields: missing (stat) or unreadable (digest)."""

    stat: tuple[int, int, int, int] | None  # st_dev, st_ino, st_size, st_mtime_ns
    digest: bytes | None  # SHA-256 of the content


#: Path -> state, for every watched path.
Snapshot = Mapping[str, FileState]


def file_state(path: str) -> FileState:
    """stat() and content hash of ``path``, following symlinks; never raises for I/O errors."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = hashlib.file_digest(f, "sha256").digest()
    except OSError:
        try:
            st = os.stat(path)
        except OSError:
            return FileState(None, None)
        digest = None
    return FileState((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), digest)


def snapshot(paths: Iterable[str]) -> dict[str, FileState]:
    return {path: file_state(path) for path in paths}


def changed_paths(old: Snapshot, new: Snapshot) -> list[str]:
    """Paths whose content differs between two snapshots (a touch is not a change)."""
    return [p for p, s in new.items() if (old.get(p) or FileState(None, None)).digest != s.digest]


class Settle:
    """Decides when a changed snapshot has settled (pure: the caller supplies time and state)."""

    def __init__(self, current: Snapshot, settle: float) -> None:
        self.current = current  # the last settled snapshot
        self.settle = settle
        self._pending: Snapshot | None = None
        self._since = 0.0

    def observe(self, now: float, snap: Snapshot) -> Snapshot | None:
        """Feed one poll; returns ``snap`` when it is a settled change, else None."""
        if snap == self.current:
            self._pending = None  # changed and changed back: nothing to do
            return None
        if snap != self._pending:
            self._pending, self._since = snap, now  # (still) changing: start over
            return None
        if now - self._since < self.settle:
            return None
        self.current, self._pending = snap, None
        return snap


class Kinds:
    """Files grouped by kind, and the content each kind was last (re)loaded from."""

    def __init__(self, groups: Mapping[str, Sequence[str]], loaded: Snapshot | None = None):
        self.groups = {kind: tuple(paths) for kind, paths in groups.items()}
        self._loaded: dict[str, tuple[bytes | None, ...] | None] = dict.fromkeys(self.groups)
        if loaded is not None:
            for kind in self.groups:
                self._loaded[kind] = self._digests(kind, loaded)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(p for paths in self.groups.values() for p in paths))

    def _digests(self, kind: str, snap: Snapshot) -> tuple[bytes | None, ...]:
        missing = FileState(None, None)
        return tuple((snap.get(p) or missing).digest for p in self.groups[kind])

    def changed(self, snap: Snapshot) -> list[str]:
        """Kinds whose content in ``snap`` differs from what they were last loaded from."""
        return [k for k in self.groups if self._digests(k, snap) != self._loaded[k]]

    def attempt(self, kind: str) -> bool:
        """Record that ``kind`` is being loaded from its files as they are now; True when
        their content differs from the previous attempt (a real change, to be counted)."""
        now = self._digests(kind, snapshot(self.groups[kind]))
        real = now != self._loaded[kind]
        self._loaded[kind] = now
        return real


async def watch(
    paths: Sequence[str],
    interval: float,
    baseline: Snapshot,
    on_change: Callable[[Snapshot, Snapshot], None],
    *,
    settle: float | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll ``paths`` every ``interval`` seconds; call ``on_change(old, new)`` with the
    previous and the new settled snapshot once a change has held for ``settle`` seconds.
    ``baseline`` is the state taken before the files were first loaded, so a change made
    during start-up is not missed. By default a change must be seen identical at the next
    poll, ``interval`` seconds later (a timer may fire a hair early, so the default is not a
    clock comparison)."""
    settler = Settle(baseline, 0.0 if settle is None else settle)
    while True:
        await sleep(interval)
        snap = await asyncio.to_thread(snapshot, paths)
        old = settler.current
        if settler.observe(clock(), snap) is not None:
            on_change(old, snap)

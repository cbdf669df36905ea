"""A keyed window counter that turns bursts of log lines into summaries (pure, no I/O).

Pure and synchronous (no asyncio, no logging; the caller passes the clock in, so it is tested
with plain numbers). Per key (a connection for denials, a source address for refusals and
failed handshakes), ``WindowCounter.hit(key, kind, now)`` says whether one event should get its
own log line: the first ``burst`` events of each window of ``window`` seconds do, the rest are
only counted, by ``kind`` (the command name, the failure reason). A window starts at the first
event of a key and lasts ``window`` seconds; its suppressed count is reported once, as a
``Suppressed`` summary the caller logs as a single "N more ... suppressed" line: by
``expired(now)`` after the window ended (call it at ``deadline()``), by ``pop(key)`` when the
key goes away (a closing connection), or by the next ``hit`` of the key after the window ended
(kept for the next ``expired``). Memory is bounded: at most ``max_keys`` keys (plus
``OVERFLOW``) are tracked; when the table is full, ended windows are dropped first and, if that
frees nothing, the event is counted under the shared key ``OVERFLOW``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

__all__ = ["AUDIT_BURST", "AUDIT_WINDOW", "OVERFLOW", "Suppressed", "WindowCounter"]

#: Denial lines logged per connection and window before the rest are summarised.
AUDIT_BURST: Final = 20
#: The window, in seconds.
AUDIT_WINDOW: Final = 1.0
#: The key events are counted under when the table of keys is full.
OVERFLOW: Final = "_other"


@dataclass(frozen=True, slots=True)
class Suppressed:
    """What a window did not log: ``total`` events of ``key`` between ``start`` and ``end``
    (the caller's clock; ``end`` is when the window was closed), counted by kind."""

    key: Hashable
    start: float
    end: float
    total: int
    by_kind: dict[str, int]


class _Window:
    __slots__ = ("by_kind", "passed", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.passed = 0
        self.suppressed = 0
        self.by_kind: dict[str, int] | None = None


class WindowCounter:
    """See the module docstring. ``burst`` >= 0 events per key and window are let through."""

    __slots__ = ("_ready", "_windows", "burst", "max_keys", "window")

    def __init__(
        self, burst: int = AUDIT_BURST, window: float = AUDIT_WINDOW, max_keys: int = 65536
    ) -> None:
        if burst < 0 or window <= 0 or max_keys < 1:
            raise ValueError("burst must be >= 0, window > 0 and max_keys >= 1")
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        # In window-start order: a restarted window is moved to the end.
        self._windows: dict[Hashable, _Window] = {}
        self._ready: list[Suppressed] = []  # ended windows noticed by ``hit`` or a full table

    def __len__(self) -> int:
        """Keys with an open window (bounded by ``max_keys`` + 1)."""
        return len(self._windows)

    def hit(self, key: Hashable, kind: str, now: float) -> bool:
        """Count one event of ``key``; True when it should be logged on its own line."""
        windows = self._windows
        w = windows.get(key)
        if w is not None and w.start + self.window <= now:
            del windows[key]
            self._close(key, w, now)
            w = None
        if w is None:
            if len(windows) >= self.max_keys:
                self._ready.extend(self._expire(now))
                if len(windows) >= self.max_keys and key != OVERFLOW:
                    return self.hit(OVERFLOW, kind, now)
            w = windows[key] = _Window(now)
        if w.passed < self.burst:
            w.passed += 1
            return True
        w.suppressed += 1
        by_kind = w.by_kind
        if by_kind is None:
            by_kind = w.by_kind = {}
        by_kind[kind] = by_kind.get(kind, 0) + 1
        return False

    def suppressed(self, key: Hashable) -> int:
        """Events of ``key`` suppressed so far in its current window."""
        w = self._windows.get(key)
        return 0 if w is None else w.suppressed

    def deadline(self) -> float | None:
        """When the earliest window with suppressed events ends (or one noticed by ``hit``
        is waiting: now-ish, its end), or None when nothing is suppressed."""
        if self._ready:
            return self._ready[0].end
        for w in self._windows.values():
            if w.suppressed:
                return w.start + self.window
        return None

    def expired(self, now: float) -> list[Suppressed]:
        """Close every window that has ended by ``now``; the summaries of those that
        suppressed something (each once, oldest first). Keys whose window closed are
        forgotten."""
        out, self._ready = self._ready, []
        out.extend(self._expire(now))
        return out

    def pop(self, key: Hashable, now: float) -> Suppressed | None:
        """Forget ``key`` (it went away); the summary of its open window if it suppressed
        something."""
        w = self._windows.pop(key, None)
        if w is None or not w.suppressed:
            return None
        return self._summary(key, w, now)

    def _expire(self, now: float) -> list[Suppressed]:
        out: list[Suppressed] = []
        windows = self._windows
        while windows:
            key, w = next(iter(windows.items()))
            if w.start + self.window > now:
                break
            del windows[key]
            if w.suppressed:
                out.append(self._summary(key, w, now))
        return out

    def _close(self, key: Hashable, w: _Window, now: float) -> None:
        if w.suppressed:
            self._ready.append(self._summary(key, w, now))

    def _summary(self, key: Hashable, w: _Window, now: float) -> Suppressed:
        end = min(now, w.start + self.window)
        return Suppressed(key, w.start, end, w.suppressed, dict(w.by_kind or {}))

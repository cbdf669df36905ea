"""A keyed window counter that turns bursts of log lines into summaries (pure, no I/O).

``KeyedWindowCounter`` lets through at most ``limit`` events per key (a source address, a
connection) in each window of ``window`` seconds, and counts the rest by label (a reason, a
command). Once a window with suppressed events has ended, ``due`` hands back one
``Suppressed`` record for it, which the caller logs as a single "N more ... suppressed" line.
The clock is passed in (``now``), so the class has no asyncio and no time source of its own and
is tested with plain numbers. Memory is bounded: at most ``max_keys`` keys (plus the overflow
key) are tracked; when the table is full, ended windows are dropped first and, if that frees
nothing, the new event is counted under the shared key ``OVERFLOW_KEY``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OVERFLOW_KEY", "KeyedWindowCounter", "Suppressed"]

#: The key events are counted under when the table of keys is full.
OVERFLOW_KEY = "_other"


@dataclass(slots=True)
class Suppressed:
    """The events of one key that were not let through in one window."""

    key: str
    start: float  # when the window began (the caller's clock)
    count: int
    by_label: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Window:
    start: float
    passed: int = 0
    suppressed: Suppressed | None = None


class KeyedWindowCounter:
    """At most ``limit`` events per key per ``window`` seconds; the rest counted by label."""

    __slots__ = ("_ended", "_windows", "limit", "max_keys", "window")

    def __init__(self, limit: int, window: float, max_keys: int = 10_000) -> None:
        if limit < 0 or window <= 0 or max_keys < 1:
            raise ValueError("limit must be >= 0, window > 0 and max_keys >= 1")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}
        self._ended: list[Suppressed] = []  # ended windows with suppressed events, not yet due

    def admit(self, key: str, label: str, now: float) -> bool:
        """Count one event; True if it may be logged, False if it was counted as suppressed."""
        w = self._windows.get(key)
        if w is not None and now - w.start >= self.window:
            self._end(key, w)
            w = None
        if w is None:
            if len(self._windows) >= self.max_keys:
                self._expire(now)
                if len(self._windows) >= self.max_keys and key != OVERFLOW_KEY:
                    return self.admit(OVERFLOW_KEY, label, now)
            w = self._windows[key] = _Window(now)
        if w.passed < self.limit:
            w.passed += 1
            return True
        s = w.suppressed
        if s is None:
            s = w.suppressed = Suppressed(key, w.start, 0)
        s.count += 1
        s.by_label[label] = s.by_label.get(label, 0) + 1
        return False

    def due(self, now: float) -> list[Suppressed]:
        """The suppressed counts of every window that has ended by ``now`` (each once)."""
        self._expire(now)
        out, self._ended = self._ended, []
        return out

    def pending(self) -> bool:
        """Is any suppressed count waiting to be reported (now or when its window ends)?"""
        return bool(self._ended) or any(w.suppressed for w in self._windows.values())

    def __len__(self) -> int:
        """Keys tracked now (bounded by ``max_keys``)."""
        return len(self._windows)

    def _expire(self, now: float) -> None:
        ended = [k for k, w in self._windows.items() if now - w.start >= self.window]
        for key in ended:
            self._end(key, self._windows[key])

    def _end(self, key: str, w: _Window) -> None:
        del self._windows[key]
        if w.suppressed is not None:
            self._ended.append(w.suppressed)

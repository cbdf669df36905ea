"""A token bucket for the optional per-principal command rate, pure and clock-free.

``TokenBucket(rate, burst, now)`` starts full with ``burst`` tokens and refills ``rate``
tokens per second up to ``burst``; ``take(now)`` refills for the time elapsed since the last
call and spends one token if there is one. The caller passes the time (the relay passes
``time.monotonic()``, tests pass explicit values), so the module reads no clock and imports no
asyncio, socket, ssl, click, yaml or time. A clock that goes backwards refills nothing. One
bucket is shared by every connection of a principal in one proxy process; with ``serve
--workers N`` each worker's bucket holds ``worker_share`` of the ACL's rate and burst.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["TokenBucket", "worker_share"]

#: Slack for floating-point drift, so a token that is due after many small refills is given.
_EPSILON: Final = 1e-9


class TokenBucket:
    """``rate`` tokens per second (> 0), at most ``burst`` (>= 1) saved up; starts full."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.rate}/s burst {self.burst}: {self._tokens:.3f} tokens>"

    def take(self, now: float) -> bool:
        """Refill for the time since the last call, then spend one token if one is there."""
        elapsed = now - self._last
        if elapsed > 0:
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else float(self.burst)
            self._last = now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens -= 1.0
            return True
        return False


def worker_share(rate: tuple[float, int], workers: int) -> tuple[float, int]:
    """One worker's part of a whole-proxy (rate, burst) shared by ``workers`` processes:
    rate / N, and burst / N rounded down but at least 1 (a bucket needs one token). The sum
    over the workers is the configured rate, and the configured burst or N, whichever is
    larger; a principal whose connections all land on one worker gets 1/N of both."""
    per_second, burst = rate
    if workers <= 1:
        return per_second, burst
    return per_second / workers, max(1, burst // workers)

"""Where the shadow policy's findings go: metrics and a rate-limited ``shadow_mismatch`` log.

``ShadowReporter`` is the ``ShadowSink`` of every session's ``ShadowView`` (proxy/shadow.py):
each mismatch and each ``unknown`` is counted in ``beanstalk_proxy_shadow_mismatch_total`` /
``beanstalk_proxy_shadow_unknown_total`` (principal labels capped, see ``Metrics.shadow_label``),
and the first ``LOG_BURST`` mismatches per principal and ``LOG_WINDOW`` seconds are logged as
one structured ``shadow_mismatch`` event each, with both deciding rules; the rest of a window
is summarised in one ``shadow_mismatch_suppressed`` line (``proxy.logsummary.WindowCounter``).
It also counts certificates the shadow maps to another principal or to none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from proxy.logs import event
from proxy.logsummary import WindowCounter
from proxy.metrics import Metrics
from proxy.shadow import Mismatch

log = logging.getLogger("beanstalk_proxy.audit")

#: ``shadow_mismatch`` lines per principal and window; the rest is summarised.
LOG_BURST: Final = 10
LOG_WINDOW: Final = 10.0


class ShadowReporter:
    """See the module docstring. ``clock`` is ``time.monotonic`` (tests pass their own)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.window = WindowCounter(LOG_BURST, LOG_WINDOW, max_keys=1024)
        self._clock = clock

    def mismatch(self, record: Mismatch) -> None:
        m = self.metrics
        m.shadow_mismatches.labels(
            m.shadow_label(record.principal), record.command, record.enforced, record.shadow
        ).inc()
        now = self._clock()
        self._report_suppressed(now)
        if self.window.hit(record.principal, record.command, now):
            log.info(
                "shadow ACL decides otherwise",
                extra=event(
                    "shadow_mismatch",
                    principal=record.principal,
                    shadow_principal=record.shadow_principal,
                    command=record.command,
                    tube=record.tube,
                    job=record.job,
                    enforced=record.enforced,
                    enforced_rule=record.enforced_rule,
                    shadow=record.shadow,
                    shadow_rule=record.shadow_rule,
                ),
            )

    def unknown(self, principal: str, command: str) -> None:
        m = self.metrics
        m.shadow_unknown.labels(m.shadow_label(principal), command).inc()

    def principal_differs(self, principal: str, shadow_principal: str | None) -> None:
        """A connection's certificate maps to ``shadow_principal`` under the shadow."""
        m = self.metrics
        m.shadow_principal_mismatches.labels(
            m.shadow_label(principal), m.shadow_label(shadow_principal)
        ).inc()

    def _report_suppressed(self, now: float) -> None:
        """Log the summaries of windows that ended (checked on the next mismatch: a quiet
        shadow logs nothing more, and its counters already hold the totals)."""
        deadline = self.window.deadline()
        if deadline is None or deadline > now:
            return
        for summary in self.window.expired(now):
            log.info(
                "shadow mismatches suppressed",
                extra=event(
                    "shadow_mismatch_suppressed",
                    principal=summary.key,
                    suppressed=summary.total,
                    by_command=summary.by_kind,
                    seconds=round(summary.end - summary.start, 3),
                ),
            )

"""Prometheus metrics, kept off the per-command hot path.

Per-command figures (commands by name and decision, rate-limited commands by principal, bytes
each way) are plain integers that each ``Session``/``Connection`` already keeps; a custom
collector adds them up at scrape time (live connections plus the totals of closed ones), so
relaying a command costs no metric call at all. Per-connection and rare events (accepts,
handshake failures, denials, upstream failures, reloads) use ordinary ``prometheus_client``
counters; two gauges per reload kind show whether the files on disk last loaded. Command
latency is sampled: one burst of commands in 16 per connection is timed (for a request-reply
client a burst is one command), which bounds the cost. Label values chosen by
clients (tube names in denials) are capped so a hostile client cannot grow the series count
without bound; principal labels come from the ACL. The registry also carries the standard
``process_*`` and ``python_*`` collectors and ``beanstalk_proxy_build_info``; counters export
no ``_created`` series (switched off process-wide when this module is imported).
"""

from __future__ import annotations

import asyncio
import os
import platform
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.protocol import NAMES

if TYPE_CHECKING:
    from proxy.budget import Budget
    from proxy.relay import Connection
    from proxy.session import Session

#: Distinct tube label values kept for denials before new ones are folded into "_other".
MAX_TUBE_LABELS = 500
#: Distinct principal label values kept for the shadow policy's counters (principals of two
#: ACLs) before new ones are folded into "_other".
MAX_SHADOW_PRINCIPAL_LABELS = 200

# ``<counter>_created`` doubles the series count and no dashboard of ours reads it. The switch
# is process-wide in prometheus_client; it must be set before the first Counter is made.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """All metrics of one proxy process, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_total = Counter(
            "beanstalk_proxy_connections", "Client connections accepted (TCP)", registry=r
        )
        self.handshake_failures = Counter(
            "beanstalk_proxy_handshake_failures",
            "Client connections refused before the relay started, by reason",
            ["reason"],
            registry=r,
        )
        self.denials = Counter(
            "beanstalk_proxy_denials",
            "Commands denied by the ACL, by principal, tube and command",
            ["principal", "tube", "command"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "beanstalk_proxy_upstream_connect_failures",
            "Upstream (beanstalkd) connections that could not be opened",
            registry=r,
        )
        self.upstream_lost = Counter(
            "beanstalk_proxy_upstream_lost",
            "Upstream connections that ended while the client was still active",
            registry=r,
        )
        self.reloads = Counter(
            "beanstalk_proxy_reloads",
            "Reloads of the ACL or the TLS material, by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.last_reload_ok = Gauge(
            "beanstalk_proxy_config_last_reload_successful",
            "1 if the last load of this kind of file (acl, tls) succeeded, 0 if the files on "
            "disk could not be loaded (the previous ones stay in force)",
            ["kind"],
            registry=r,
        )
        self.last_reload_ok_time = Gauge(
            "beanstalk_proxy_config_last_reload_success_timestamp_seconds",
            "When this kind of file (acl, tls) was last loaded successfully (unix time)",
            ["kind"],
            registry=r,
        )
        self.cert_expiry = Gauge(
            "beanstalk_proxy_certificate_expiry_timestamp_seconds",
            "notAfter of the certificates the proxy loaded (unix time)",
            ["cert"],
            registry=r,
        )
        self.latency = Histogram(
            "beanstalk_proxy_command_latency_seconds",
            "Time from forwarding a burst of commands until all their replies arrived "
            "(one burst in 16 is timed per connection; a burst is one command for request-reply "
            "clients)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30),
            registry=r,
        )
        self.started = time.time()  # this process's (a worker's own, not its supervisor's)
        self.shadow_mismatches = Counter(
            "beanstalk_proxy_shadow_mismatch",
            "Commands the shadow ACL (acl_shadow) decided otherwise than the enforced ACL, by "
            "principal, command and both outcomes (allow, deny, filtered, refused)",
            ["principal", "command", "enforced", "shadow"],
            registry=r,
        )
        self.shadow_unknown = Counter(
            "beanstalk_proxy_shadow_unknown",
            "Commands the shadow ACL could not decide without a lookup the enforced ACL did "
            "not make (the job's tube), by principal and command",
            ["principal", "command"],
            registry=r,
        )
        self.shadow_principal_mismatches = Counter(
            "beanstalk_proxy_shadow_principal_mismatch",
            "Connections whose certificate the shadow ACL maps to another principal "
            '(shadow_principal="-": to none, the shadow would refuse it)',
            ["principal", "shadow_principal"],
            registry=r,
        )
        self._shadow_principals: set[str] = set()
        self._live: Iterable[Connection] = ()
        self._client_sockets: Callable[[], int] = lambda: 0
        self._handshakes: Callable[[], int] = lambda: 0
        self._budget: Budget | None = None
        self._closed_commands = [0] * len(NAMES)
        self._closed_denied = [0] * len(NAMES)
        self._closed_bytes = {"in": 0, "out": 0}
        self._closed_rate_limited: dict[str, int] = {}  # principal -> count (ACL-bounded)
        self._tubes: set[str] = set()
        r.register(_LiveCollector(self))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, _open_fds, _resident_memory...
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        r.register(_BuildInfoCollector())

    def track(self, live: Iterable[Connection]) -> None:
        """Where to find the live connections at scrape time."""
        self._live = live

    def track_sockets(
        self, client_sockets: Callable[[], int], handshakes: Callable[[], int]
    ) -> None:
        """How to count, at scrape time, the client sockets past the handshake (relayed,
        refused or closing) and the handshakes in progress."""
        self._client_sockets = client_sockets
        self._handshakes = handshakes

    def track_budget(self, budget: Budget) -> None:
        """The budget of put bodies in flight, read at scrape time."""
        self._budget = budget

    def connection_closed(self, conn: Connection) -> None:
        """Fold a closed connection's counters into the totals."""
        self._closed_bytes["in"] += conn.bytes_in
        self._closed_bytes["out"] += conn.bytes_out
        session = conn.session
        if session is not None:
            for i, n in enumerate(session.op_counts):
                self._closed_commands[i] += n
            for i, n in enumerate(session.denied_counts):
                self._closed_denied[i] += n
            self._fold_rate_limited(session.principal, session.rate_limited)

    def principal_changed(self, old: str, session: Session) -> None:
        """A reload re-mapped a live session away from principal ``old``: keep what it counted
        so far under ``old`` (counters never move between label values)."""
        self._fold_rate_limited(old, session.take_rate_limited())

    def _fold_rate_limited(self, principal: str, n: int) -> None:
        if n:
            closed = self._closed_rate_limited
            closed[principal] = closed.get(principal, 0) + n

    def denied(self, principal: str, tube: str | None, command: str) -> None:
        label = tube or "-"
        if label not in self._tubes:
            if len(self._tubes) >= MAX_TUBE_LABELS:
                label = "_other"
            else:
                self._tubes.add(label)
        self.denials.labels(principal, label, command).inc()

    def shadow_label(self, principal: str | None) -> str:
        """A bounded label value for a principal of the enforced or the shadow ACL."""
        if principal is None:
            return "-"
        labels = self._shadow_principals
        if principal not in labels:
            if len(labels) >= MAX_SHADOW_PRINCIPAL_LABELS:
                return "_other"
            labels.add(principal)
        return principal

    def reload_result(self, kind: str, ok: bool, counted: bool) -> None:
        """A load of ``kind`` ended; ``counted``: its files' content had changed since the
        previous load (only real changes count in ``reloads_total``)."""
        if counted:
            self.reloads.labels(kind, "success" if ok else "failure").inc()
        self.last_reload_ok.labels(kind).set(1 if ok else 0)
        if ok:
            self.last_reload_ok_time.labels(kind).set(time.time())

    def set_expiry(self, cert: str, not_after_unix: float) -> None:
        self.cert_expiry.labels(cert).set(not_after_unix)

    def totals(self) -> tuple[list[int], list[int], dict[str, int], int]:
        commands = list(self._closed_commands)
        denied = list(self._closed_denied)
        nbytes = dict(self._closed_bytes)
        live = 0
        for conn in list(self._live):
            live += 1
            nbytes["in"] += conn.bytes_in
            nbytes["out"] += conn.bytes_out
            session = conn.session
            if session is not None:
                for i, n in enumerate(session.op_counts):
                    commands[i] += n
                for i, n in enumerate(session.denied_counts):
                    denied[i] += n
        return commands, denied, nbytes, live

    def rate_limited_totals(self) -> dict[str, int]:
        """Commands answered ``RATE_LIMITED``, by principal (closed plus live sessions)."""
        out = dict(self._closed_rate_limited)
        for conn in list(self._live):
            session = conn.session
            if session is not None and session.rate_limited:
                out[session.principal] = out.get(session.principal, 0) + session.rate_limited
        return out


class _LiveCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        commands, denied, nbytes, live = self.metrics.totals()
        fam = CounterMetricFamily(
            "beanstalk_proxy_commands",
            "Client commands parsed, by command and decision (allowed includes commands the "
            "proxy answered itself with a protocol error; rate-limited commands are counted in "
            "beanstalk_proxy_rate_limited_total instead)",
            labels=["command", "decision"],
        )
        for i, name in enumerate(NAMES):
            if commands[i] or denied[i]:
                fam.add_metric([name, "allowed"], commands[i] - denied[i])
                fam.add_metric([name, "denied"], denied[i])
        yield fam
        fam = CounterMetricFamily(
            "beanstalk_proxy_rate_limited",
            "Client commands answered RATE_LIMITED (not run) by the ACL's per-principal rate, "
            "by principal",
            labels=["principal"],
        )
        for principal, n in sorted(self.metrics.rate_limited_totals().items()):
            fam.add_metric([principal], n)
        yield fam
        fam = CounterMetricFamily(
            "beanstalk_proxy_bytes", "Bytes relayed, by direction", labels=["direction"]
        )
        fam.add_metric(["client_to_proxy"], nbytes["in"])
        fam.add_metric(["proxy_to_client"], nbytes["out"])
        yield fam
        yield GaugeMetricFamily(
            "beanstalk_proxy_connections_open", "Relayed connections open now", value=live
        )
        yield GaugeMetricFamily(
            "beanstalk_proxy_client_sockets",
            "Client sockets past the TLS handshake and not yet closed (relayed, refused or "
            "closing): what counts against limits.max_connections",
            value=self.metrics._client_sockets(),
        )
        yield GaugeMetricFamily(
            "beanstalk_proxy_handshakes_pending",
            "Client connections in the TLS handshake, and refused ones whose socket is still "
            "open after the alert (limited by limits.max_handshakes)",
            value=self.metrics._handshakes(),
        )
        budget = self.metrics._budget
        if budget is not None:
            yield GaugeMetricFamily(
                "beanstalk_proxy_buffered_bytes",
                "Bytes of put bodies in flight reserved now (received or being received, not yet "
                "handed to beanstalkd's connection), bounded by limits.max_buffered_bytes",
                value=budget.used,
            )
            yield CounterMetricFamily(
                "beanstalk_proxy_buffered_pauses",
                "Puts that waited (their client not read) because limits.max_buffered_bytes "
                "was reached",
                value=budget.pauses,
            )
        fds = _open_fds()
        if fds >= 0:
            yield GaugeMetricFamily(
                "beanstalk_proxy_open_fds",
                "File descriptors the process holds now",
                value=fds,
            )
        yield GaugeMetricFamily(
            "beanstalk_proxy_start_time_seconds",
            "Process start (unix time)",
            value=self.metrics.started,
        )


class _BuildInfoCollector(Collector):
    """``beanstalk_proxy_build_info``: 1, with what this process runs on as labels. The loop
    label is read from the running loop at scrape time (the status listener runs on it)."""

    def __init__(self) -> None:
        self.loop = _loop_name()

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        self.loop = _loop_name() or self.loop
        g = GaugeMetricFamily(
            "beanstalk_proxy_build_info",
            "Always 1; the labels say which version runs on which Python, OpenSSL and event loop",
            labels=["version", "python", "openssl", "loop"],
        )
        g.add_metric(
            [__version__, platform.python_version(), _OPENSSL, self.loop or "unknown"],
            1,
        )
        yield g


def _loop_name() -> str:
    """ "uvloop" or "asyncio": the event loop running in this thread ("" when none runs)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return ""
    return "uvloop" if type(loop).__module__.split(".", 1)[0] == "uvloop" else "asyncio"


_OPENSSL = " ".join(ssl.OPENSSL_VERSION.split()[:2])  # "OpenSSL 3.0.13", without the date


def _open_fds() -> int:
    """File descriptors this process holds now (Linux; -1 where /proc is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1

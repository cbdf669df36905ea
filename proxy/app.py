"""The application lifecycle of ``serve`` and ``client``: the event loop, the signals, the
proxy's listeners and file watcher, and, with ``--workers N``, the fork supervisor's workers
and the status aggregator.

``serve`` runs one proxy process until SIGTERM/SIGINT (SIGHUP reloads, ``proxy.reloading``);
``serve_workers`` hands N of them and the aggregator to ``proxy.workers.supervise``;
``run_client`` runs the producer-side tunnel. ``stop_signals`` is the signal set-up they
share. The command line (``proxy.cli``) loads the files and calls these.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from functools import partial
from typing import Any

from proxy.acl import Policy
from proxy.aggregate import AggregateStatus
from proxy.config import Config, Endpoint
from proxy.errors import ConfigError
from proxy.httpd import StatusServer
from proxy.loading import describe_config_error, load_acl, load_server_context
from proxy.logs import LOGGER, event
from proxy.relay import PolicyHolder, ProxyServer
from proxy.reloading import (
    error_fields,
    files_changed,
    kind_files,
    record_expiry,
    reload,
    reload_shadow,
    watched_files,
)
from proxy.sessions_view import render as render_sessions
from proxy.sharedlimits import SharedCounts, source_slots_for
from proxy.tunnel import TunnelServer
from proxy.watch import Kinds, Snapshot, snapshot, watch
from proxy.workers import WorkerPlan, supervise

__all__ = [
    "LOOPS",
    "LoopUnavailable",
    "fd_limit_problem",
    "loop_factory",
    "run",
    "run_client",
    "serve",
    "serve_workers",
    "stop_signals",
]

log = logging.getLogger(LOGGER)


class LoopUnavailable(Exception):
    """``--loop uvloop`` without uvloop installed."""


@contextlib.contextmanager
def stop_signals(on_hup: Callable[[], object] | None = None) -> Iterator[asyncio.Event]:
    """Within the block, SIGTERM and SIGINT set the event it yields (stop) and SIGHUP, when
    ``on_hup`` is given, calls it; the handlers are removed on leaving it. Must run in the
    event loop's thread."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handlers: dict[signal.Signals, Callable[[], object]] = {}
    if on_hup is not None:
        handlers[signal.SIGHUP] = on_hup
    handlers[signal.SIGTERM] = stop.set
    handlers[signal.SIGINT] = stop.set
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield stop
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


#: ``serve --loop``: uvloop when installed (``auto``), uvloop or fail, or the stdlib loop.
LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``--loop`` (``None``: the default asyncio loop)."""
    if loop == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if loop == "uvloop":
            raise LoopUnavailable(
                "--loop uvloop: uvloop is not installed (pip install 'beanstalk-proxy[fast]')"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, int], loop: str = "auto") -> int:
    """Run ``coro`` on the event loop ``loop`` names (see ``LOOPS``)."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(coro)


def fd_limit_problem(config: Config, raise_soft: bool) -> str | None:
    """Compare the open-file limit (RLIMIT_NOFILE) with the descriptors the limits allow the
    proxy to hold (``Limits.fd_budget``). With ``raise_soft`` the soft limit is first raised
    towards the budget, up to the hard limit (what ``serve`` does). Returns a warning, or None
    when the limit is enough (or unknown)."""
    try:  # imported here: an optional, Unix-only module
        import resource
    except ImportError:  # not a Unix
        return None
    limits = config.limits
    need = limits.fd_budget()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reachable = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if raise_soft and soft != resource.RLIM_INFINITY and soft < reachable:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (reachable, hard))
            soft = reachable
    have = soft if raise_soft else hard
    if have == resource.RLIM_INFINITY or have >= need:
        return None
    return (
        f"the open-file limit (RLIMIT_NOFILE {'soft' if raise_soft else 'hard'} limit {have}) "
        f"is below the {need} descriptors the limits allow (2 x limits.max_connections "
        f"{limits.max_connections} + limits.max_handshakes {limits.handshake_limit()} + 32): "
        "at full load accept() fails with 'Too many open files'; raise the limit (ulimit -n, "
        "LimitNOFILE=) or lower limits.max_connections (with --workers a limit for the whole "
        "proxy, of which any one worker may hold all)"
    )


async def serve(
    config: Config,
    ctx: ssl.SSLContext,
    policy: Policy,
    worker: int | None = None,
    baseline: Snapshot | None = None,
    shared: SharedCounts | None = None,
    status_endpoint: Endpoint | None = None,
) -> int:
    """One proxy process with ``policy`` and ``ctx`` until SIGTERM/SIGINT (exit status 0; 1
    when it cannot listen). SIGHUP and watched-file changes reload. ``baseline`` is the state
    of the watched files from before they were read; ``worker``, ``shared`` and
    ``status_endpoint`` are set for a worker of ``--workers N``."""
    holder = PolicyHolder(policy)
    server = ProxyServer(config, ctx, holder, reuse_port=worker is not None, shared=shared)
    record_expiry(config, server)
    if baseline is None:
        baseline = snapshot(watched_files(config))
    kinds = Kinds(kind_files(config), baseline)  # what the running policy and context came from
    for kind in kinds.groups:
        server.metrics.reload_result(kind, True, counted=False)
    if config.acl_shadow is not None:
        reload_shadow(config, server, counted=False)
    status_listen = config.metrics_listen
    if status_listen is not None and status_endpoint is not None:
        # A worker of --workers N: its own endpoints on a private socket, which the
        # aggregator asks and merges on metrics.listen (proxy.aggregate).
        status_listen = status_endpoint
    status = (
        StatusServer(
            status_listen,
            server.metrics,
            config.upstream,
            connections=_sessions_of(server) if config.metrics_connections else None,
        )
        if status_listen is not None
        else None
    )
    # Handlers go in before anything can announce readiness: a SIGHUP sent by a supervisor
    # right after "ready" must reload, not kill the process (SIGHUP's default action).
    with stop_signals(partial(reload, config, server, kinds)) as stop:
        try:
            await server.start()
            if status is not None:
                await status.start()
        except OSError as exc:
            log.error(
                "cannot listen",
                extra=event("listen_failed", listen=str(config.listen), error=str(exc)),
            )
            await server.close()
            return 1
        where = str(config.listen)
        if not config.listen.is_unix and server.port is not None:
            where = str(Endpoint(config.listen.host, server.port, None))
        log.info(
            "ready: listening",
            extra=event("ready", listen=where, upstream=str(config.upstream), pid=os.getpid()),
        )
        watcher = (
            asyncio.get_running_loop().create_task(
                watch(
                    kinds.paths,
                    config.watch_interval,
                    baseline,
                    lambda old, new: files_changed(config, server, kinds, old, new),
                )
            )
            if config.watch_files
            else None
        )
        try:
            await stop.wait()
            log.info(
                "shutting down",
                extra=event(
                    "shutdown",
                    connections=len(server.connections),
                    timeout=config.limits.shutdown_timeout,
                ),
            )
        finally:
            if watcher is not None:
                watcher.cancel()
            await server.close(grace=config.limits.shutdown_timeout)
            if status is not None:
                await status.close()
    return 0


def _sessions_of(server: ProxyServer) -> Callable[[], Awaitable[bytes]]:
    return lambda: render_sessions(server)


def serve_workers(
    config: Config,
    ctx: ssl.SSLContext,
    policy: Policy,
    workers: int,
    baseline: Snapshot,
    loop: str = "auto",
) -> int:
    """``serve --workers N``: the supervisor (proxy.workers) forks N workers sharing the
    listen port and the limit counts, and, with metrics.listen, the aggregator that serves the
    whole proxy's status endpoints there. A replacement worker re-reads the ACL and TLS files
    (a SIGHUP may have changed them since the start), keeping the startup ones if they do not
    load now."""
    try:
        plan = WorkerPlan(workers, source_slots_for(config.limits.handshake_limit()))
    except OSError as exc:
        log.error(
            "--workers needs a writable directory for the workers' shared counts and status "
            "sockets (TMPDIR, else /tmp; on a read-only root filesystem mount a tmpfs there)",
            extra=event("workers_failed", error=str(exc)),
        )
        return 1

    def run_worker(k: int, replacement: bool) -> int:
        worker_policy, worker_ctx, worker_baseline = policy, ctx, baseline
        if replacement:
            worker_policy, worker_ctx, worker_baseline = _fresh_files(config, policy, ctx, baseline)
        return run(
            serve(
                config,
                worker_ctx,
                worker_policy,
                worker=k,
                baseline=worker_baseline,
                shared=plan.shared,
                status_endpoint=plan.status_endpoint(k),
            ),
            loop,
        )

    def run_aggregator() -> int:
        return run(_aggregate(config, plan), loop)

    return supervise(
        plan, run_worker, run_aggregator if config.metrics_listen is not None else None
    )


def _fresh_files(
    config: Config, policy: Policy, ctx: ssl.SSLContext, baseline: Snapshot
) -> tuple[Policy, ssl.SSLContext, Snapshot]:
    """The ACL and TLS context as the files say now (for a replacement worker), or the
    startup ones with the startup baseline (the watcher then retries) if they do not load."""
    now = snapshot(watched_files(config))
    try:
        return load_acl(config.acl, config.source), load_server_context(config), now
    except (ConfigError, OSError, ValueError) as exc:
        message = describe_config_error(exc) if isinstance(exc, ConfigError) else str(exc)
        log.error(
            "replacement worker: files do not load, starting with the old ones",
            extra=event("reload_failed", what="replacement worker", kept="previous", error=message),
        )
        return policy, ctx, baseline


async def _aggregate(config: Config, plan: WorkerPlan) -> int:
    """The aggregator child: metrics.listen for the whole proxy until SIGTERM/SIGINT."""
    assert config.metrics_listen is not None
    status = AggregateStatus(
        config.metrics_listen,
        config.upstream,
        plan.status_endpoints(),
        connections=config.metrics_connections,
    )
    with stop_signals() as stop:
        try:
            await status.start()
        except OSError as exc:
            log.error(
                "cannot listen",
                extra=event("listen_failed", listen=str(config.metrics_listen), error=str(exc)),
            )
            return 1
        try:
            await stop.wait()
        finally:
            await status.close()
    return 0


async def run_client(
    listen: Endpoint,
    connect: Endpoint,
    make_ctx: Callable[[], ssl.SSLContext],
    name: str,
    files: Sequence[str],
) -> int:
    """``client``: the tunnel from ``listen`` to the proxy at ``connect`` until SIGTERM/SIGINT;
    SIGHUP, or a change of ``files`` on disk, reloads the context ``make_ctx`` builds."""
    baseline = snapshot(files)
    tunnel = TunnelServer(listen, connect, make_ctx(), server_hostname=name)
    kinds = Kinds({"tls": files}, baseline)

    def reload_client_tls() -> None:
        kinds.attempt("tls")
        try:
            tunnel.reload_tls(make_ctx())
        except ConfigError as exc:
            log.error(
                "reload: client certificate not reloaded, keeping the previous",
                extra=event(
                    "reload_failed", what="client_tls", kept="previous", **error_fields(exc)
                ),
            )
        else:
            log.info(
                "reload: client certificate, key and CA reloaded",
                extra=event("reload", what="client_tls"),
            )

    with stop_signals(reload_client_tls) as stop:
        try:
            await tunnel.start()
            log.info(
                "ready: tunnel listening",
                extra=event(
                    "tunnel_ready",
                    listen=str(
                        listen if tunnel.port is None else Endpoint(listen.host, tunnel.port, None)
                    ),
                    proxy=str(connect),
                    server_name=name,
                ),
            )

            # The certificate, key and CA are reloaded when they change on disk, as on the server.
            def changed(_old: Snapshot, new: Snapshot) -> None:
                if kinds.changed(new):  # not on a mere touch, nor after a SIGHUP already did it
                    reload_client_tls()

            watcher = asyncio.get_running_loop().create_task(watch(files, 5.0, baseline, changed))
            await stop.wait()
            watcher.cancel()
        except OSError as exc:
            log.error(
                "cannot listen", extra=event("listen_failed", listen=str(listen), error=str(exc))
            )
            return 1
        finally:
            await tunnel.close()
    return 0

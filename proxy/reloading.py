"""Reloading on SIGHUP and when watched files change: the ACL, the shadow ACL and the TLS
files are re-read and swapped into a running ``ProxyServer``, keeping what runs (and logging
where the new file fails, as event fields) when a new one does not load.

Each reload kind (``acl``, ``tls``, ``shadow``) has its watched files (``kind_files``); a
reload is counted in ``reloads_total`` only when the content changed. An ACL reload logs the
rights it changes (``acl_reload_diff``, what ``acl diff`` prints) and re-checks live
connections; a TLS reload re-checks live connections against the CRLs and exports the
certificates' expiry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from cryptography import x509

from proxy.acl import Policy
from proxy.acldiff import PolicyDiff, diff_policies, render
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.loading import load_acl, load_server_context, load_shadow
from proxy.logs import LOGGER, event
from proxy.relay import ProxyServer
from proxy.tlsctx import refuse_all_context, revocation_check
from proxy.watch import Kinds, Snapshot, changed_paths
from proxy.yamlpos import position

__all__ = [
    "error_fields",
    "files_changed",
    "kind_files",
    "record_expiry",
    "reload",
    "reload_shadow",
    "watched_files",
]

log = logging.getLogger(LOGGER)


def _cert_expiry(path: str) -> float | None:
    """notAfter (unix time) of the first certificate in ``path``, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None


def record_expiry(config: Config, server: ProxyServer) -> None:
    """Export certificate expiry and warn when the server certificate is about to expire."""
    for label, path in (("server", config.tls.cert), ("client_ca", config.tls.client_ca)):
        expiry = _cert_expiry(path)
        if expiry is None:
            continue
        server.metrics.set_expiry(label, expiry)
        days_left = (expiry - time.time()) / 86400
        if label == "server" and days_left < config.tls.expiry_warning_days:
            log.warning(
                "server certificate expires soon",
                extra=event(
                    "cert_expiry",
                    file=path,
                    days_left=round(days_left, 2),
                    expiry_warning_days=config.tls.expiry_warning_days,
                ),
            )


def kind_files(config: Config) -> dict[str, list[str]]:
    """The watched files of each reload kind."""
    tls = config.tls
    kinds = {"acl": [config.acl], "tls": [tls.cert, tls.key, tls.client_ca, *tls.crl]}
    if config.acl_shadow is not None:
        kinds["shadow"] = [config.acl_shadow]
    return kinds


def watched_files(config: Config) -> list[str]:
    """Every file a reload reads."""
    return Kinds(kind_files(config)).paths


def files_changed(
    config: Config, server: ProxyServer, kinds: Kinds, old: Snapshot, new: Snapshot
) -> None:
    """The watcher saw a settled change: reload the kinds whose content changed."""
    todo = kinds.changed(new)
    if not todo:  # touched, changed back, or already reloaded by SIGHUP
        return
    paths = [p for p in changed_paths(old, new) if any(p in kinds.groups[k] for k in todo)]
    log.info(
        "files changed on disk, reloading",
        extra=event(
            "files_changed",
            what=sorted(todo),
            paths=paths or [p for k in todo for p in kinds.groups[k]],
        ),
    )
    reload(config, server, kinds, todo)


def reload(
    config: Config,
    server: ProxyServer,
    kinds: Kinds | None = None,
    only: Collection[str] = ("acl", "tls", "shadow"),
) -> None:
    """SIGHUP (every kind) or the watcher (the kinds that changed): re-read the ACL and the TLS
    files; keep what is running on any error. ``kinds`` remembers what each kind was last
    loaded from: a reload is counted in ``reloads_total`` only when that content changed."""
    if kinds is None:
        kinds = Kinds(kind_files(config))
    if "acl" in only:
        _reload_acl(config, server, kinds.attempt("acl"))
    if "tls" in only:
        _reload_tls(config, server, kinds.attempt("tls"))
    if "shadow" in only and config.acl_shadow is not None:
        reload_shadow(config, server, kinds.attempt("shadow"))


def error_fields(exc: BaseException) -> dict[str, object]:
    """Where a load failed, as event fields: the file, the key path, the line and column (of
    the key, or of a YAML syntax error) when known, and the reason."""
    if not isinstance(exc, ConfigError):
        return {"error": str(exc) or type(exc).__name__}
    line, column = exc.line, exc.column
    if line is None and exc.key:
        found = position(exc.source, exc.key)
        if found is not None:
            line, column = found
    fields = {"file": exc.source, "key": exc.key, "line": line, "column": column}
    return {**{k: v for k, v in fields.items() if v}, "error": exc.reason}


def _reload_acl(config: Config, server: ProxyServer, counted: bool) -> None:
    try:
        policy = load_acl(config.acl, config.source)
    except Exception as exc:
        server.metrics.reload_result("acl", False, counted)
        log.error(
            "reload: ACL not reloaded, keeping the previous policy",
            extra=event("reload_failed", what="acl", kept="previous", **error_fields(exc)),
        )
    else:
        server.metrics.reload_result("acl", True, counted)
        diff = _policy_diff(server.policy.current, policy)
        affected = server.reload_policy(policy, diff.changed if diff is not None else ())
        log.info(
            "reload: ACL loaded",
            extra=event("reload", what="acl", file=config.acl, principals=len(policy.principals)),
        )
        if diff is not None:
            _log_reload_diff(config.acl, diff, affected)


def reload_shadow(config: Config, server: ProxyServer, counted: bool) -> bool:
    """(Re)load the shadow ACL; a file that does not load keeps the previous shadow (or
    none) and never touches the enforced policy. True when it loaded."""
    try:
        shadow = load_shadow(config)
    except Exception as exc:
        server.metrics.reload_result("shadow", False, counted)
        log.error(
            "reload: shadow ACL not loaded, keeping the previous shadow",
            extra=event("reload_failed", what="shadow", kept="previous", **error_fields(exc)),
        )
        return False
    server.metrics.reload_result("shadow", True, counted)
    server.reload_shadow(shadow)
    log.info(
        "reload: shadow ACL loaded (decided next to the ACL, not enforced)",
        extra=event(
            "reload",
            what="shadow",
            file=config.acl_shadow,
            principals=len(shadow.principals) if shadow is not None else 0,
        ),
    )
    return True


def _policy_diff(old: Policy, new: Policy) -> PolicyDiff | None:
    try:
        return diff_policies(old, new)
    except Exception:  # the summary must never stop a valid policy from loading
        log.exception(
            "reload: cannot compute the ACL diff; the new ACL is loaded anyway",
            extra=event("acl_diff_failed"),
        )
        return None


def _log_reload_diff(path: str, diff: PolicyDiff, affected: int) -> None:
    """One structured ``acl_reload_diff`` event: what ``acl diff`` would print, and how many
    live connections changed principal or rights."""
    lines = render(diff)
    log.info(
        "reload: ACL diff",
        extra=event(
            "acl_reload_diff",
            file=path,
            principals_changed=sorted(diff.changed),
            rights_gained=diff.gained,
            rights_lost=diff.lost,
            connections_affected=affected,
            summary=lines,
        ),
    )


def _reload_tls(config: Config, server: ProxyServer, counted: bool) -> None:
    try:
        ctx = load_server_context(config)
    except Exception as exc:
        server.metrics.reload_result("tls", False, counted)
        crl_broken = isinstance(exc, ConfigError) and exc.key.startswith("tls.crl")
        if crl_broken and config.tls.crl_failure == "refuse":
            try:
                server.reload_tls(refuse_all_context(config.tls, config.source))
            except ConfigError as exc2:
                log.error(
                    "reload: TLS files not reloaded, keeping the previous context",
                    extra=event("reload_failed", what="tls", kept="previous", **error_fields(exc2)),
                )
                return
            log.error(
                "reload: the CRL is unusable, refusing every new client until a good CRL is "
                "loaded (tls.crl_failure: refuse)",
                extra=event("reload_failed", what="tls", kept="refuse_all", **error_fields(exc)),
            )
            return
        log.error(
            "reload: TLS files not reloaded, keeping the previous context",
            extra=event("reload_failed", what="tls", kept="previous", **error_fields(exc)),
        )
    else:
        server.metrics.reload_result("tls", True, counted)
        record_expiry(config, server)
        try:
            revoked = revocation_check(config.tls)
        except (OSError, ValueError) as exc:  # the context loaded it; a race with a rewrite
            log.error(
                "reload: CRL re-read failed, live connections not re-checked",
                extra=event("crl_recheck_failed", error=str(exc)),
            )
            revoked = None
        server.reload_tls(ctx, revoked)
        log.info(
            "reload: TLS certificate, key, CA and CRL reloaded",
            extra=event("reload", what="tls"),
        )

"""Proxy configuration: already-parsed YAML data in, a frozen, validated ``Config`` out.

This module is pure: it never opens files, sockets or TLS contexts, and it does not import
``yaml`` (``proxy.loading`` reads and parses the file and hands the resulting data over). Every
problem is reported as ``ConfigError(source, key_path, reason)`` where ``key_path`` is the dotted
location inside the document (``tls.cert``, ``tls.crl[1]``, ``limits.handshake_timeout``), so an
operator can go straight to the offending line. Unknown keys are errors (typo protection), a key
set to YAML ``null`` (written as an empty value) counts as absent, and relative file paths are
kept exactly as written: they are resolved against the working directory of the proxy process,
not against the directory of the configuration file.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from proxy import schema
from proxy.errors import ConfigError
from proxy.schema import describe

__all__ = [
    "DEFAULT_LISTEN",
    "MAX_JOB_SIZE_LIMIT",
    "Config",
    "Endpoint",
    "Limits",
    "LogConfig",
    "TLSConfig",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
]

DEFAULT_LISTEN = "0.0.0.0:11400"
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_UPSTREAM_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_JOB_SIZE = 65535
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 2.0
#: ``limits.max_handshakes`` defaults to min(max_connections, this).
DEFAULT_MAX_HANDSHAKES = 1024
DEFAULT_MAX_HANDSHAKES_PER_SOURCE = 64
#: ``limits.max_buffered_bytes``: put bodies in flight, proxy-wide (64 MiB).
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
#: Descriptors a proxy process needs besides its client and upstream sockets (listener, event
#: loop, metrics listener, standard streams, log and watched files), with room to spare.
FD_OVERHEAD = 32
MAX_JOB_SIZE_LIMIT = 1073741824  # beanstalkd's own ceiling for -z (2**30)
MAX_DURATION = 86400.0  # one day; anything longer is almost certainly a unit mistake

TLS_VERSIONS = ("1.2", "1.3")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Endpoint:
    """A TCP ``host:port`` or a unix socket path (``path`` set, ``host``/``port`` None)."""

    host: str | None
    port: int | None
    path: str | None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets, ``localhost`` and loopback IP literals (127/8, ::1)."""
        if self.path is not None:
            return True
        if self.host is None:
            return False
        if self.host.lower() in ("localhost", "localhost."):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    cert: str
    key: str
    client_ca: str
    crl: tuple[str, ...]
    min_version: str  # "1.2" or "1.3"
    expiry_warning_days: int = 14  # warn when the server certificate expires within this
    crl_failure: str = "refuse"  # on a reload with an unusable CRL: "refuse" | "keep_last"
    crl_check: str = "chain"  # with CRLs: "chain" (every CA in the chain) | "leaf"
    require_client_auth_eku: bool = True  # refuse client certificates without clientAuth EKU
    transport: str = (
        "builtin"  # "builtin" (proxy/tlsbio.py) | "stock" (the loop's own) | "auto" (= builtin)
    )


@dataclass(frozen=True)
class Limits:
    max_connections: int
    handshake_timeout: float  # seconds
    max_job_size: int  # bytes
    upstream_connect_timeout: float  # seconds
    shutdown_timeout: float = 10.0  # seconds a SIGTERM waits for in-flight replies
    idle_timeout: float | None = None  # close connections silent this long (never mid-reserve)
    max_connection_lifetime: float | None = None  # close connections older than this
    max_connections_per_principal: int | None = None
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT  # seconds to wait for the peer's TLS close
    max_handshakes: int | None = None  # None: min(max_connections, DEFAULT_MAX_HANDSHAKES)
    max_handshakes_per_source: int | None = DEFAULT_MAX_HANDSHAKES_PER_SOURCE  # None: no cap
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES  # put bodies in flight, proxy-wide

    def handshake_limit(self) -> int:
        """Connections allowed in the TLS handshake at once (``max_handshakes`` or its
        default)."""
        return self.max_handshakes or min(self.max_connections, DEFAULT_MAX_HANDSHAKES)

    def fd_budget(self) -> int:
        """File descriptors the proxy may hold at most: a client socket and an upstream socket
        per connection, a socket per pending handshake, and ``FD_OVERHEAD``."""
        return 2 * self.max_connections + self.handshake_limit() + FD_OVERHEAD


@dataclass(frozen=True)
class LogConfig:
    format: str  # "text" | "json"
    level: str  # "debug" | "info" | "warning" | "error"


@dataclass(frozen=True)
class Config:
    listen: Endpoint
    upstream: Endpoint
    allow_remote_upstream: bool
    tls: TLSConfig
    acl: str
    limits: Limits
    metrics_listen: Endpoint | None
    log: LogConfig
    source: str
    watch_files: bool = True  # reload when the ACL or TLS files change on disk
    watch_interval: float = 5.0  # seconds between checks of those files
    denial_reply: str = "compatible"  # acl_denial_reply: how a denied command is answered
    metrics_connections: bool = False  # serve /connections (live sessions) on metrics.listen
    acl_shadow: str | None = None  # a second ACL decided next to ``acl``, never enforced


# --------------------------------------------------------------------------------------------
# small typed readers


_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class _Reader:
    """Reads one mapping, remembering which keys were consumed to report unknown ones."""

    def __init__(self, source: str, path: str, data: object, allowed: tuple[str, ...]) -> None:
        self.source = source
        self.path = path
        if data is None:
            data = {}
        self.data: Mapping[str, object] = schema.mapping(source, path, data, allowed)

    def key(self, name: str) -> str:
        return schema.join(self.path, name)

    def get(self, name: str) -> object:
        """The value of ``name``, or None when absent or null."""
        return self.data.get(name)

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def required_str(self, name: str, what: str) -> str:
        value = self.get(name)
        if value is None:
            raise schema.missing_key(self.source, self.key(name), what)
        if not isinstance(value, str):
            raise schema.wrong_type(self.source, self.key(name), f"a string ({what})", value)
        if not value.strip():
            raise self.error(name, f"must not be empty ({what})")
        return value

    def get_bool(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise schema.wrong_type(self.source, self.key(name), "true or false", value)
        return value

    def get_int(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise schema.wrong_type(self.source, self.key(name), "an integer", value)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.error(name, f"must be {bound}, got {value}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {describe(value)}")
        return value.lower()

    def duration(self, name: str, default: float) -> float:
        value = self.get(name)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def endpoint(self, name: str, *, allow_port_zero: bool) -> Endpoint | None:
        value = self.get(name)
        if value is None:
            return None
        try:
            return parse_endpoint(value, allow_port_zero=allow_port_zero)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None


# --------------------------------------------------------------------------------------------
# value syntaxes (public so the CLI can reuse them for command-line options)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number (``5``, ``0.5``) or a string with a unit (``"500ms"``, ``"5s"``,
    ``"2m"``, ``"1h"``; a bare numeric string means seconds). Must be > 0 and at most a day."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f'expected a duration such as 5, "500ms", "5s" or "2m", got {describe(value)}'
        )
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f'must be a duration such as 5, "500ms", "5s" or "2m" '
                f"(units: ms, s, m, h), got {value!r}"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most {int(MAX_DURATION)}s (one day), got {value!r}")
    return seconds


def _check_host(host: str) -> str:
    """Validate a bare host: an IPv4 literal, an IPv6 literal (already unbracketed) or a DNS
    name. Returns the host unchanged."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if ":" in host:
        raise ValueError(f"invalid IPv6 address {host!r}")
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_HOSTNAME_LABEL.match(p) for p in name.split(".")):
        raise ValueError(f"invalid host name {host!r}")
    if all(p.isdigit() for p in name.split(".")):
        raise ValueError(f"invalid IPv4 address {host!r}")
    return host


def parse_endpoint(value: object, *, allow_port_zero: bool = False) -> Endpoint:
    """Parse ``"host:port"``, ``"[v6addr]:port"`` or ``"unix:/path/to.sock"``.

    Port 0 (an ephemeral port, useful in tests) is accepted only where ``allow_port_zero``."""
    syntax = '"host:port", "[::1]:port" or "unix:/path"'
    if not isinstance(value, str):
        raise ValueError(f"expected a string such as {syntax}, got {describe(value)}")
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix socket path is empty (write unix:/path/to.sock)")
        if "\0" in path:
            raise ValueError("unix socket path contains a NUL byte")
        return Endpoint(host=None, port=None, path=path)
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or not text[close + 1 :].startswith(":"):
            raise ValueError(f"must be {syntax}, got {value!r}")
        host = text[1:close]
        port_text = text[close + 2 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"brackets are only for IPv6 addresses, got {host!r}") from None
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"IPv6 addresses must be written in brackets, e.g. [::1]:11300; got {value!r}"
            )
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"must be {syntax} (the port is missing), got {value!r}")
        if not host:
            raise ValueError(
                f"the host is missing (use 0.0.0.0:{port_text} for every interface), got {value!r}"
            )
        _check_host(host)
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r} in {value!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be between {low} and 65535, got {port}")
    return Endpoint(host=host, port=port, path=None)


# --------------------------------------------------------------------------------------------
# sections

_TOP_KEYS = (
    "listen",
    "upstream",
    "allow_remote_upstream",
    "tls",
    "acl",
    "limits",
    "metrics",
    "log",
    "reload",
    "acl_denial_reply",
    "acl_shadow",
)
#: ``acl_denial_reply`` values (see ``proxy.session.denial_replies``).
DENIAL_REPLY_MODES = ("compatible", "explicit")
_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "crl",
    "min_version",
    "expiry_warning_days",
    "crl_failure",
    "crl_check",
    "require_client_auth_eku",
    "transport",
)
CRL_FAILURE_MODES = ("refuse", "keep_last")
CRL_CHECK_MODES = ("chain", "leaf")
TLS_TRANSPORTS = ("auto", "builtin", "stock")
_RELOAD_KEYS = ("watch", "interval")
_LIMIT_KEYS = (
    "max_connections",
    "handshake_timeout",
    "upstream_connect_timeout",
    "max_job_size",
    "shutdown_timeout",
    "idle_timeout",
    "max_connection_lifetime",
    "max_connections_per_principal",
    "close_timeout",
    "max_handshakes",
    "max_handshakes_per_source",
    "max_buffered_bytes",
)
_METRICS_KEYS = ("listen", "connections")
_LOG_KEYS = ("format", "level")


def _parse_tls(source: str, data: object) -> TLSConfig:
    if data is None:
        raise schema.missing_key(source, "tls", "a mapping with cert, key and client_ca")
    r = _Reader(source, "tls", data, _TLS_KEYS)
    cert = r.required_str("cert", "path to the server certificate chain, PEM")
    key = r.required_str("key", "path to the server private key, PEM")
    client_ca = r.required_str("client_ca", "path to the CA bundle client certs must chain to")

    crl_value = r.get("crl")
    crl: tuple[str, ...]
    if crl_value is None:
        crl = ()
    elif isinstance(crl_value, str):
        if not crl_value.strip():
            raise r.error("crl", "must not be empty (omit the key to disable CRL checking)")
        crl = (crl_value,)
    elif isinstance(crl_value, list):
        items: list[str] = []
        for i, item in enumerate(crl_value):
            if not isinstance(item, str) or not item.strip():
                raise schema.wrong_type(
                    source, f"tls.crl[{i}]", "a non-empty path (a string)", item
                )
            items.append(item)
        crl = tuple(items)
    else:
        raise schema.wrong_type(source, "tls.crl", "a path or a list of paths", crl_value)

    mv = r.get("min_version")
    min_version = "1.2"
    if mv is not None:
        # An unquoted 1.2 / 1.3 arrives as a float; accept it, it cannot mean anything else.
        if isinstance(mv, float) and not isinstance(mv, bool):
            text = repr(mv)
        elif isinstance(mv, str):
            text = mv.strip()
            if text.lower().startswith("tlsv"):
                text = text[4:]
        else:
            raise r.error("min_version", f'must be "1.2" or "1.3", got {describe(mv)}')
        if text in ("1.0", "1", "1.1"):
            raise r.error(
                "min_version", f'TLS {text} is insecure and not supported; use "1.2" or "1.3"'
            )
        if text not in TLS_VERSIONS:
            raise r.error("min_version", f'must be "1.2" or "1.3", got {describe(mv)}')
        min_version = text
    warn_days = r.get_int("expiry_warning_days", 14, 0, 3650)
    crl_failure = r.choice("crl_failure", "refuse", CRL_FAILURE_MODES)
    crl_check = r.choice("crl_check", "chain", CRL_CHECK_MODES)
    require_eku = r.get_bool("require_client_auth_eku", True)
    transport = r.choice("transport", "builtin", TLS_TRANSPORTS)
    return TLSConfig(
        cert=cert,
        key=key,
        client_ca=client_ca,
        crl=crl,
        min_version=min_version,
        expiry_warning_days=warn_days,
        crl_failure=crl_failure,
        crl_check=crl_check,
        require_client_auth_eku=require_eku,
        transport=transport,
    )


def _parse_limits(source: str, data: object) -> Limits:
    r = _Reader(source, "limits", data, _LIMIT_KEYS)
    return Limits(
        max_connections=r.get_int("max_connections", DEFAULT_MAX_CONNECTIONS, 1),
        handshake_timeout=r.duration("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        max_job_size=r.get_int("max_job_size", DEFAULT_MAX_JOB_SIZE, 0, MAX_JOB_SIZE_LIMIT),
        upstream_connect_timeout=r.duration(
            "upstream_connect_timeout", DEFAULT_UPSTREAM_CONNECT_TIMEOUT
        ),
        shutdown_timeout=r.duration("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT),
        idle_timeout=r.duration("idle_timeout", 0.0) or None,
        max_connection_lifetime=r.duration("max_connection_lifetime", 0.0) or None,
        max_connections_per_principal=r.get_int("max_connections_per_principal", 0, 1) or None,
        close_timeout=r.duration("close_timeout", DEFAULT_CLOSE_TIMEOUT),
        max_handshakes=r.get_int("max_handshakes", 0, 1) or None,
        max_handshakes_per_source=r.get_int(
            "max_handshakes_per_source", DEFAULT_MAX_HANDSHAKES_PER_SOURCE, 0
        )
        or None,
        max_buffered_bytes=r.get_int("max_buffered_bytes", DEFAULT_MAX_BUFFERED_BYTES, 1),
    )


def _parse_log(source: str, data: object) -> LogConfig:
    r = _Reader(source, "log", data, _LOG_KEYS)
    return LogConfig(
        format=r.choice("format", "text", LOG_FORMATS),
        level=r.choice("level", "info", LOG_LEVELS),
    )


def _acl_shadow(top: _Reader) -> str | None:
    """``acl_shadow``: optional path of the shadow ACL (a string when given)."""
    value = top.get("acl_shadow")
    if value is None:
        return None
    return top.required_str("acl_shadow", "path to the shadow ACL, e.g. config/acl.shadow.yaml")


def parse_config(data: object, source: str) -> Config:
    """Validate the parsed YAML document ``data`` of the file ``source`` into a ``Config``.

    Raises ``ConfigError(source, key_path, reason)`` on the first problem found."""
    if data is None:
        raise ConfigError(source, "", "the file is empty; upstream, tls and acl are required")
    top = _Reader(source, "", data, _TOP_KEYS)

    listen = top.endpoint("listen", allow_port_zero=True)
    if listen is None:
        listen = parse_endpoint(DEFAULT_LISTEN)

    upstream = top.endpoint("upstream", allow_port_zero=False)
    if upstream is None:
        raise schema.missing_key(
            source,
            "upstream",
            'the beanstalkd address, e.g. "127.0.0.1:11300" or "unix:/run/beanstalkd.sock"',
        )
    allow_remote = top.get_bool("allow_remote_upstream", False)
    if not upstream.is_loopback and not allow_remote:
        raise top.error(
            "upstream",
            f"{upstream} is not a loopback address or unix socket; beanstalkd has no "
            f"authentication or encryption, so the proxy refuses to talk to it over the "
            f"network. Run the proxy next to beanstalkd, or set allow_remote_upstream: true "
            f"if the path between them is already private",
        )
    if listen == upstream:  # upstream never has port 0
        raise top.error("listen", f"is the same address as upstream ({upstream})")

    tls = _parse_tls(source, top.get("tls"))
    acl = top.required_str("acl", "path to the ACL file, e.g. config/acl.yaml")
    limits = _parse_limits(source, top.get("limits"))

    metrics = _Reader(source, "metrics", top.get("metrics"), _METRICS_KEYS)
    metrics_listen = metrics.endpoint("listen", allow_port_zero=True)
    if (
        metrics_listen is not None
        and metrics_listen.port != 0
        and metrics_listen in (listen, upstream)
    ):
        which = "listen" if metrics_listen == listen else "upstream"
        raise metrics.error("listen", f"is the same address as {which} ({metrics_listen})")
    metrics_connections = metrics.get_bool("connections", False)
    if metrics_connections and metrics_listen is None:
        raise metrics.error(
            "connections", "needs metrics.listen (/connections is served on the status listener)"
        )

    log = _parse_log(source, top.get("log"))
    reload = _Reader(source, "reload", top.get("reload"), _RELOAD_KEYS)
    return Config(
        listen=listen,
        upstream=upstream,
        allow_remote_upstream=allow_remote,
        tls=tls,
        acl=acl,
        limits=limits,
        metrics_listen=metrics_listen,
        log=log,
        source=source,
        watch_files=reload.get_bool("watch", True),
        watch_interval=reload.duration("interval", 5.0),
        denial_reply=top.choice("acl_denial_reply", "compatible", DENIAL_REPLY_MODES),
        metrics_connections=metrics_connections,
        acl_shadow=_acl_shadow(top),
    )

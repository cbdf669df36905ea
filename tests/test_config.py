"""Tests for proxy.config: defaults, a full round trip, and every rejection with its key path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy.config as config_mod
from proxy.config import (
    Config,
    Endpoint,
    parse_config,
    parse_duration,
    parse_endpoint,
)
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "test.yaml"


def minimal() -> dict[str, Any]:
    return {
        "upstream": "127.0.0.1:11300",
        "tls": {"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"},
        "acl": "acl.yaml",
    }


def full() -> dict[str, Any]:
    return {
        "listen": "[::1]:11401",
        "upstream": "unix:/run/beanstalkd.sock",
        "allow_remote_upstream": False,
        "tls": {
            "cert": "certs/server.pem",
            "key": "certs/server.key",
            "client_ca": "certs/ca.pem",
            "crl": ["certs/a.crl", "certs/b.crl"],
            "min_version": "1.3",
        },
        "acl": "config/acl.yaml",
        "limits": {
            "max_connections": 50,
            "handshake_timeout": "500ms",
            "upstream_connect_timeout": "2m",
            "max_job_size": 1073741824,
        },
        "metrics": {"listen": "127.0.0.1:9400"},
        "log": {"format": "json", "level": "debug"},
    }


def non_string_key() -> dict[object, object]:
    data: dict[object, object] = {1: "x"}
    data.update(minimal())
    return data


def reject(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)
    assert info.value.source == SOURCE
    return info.value


def with_change(path: str, value: object, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (default ``minimal()``) with dotted ``path`` set to ``value``."""
    data = copy.deepcopy(base if base is not None else minimal())
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def without(path: str) -> dict[str, Any]:
    data = minimal()
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


# ------------------------------------------------------------------------------ good configs


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse_config(minimal(), SOURCE)
    assert cfg.source == SOURCE
    assert cfg.listen == Endpoint("0.0.0.0", 11400, None)
    assert str(cfg.listen) == "0.0.0.0:11400"
    assert cfg.upstream == Endpoint("127.0.0.1", 11300, None)
    assert cfg.allow_remote_upstream is False
    assert cfg.tls.crl == ()
    assert cfg.tls.min_version == "1.2"
    assert cfg.acl == "acl.yaml"
    assert cfg.limits.max_connections == 10000
    assert cfg.limits.handshake_timeout == 5.0
    assert cfg.limits.upstream_connect_timeout == 5.0
    assert cfg.limits.max_job_size == 65535
    assert cfg.metrics_listen is None
    assert cfg.log.format == "text"
    assert cfg.log.level == "info"


def test_handshake_and_close_limits_defaults_and_fd_budget() -> None:
    limits = parse_config(minimal(), SOURCE).limits
    assert limits.close_timeout == 2.0
    assert limits.max_handshakes is None and limits.handshake_limit() == 1024
    assert limits.max_handshakes_per_source == 64
    assert limits.fd_budget() == 2 * 10000 + 1024 + 32
    small = parse_config(with_change("limits.max_connections", 100), SOURCE).limits
    assert small.handshake_limit() == 100  # min(max_connections, 1024)
    data = with_change("limits.max_handshakes", 7)
    data["limits"].update(max_handshakes_per_source=0, close_timeout="250ms")
    set_ = parse_config(data, SOURCE).limits
    assert set_.handshake_limit() == 7
    assert set_.max_handshakes_per_source is None  # 0: no cap
    assert set_.close_timeout == 0.25


def test_full_config_round_trip() -> None:
    cfg = parse_config(full(), SOURCE)
    assert cfg.listen == Endpoint("::1", 11401, None)
    assert str(cfg.listen) == "[::1]:11401"
    assert cfg.upstream == Endpoint(None, None, "/run/beanstalkd.sock")
    assert cfg.upstream.is_unix and cfg.upstream.is_loopback
    assert str(cfg.upstream) == "unix:/run/beanstalkd.sock"
    assert cfg.tls.cert == "certs/server.pem"
    assert cfg.tls.key == "certs/server.key"
    assert cfg.tls.client_ca == "certs/ca.pem"
    assert cfg.tls.crl == ("certs/a.crl", "certs/b.crl")
    assert cfg.tls.min_version == "1.3"
    assert cfg.limits.max_connections == 50
    assert cfg.limits.handshake_timeout == pytest.approx(0.5)
    assert cfg.limits.upstream_connect_timeout == 120.0
    assert cfg.limits.max_job_size == 1073741824
    assert cfg.metrics_listen == Endpoint("127.0.0.1", 9400, None)
    assert cfg.log.format == "json" and cfg.log.level == "debug"
    # the parsed endpoints print back into the syntax they were read from
    again = parse_config(
        with_change("listen", str(cfg.listen), with_change("upstream", str(cfg.upstream), full())),
        SOURCE,
    )
    assert again == cfg


def test_config_is_frozen() -> None:
    cfg = parse_config(minimal(), SOURCE)
    with pytest.raises(AttributeError):
        cfg.acl = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.tls.cert = "other"  # type: ignore[misc]


def test_relative_paths_are_kept_as_written() -> None:
    cfg = parse_config(with_change("acl", "../x/acl.yaml"), SOURCE)
    assert cfg.acl == "../x/acl.yaml"


def test_single_crl_string_becomes_tuple() -> None:
    cfg = parse_config(with_change("tls.crl", "crl.pem"), SOURCE)
    assert cfg.tls.crl == ("crl.pem",)


@pytest.mark.parametrize("value", [1.2, "1.2", "TLSv1.2"])
def test_min_version_12_spellings(value: object) -> None:
    assert parse_config(with_change("tls.min_version", value), SOURCE).tls.min_version == "1.2"


@pytest.mark.parametrize("value", [1.3, "1.3", "tlsv1.3"])
def test_min_version_13_spellings(value: object) -> None:
    assert parse_config(with_change("tls.min_version", value), SOURCE).tls.min_version == "1.3"


def test_null_values_count_as_absent() -> None:
    data = minimal()
    data.update({"listen": None, "limits": None, "metrics": None, "log": {"level": None}})
    data["tls"]["crl"] = None
    cfg = parse_config(data, SOURCE)
    assert str(cfg.listen) == "0.0.0.0:11400"
    assert cfg.limits.max_connections == 10000
    assert cfg.metrics_listen is None
    assert cfg.log.level == "info"
    assert cfg.tls.crl == ()


def test_empty_metrics_section_means_off() -> None:
    assert parse_config(with_change("metrics", {}), SOURCE).metrics_listen is None


def test_log_choices_are_case_insensitive() -> None:
    data = with_change("log", {"format": "JSON", "level": "Warning"})
    cfg = parse_config(data, SOURCE)
    assert (cfg.log.format, cfg.log.level) == ("json", "warning")


def test_remote_upstream_allowed_with_flag() -> None:
    data = with_change("upstream", "10.0.0.5:11300")
    data["allow_remote_upstream"] = True
    cfg = parse_config(data, SOURCE)
    assert cfg.upstream == Endpoint("10.0.0.5", 11300, None)
    assert cfg.allow_remote_upstream is True
    assert not cfg.upstream.is_loopback


@pytest.mark.parametrize(
    "upstream", ["localhost:11300", "127.0.0.2:11300", "[::1]:11300", "unix:/tmp/b.sock"]
)
def test_loopback_upstreams_need_no_flag(upstream: str) -> None:
    assert parse_config(with_change("upstream", upstream), SOURCE).upstream.is_loopback


def test_port_zero_allowed_for_listen_and_metrics() -> None:
    data = with_change("listen", "127.0.0.1:0")
    data["metrics"] = {"listen": "127.0.0.1:0"}
    cfg = parse_config(data, SOURCE)
    assert cfg.listen.port == 0
    assert cfg.metrics_listen is not None and cfg.metrics_listen.port == 0


def test_shipped_configs_parse() -> None:
    for name in ("proxy.yaml", "proxy.example.yaml"):
        path = ROOT / "config" / name
        cfg = parse_config(yaml.safe_load(path.read_text()), str(path))
        assert isinstance(cfg, Config)
        assert cfg.upstream.is_loopback
        assert cfg.acl == "config/acl.yaml"


#: Every key the parser accepts, derived from the parser itself so the docs cannot drift.
SECTIONS = {
    "tls": config_mod._TLS_KEYS,
    "limits": config_mod._LIMIT_KEYS,
    "metrics": config_mod._METRICS_KEYS,
    "log": config_mod._LOG_KEYS,
    "reload": config_mod._RELOAD_KEYS,
}
ALL_KEYS = [k for k in config_mod._TOP_KEYS if k not in SECTIONS] + [
    f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys
]


def test_example_config_sets_every_key() -> None:
    data = yaml.safe_load((ROOT / "config" / "proxy.example.yaml").read_text())
    assert set(data) == set(config_mod._TOP_KEYS)
    for section, keys in SECTIONS.items():
        assert set(data[section]) == set(keys), section
    parse_config(data, "proxy.example.yaml")  # and it is valid


def test_readme_documents_every_key() -> None:
    text = (ROOT / "config" / "README.md").read_text()
    for key in ALL_KEYS:
        assert f"| `{key}` |" in text, key


# ------------------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.25, 0.25),
        ("5s", 5.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("7", 7.0),
        (" 3 s ", 3.0),
        (86400, 86400.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        "0s",
        "-5s",
        "5 sec",
        "5S",
        "s",
        "",
        "1d",
        True,
        None,
        [5],
        float("nan"),
        float("inf"),
        86401,
        "25h",
        "5ms5",
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# ------------------------------------------------------------------------------ endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:11400", Endpoint("0.0.0.0", 11400, None)),
        ("localhost:1", Endpoint("localhost", 1, None)),
        ("beanstalk.internal.example:65535", Endpoint("beanstalk.internal.example", 65535, None)),
        ("[::]:11400", Endpoint("::", 11400, None)),
        ("[fe80::1]:80", Endpoint("fe80::1", 80, None)),
        ("unix:/run/b.sock", Endpoint(None, None, "/run/b.sock")),
        ("unix:relative.sock", Endpoint(None, None, "relative.sock")),
    ],
)
def test_parse_endpoint_accepts(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("127.0.0.1", "port is missing"),
        (":11300", "host is missing"),
        ("::1:11300", "brackets"),
        ("[127.0.0.1]:11300", "only for IPv6"),
        ("[::1]11300", "must be"),
        ("[::1", "must be"),
        ("host:port", "port must be a number"),
        ("host:-1", "port must be a number"),
        ("host:+5", "port must be a number"),
        ("host:65536", "between 1 and 65535"),
        ("host:0", "between 1 and 65535"),
        ("unix:", "empty"),
        ("bad_host:1", "invalid host name"),
        ("-bad:1", "invalid host name"),
        ("256.1.1.1:1", "invalid IPv4"),
        ("127.1:1", "invalid IPv4"),
        ("a..b:1", "invalid host name"),
        ("host:١٢", "port must be a number"),
    ],
)
def test_parse_endpoint_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        (Endpoint("127.0.0.1", 1, None), True),
        (Endpoint("127.255.0.9", 1, None), True),
        (Endpoint("::1", 1, None), True),
        (Endpoint("localhost", 1, None), True),
        (Endpoint("LOCALHOST", 1, None), True),
        (Endpoint(None, None, "/s"), True),
        (Endpoint("0.0.0.0", 1, None), False),
        (Endpoint("10.0.0.1", 1, None), False),
        (Endpoint("localhost.example.com", 1, None), False),
        (Endpoint("::ffff:8.8.8.8", 1, None), False),
    ],
)
def test_is_loopback(endpoint: Endpoint, loopback: bool) -> None:
    assert endpoint.is_loopback is loopback


# ------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        # document shape
        (None, "", "empty"),
        ([1, 2], "", "expected a mapping, got"),
        ("listen: x", "", "expected a mapping, got"),
        (non_string_key(), "1", "unknown key '1'"),
        # unknown keys, with full paths and suggestions
        ({**minimal(), "lsten": "x"}, "lsten", "did you mean 'listen'"),
        (with_change("tls.certs", "x"), "tls.certs", "did you mean 'cert'"),
        (with_change("limits.max_conections", 5), "limits.max_conections", "unknown key"),
        (with_change("metrics.port", 9400), "metrics.port", "unknown key"),
        (with_change("log.colour", True), "log.colour", "unknown key"),
        # sections of the wrong type
        (with_change("tls", "s.pem"), "tls", "expected a mapping, got"),
        (with_change("limits", [1]), "limits", "expected a mapping, got"),
        (with_change("metrics", "127.0.0.1:9400"), "metrics", "expected a mapping, got"),
        (with_change("log", "json"), "log", "expected a mapping, got"),
        # required keys
        (without("upstream"), "upstream", "missing required key"),
        (without("tls"), "tls", "missing required key"),
        (without("tls.cert"), "tls.cert", "missing required key"),
        (without("tls.key"), "tls.key", "missing required key"),
        (without("tls.client_ca"), "tls.client_ca", "missing required key"),
        (without("acl"), "acl", "missing required key"),
        (with_change("acl", None), "acl", "missing required key"),
        # string-typed keys
        (with_change("acl", ""), "acl", "must not be empty"),
        (with_change("acl", ["a.yaml"]), "acl", "expected a string"),
        (with_change("tls.cert", 5), "tls.cert", "expected a string"),
        (with_change("tls.key", "  "), "tls.key", "must not be empty"),
        (with_change("tls.client_ca", {"a": 1}), "tls.client_ca", "expected a string"),
        # endpoints
        (with_change("listen", 11400), "listen", "expected a string"),
        (with_change("listen", "11400"), "listen", "port is missing"),
        (with_change("listen", "::1:11400"), "listen", "brackets"),
        (with_change("upstream", "127.0.0.1:0"), "upstream", "between 1 and 65535"),
        (with_change("upstream", "127.0.0.1"), "upstream", "port is missing"),
        (with_change("metrics.listen", "nope"), "metrics.listen", "port is missing"),
        (with_change("metrics.listen", 9400), "metrics.listen", "expected a string"),
        # remote upstream protection
        (with_change("upstream", "10.1.2.3:11300"), "upstream", "allow_remote_upstream"),
        (with_change("upstream", "beanstalk.example:11300"), "upstream", "allow_remote_upstream"),
        (with_change("upstream", "0.0.0.0:11300"), "upstream", "allow_remote_upstream"),
        (with_change("allow_remote_upstream", "yes"), "allow_remote_upstream", "true or false"),
        (with_change("allow_remote_upstream", 1), "allow_remote_upstream", "true or false"),
        # address collisions
        (with_change("listen", "127.0.0.1:11300"), "listen", "same address as upstream"),
        (
            with_change("metrics.listen", "0.0.0.0:11400"),
            "metrics.listen",
            "same address as listen",
        ),
        (
            with_change("metrics.listen", "127.0.0.1:11300"),
            "metrics.listen",
            "same address as upstream",
        ),
        # tls.crl
        (with_change("tls.crl", 5), "tls.crl", "a path or a list of paths"),
        (with_change("tls.crl", ""), "tls.crl", "must not be empty"),
        (with_change("tls.crl", ["a.pem", 7]), "tls.crl[1]", "path (a string), got an integer (7)"),
        (with_change("tls.crl", ["a.pem", "b.pem", ""]), "tls.crl[2]", "non-empty path"),
        (with_change("tls.crl", {"a": 1}), "tls.crl", "a path or a list of paths"),
        # tls.min_version
        (with_change("tls.min_version", "1.1"), "tls.min_version", "insecure"),
        (with_change("tls.min_version", 1.0), "tls.min_version", "insecure"),
        (with_change("tls.min_version", 1), "tls.min_version", 'must be "1.2" or "1.3"'),
        (with_change("tls.min_version", "1.4"), "tls.min_version", 'must be "1.2" or "1.3"'),
        (with_change("tls.min_version", 1.25), "tls.min_version", 'must be "1.2" or "1.3"'),
        (with_change("tls.min_version", True), "tls.min_version", 'must be "1.2" or "1.3"'),
        # limits
        (with_change("limits.max_connections", 0), "limits.max_connections", "at least 1"),
        (with_change("limits.max_connections", -3), "limits.max_connections", "at least 1"),
        (with_change("limits.max_connections", 1.5), "limits.max_connections", "an integer"),
        (with_change("limits.max_connections", "10"), "limits.max_connections", "an integer"),
        (with_change("limits.max_connections", True), "limits.max_connections", "an integer"),
        (with_change("limits.max_job_size", -1), "limits.max_job_size", "between 0 and"),
        (
            with_change("limits.max_job_size", 1073741825),
            "limits.max_job_size",
            "between 0 and 1073741824",
        ),
        (with_change("limits.max_job_size", "64k"), "limits.max_job_size", "expected an integer"),
        (with_change("limits.handshake_timeout", "5 sec"), "limits.handshake_timeout", "units"),
        (with_change("limits.handshake_timeout", 0), "limits.handshake_timeout", "positive"),
        (with_change("limits.handshake_timeout", -1), "limits.handshake_timeout", "positive"),
        (with_change("limits.handshake_timeout", False), "limits.handshake_timeout", "duration"),
        (
            with_change("limits.upstream_connect_timeout", "2d"),
            "limits.upstream_connect_timeout",
            "units",
        ),
        (
            with_change("limits.upstream_connect_timeout", 100000),
            "limits.upstream_connect_timeout",
            "at most",
        ),
        # log
        (with_change("limits.max_handshakes", 0), "limits.max_handshakes", "at least 1"),
        (
            with_change("limits.max_handshakes_per_source", -1),
            "limits.max_handshakes_per_source",
            "at least 0",
        ),
        (with_change("limits.close_timeout", 0), "limits.close_timeout", "positive"),
        (with_change("log.format", "xml"), "log.format", "text, json"),
        (with_change("log.format", 1), "log.format", "text, json"),
        (with_change("log.level", "verbose"), "log.level", "debug, info, warning, error"),
        (with_change("log.level", "critical"), "log.level", "debug, info, warning, error"),
    ],
)
def test_rejections_name_the_key(data: object, key: str, fragment: str) -> None:
    err = reject(data)
    assert err.key == key
    assert fragment in err.reason
    # str(err) is what the CLI prints after "error: "
    expected = f"{SOURCE}: {key}: {err.reason}" if key else f"{SOURCE}: {err.reason}"
    assert str(err) == expected


def test_unknown_key_lists_the_allowed_keys() -> None:
    err = reject(with_change("tls.ca", "x"))
    assert err.key == "tls.ca"
    for allowed in ("cert", "key", "client_ca", "crl", "min_version"):
        assert allowed in err.reason


def test_remote_upstream_message_explains_the_flag() -> None:
    err = reject(with_change("upstream", "192.168.1.10:11300"))
    assert "192.168.1.10:11300" in err.reason
    assert "allow_remote_upstream: true" in err.reason


def test_unknown_key_reported_before_other_problems_in_its_section() -> None:
    data = with_change("limits", {"max_connections": 0, "typo": 1})
    assert reject(data).key == "limits.typo"

"""The shared schema wording (``proxy.schema``): the configuration file and the ACL report a
wrong type, an unknown key and a missing key in the same words, at the offending key path."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.acl import parse_acl
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.schema import describe, mapping

CONFIG: dict[str, Any] = {
    "upstream": "127.0.0.1:11300",
    "tls": {"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"},
    "acl": "acl.yaml",
}
ACL: dict[str, Any] = {
    "principals": [{"name": "p", "match": {"cn": "p"}, "rate": {"per_second": 5}}],
    "rules": [],
}


def _config_error(**changes: Any) -> ConfigError:
    data = {**CONFIG, "tls": dict(CONFIG["tls"])}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        elif value is None:
            del data[section]
        else:
            data[section] = value
    with pytest.raises(ConfigError) as info:
        parse_config(data, "proxy.yaml")
    return info.value


def _acl_error(principal: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_acl({"principals": [principal], "rules": []}, "acl.yaml")
    return info.value


def test_wrong_type_reads_the_same() -> None:
    config = _config_error(limits=[1])
    acl = _acl_error({"name": "p", "match": {"cn": "p"}, "rate": [1]})
    assert (config.key, acl.key) == ("limits", "principals[0].rate")
    assert config.reason == acl.reason == "expected a mapping, got a list"


def test_unknown_key_reads_the_same() -> None:
    config = _config_error(tls__crls="x")
    acl = _acl_error({"name": "p", "match": {"cn": "p"}, "rate": {"per_second": 1, "brust": 2}})
    assert (config.key, acl.key) == ("tls.crls", "principals[0].rate.brust")
    assert config.reason.startswith("unknown key 'crls' (did you mean 'crl'?); expected one of ")
    assert (
        acl.reason
        == "unknown key 'brust' (did you mean 'burst'?); expected one of per_second, burst"
    )


def test_missing_key_reads_the_same() -> None:
    config = _config_error(tls__cert=None)
    acl = _acl_error({"name": "p", "match": {"cn": "p"}, "rate": {"burst": 2}})
    assert (config.key, acl.key) == ("tls.cert", "principals[0].rate.per_second")
    assert config.reason == "missing required key (path to the server certificate chain, PEM)"
    assert acl.reason == "missing required key"


def test_non_string_key_is_an_unknown_key_in_both() -> None:
    with pytest.raises(ConfigError) as config:
        parse_config({**CONFIG, 7: "x"}, "proxy.yaml")
    with pytest.raises(ConfigError) as acl:
        parse_acl({**ACL, 7: "x"}, "acl.yaml")
    assert config.value.key == acl.value.key == "7"
    assert config.value.reason.startswith("unknown key '7'; expected one of ")
    assert acl.value.reason == "unknown key '7'; expected one of principals, rules"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "a boolean (true)"),
        (5, "an integer (5)"),
        (1.5, "a number (1.5)"),
        ("x", "a string ('x')"),
        ("y" * 100, "a string ('" + "y" * 37 + "...')"),
        ({}, "a mapping"),
        ([], "a list"),
        (b"x", "bytes"),
    ],
)
def test_describe(value: object, text: str) -> None:
    assert describe(value) == text


@pytest.mark.parametrize("value", [None, "x", [("a", 1)], 3])
def test_mapping_rejects_what_is_not_a_mapping(value: object) -> None:
    with pytest.raises(ConfigError, match="expected a mapping, got"):
        mapping("f.yaml", "here", value, ("a",))


def test_mapping_accepts_allowed_keys_only() -> None:
    assert mapping("f.yaml", "", {"a": 1}, ("a", "b")) == {"a": 1}
    with pytest.raises(ConfigError) as info:
        mapping("f.yaml", "top", {"a": 1, "bb": 2}, ("a", "b"))
    assert info.value.key == "top.bb"

"""Tests for proxy.acl: principal matching, decisions, parse errors, lint and example files."""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_helpers import identity as ident

from proxy.acl import (
    ALWAYS,
    ANY,
    COMMAND_VERBS,
    DELETE_OTHER_VERB,
    TUBE_CHARS,
    VERBS,
    Decision,
    Policy,
    PutLimits,
    lint_acl,
    parse_acl,
)
from proxy.acl.globs import SegmentGlob, StarGlob
from proxy.errors import ConfigError
from proxy.identity import Identity

ROOT = Path(__file__).resolve().parent.parent
FP_A = "sha256:" + "ab" * 32
FP_B = "sha256:" + "cd" * 32
SPKI_A = "sha256:" + "12" * 32
SPKI_B = "sha256:" + "34" * 32


# --------------------------------------------------------------------------------------------
# The command table
# --------------------------------------------------------------------------------------------

ALL_25 = {
    "put": "produce",
    "use": "any",
    "reserve": "consume",
    "reserve-with-timeout": "consume",
    "reserve-job": "manage",
    "delete": "consume",
    "release": "consume",
    "bury": "consume",
    "touch": "consume",
    "watch": "consume",
    "ignore": "always",
    "peek": "inspect",
    "peek-ready": "inspect",
    "peek-delayed": "inspect",
    "peek-buried": "inspect",
    "kick": "manage",
    "kick-job": "manage",
    "stats-job": "inspect",
    "stats-tube": "inspect",
    "stats": "server",
    "list-tubes": "inspect",
    "list-tube-used": "always",
    "list-tubes-watched": "always",
    "quit": "always",
    "pause-tube": "manage",
}


def test_command_verbs_cover_all_25_commands() -> None:
    assert len(COMMAND_VERBS) == 25
    assert COMMAND_VERBS == ALL_25
    assert DELETE_OTHER_VERB == "manage"
    assert VERBS == ("produce", "consume", "inspect", "manage", "server")
    assert ALWAYS == "always" and ANY == "any"
    assert set(COMMAND_VERBS.values()) == {*VERBS, ALWAYS, ANY}


def test_tube_chars_match_beanstalkd() -> None:
    assert "".join(sorted(TUBE_CHARS)) == "".join(
        sorted("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-+/;.$_()")
    )


# --------------------------------------------------------------------------------------------
# Principal matching
# --------------------------------------------------------------------------------------------

MATCH_ACL: dict[str, Any] = {
    "principals": [
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "k8s", "match": {"uri": "spiffe://example.org/ns/**/sa/reporting"}},
        {"name": "ops", "match": {"cn": "ops-*", "ou": "SRE"}},
        {"name": "web", "match": {"dns": "*.web.example.com"}},
        {"name": "deep", "match": {"dns": "**.deep.example.com"}},
        {"name": "batch", "match": {"ip": ["10.20.0.0/16", "2001:db8::/32"]}},
        {"name": "one-ip", "match": {"ip": "192.0.2.7"}},
        {"name": "legacy", "match": {"fingerprint": FP_A.upper().replace("SHA256", "sha256")}},
        {
            "name": "pinned",
            "match": {"spki": "SHA256:" + ":".join(["12"] * 32)},
        },
        {"name": "lists", "match": {"cn": ["worker-?", "worker-*-eu"], "ou": ["A", "B"]}},
        {"name": "anyone-named-x", "match": {"cn": "x*"}},
        {"name": "x-special", "match": {"cn": "x-special"}},  # shadowed by the one above
    ],
    "rules": [{"principal": "*", "allow": ["inspect"]}],
}


@pytest.fixture(scope="module")
def match_policy() -> Policy:
    return parse_acl(copy.deepcopy(MATCH_ACL), "match.yaml")


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        # uri: '*' stays within one path segment
        (ident(uris=("spiffe://example.org/billing/api",)), "billing"),
        (ident(uris=("spiffe://example.org/billing/v2/api",)), None),
        (ident(uris=("spiffe://example.org/billingX/api",)), None),
        (ident(uris=("spiffe://other.org/billing/api",)), None),
        (ident(uris=("https://x", "spiffe://example.org/billing/w")), "billing"),  # any SAN
        # uri: '**' spans segments
        (ident(uris=("spiffe://example.org/ns/prod/sa/reporting",)), "k8s"),
        (ident(uris=("spiffe://example.org/ns/a/b/sa/reporting",)), "k8s"),
        (ident(uris=("spiffe://example.org/ns/prod/sa/reporting2",)), None),
        # cn + ou: AND, any OU may match
        (ident(cn="ops-alice", ous=("eng", "SRE")), "ops"),
        (ident(cn="ops-alice", ous=("eng",)), None),
        (ident(cn="dev-ops-alice", ous=("SRE",)), None),
        (ident(cn=None, ous=("SRE",)), None),
        (ident(cn="ops-", ous=("SRE",)), "ops"),  # '*' matches the empty run
        # dns: '*' is one label, '**' any run; case-insensitive
        (ident(dns=("a.web.example.com",)), "web"),
        (ident(dns=("A.WEB.Example.COM",)), "web"),
        (ident(dns=("a.b.web.example.com",)), None),
        (ident(dns=("a.b.deep.example.com",)), "deep"),
        (ident(dns=("deep.example.com",)), None),
        # ip: CIDR and single address, v4 and v6
        (ident(ips=("10.20.3.4",)), "batch"),
        (ident(ips=("10.21.3.4",)), None),
        (ident(ips=("2001:db8::99",)), "batch"),
        (ident(ips=("192.0.2.7",)), "one-ip"),
        (ident(ips=("192.0.2.8",)), None),
        # pins: case-insensitive, colons accepted
        (ident(fingerprint=FP_A), "legacy"),
        (ident(spki=SPKI_A), "pinned"),
        # pattern lists: any pattern, and AND across keys
        (ident(cn="worker-?", ous=("B",)), "lists"),
        (ident(cn="worker-7-eu", ous=("A",)), "lists"),
        (ident(cn="worker-7-us", ous=("A",)), None),
        (ident(cn="worker-7-eu", ous=("C",)), None),
        # first match wins
        (ident(cn="x-special"), "anyone-named-x"),
        (ident(cn="ops-a", ous=("SRE",), uris=("spiffe://example.org/billing/a",)), "billing"),
        # nothing matches
        (ident(), None),
        (ident(cn="nobody"), None),
    ],
)
def test_principal_for(match_policy: Policy, identity: Identity, expected: str | None) -> None:
    assert match_policy.principal_for(identity) == expected
    rule = match_policy.principal_rule(identity)
    if expected is None:
        assert rule is None
        assert match_policy.match_rule_for(identity) == "no principal matches"
    else:
        index = match_policy.principals.index(expected)
        assert rule == (expected, f"principals[{index}]")
        assert match_policy.match_rule_for(identity) == f"principals[{index}]"


def test_principals_in_file_order(match_policy: Policy) -> None:
    assert match_policy.principals == tuple(p["name"] for p in MATCH_ACL["principals"])


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------

DECIDE_ACL: dict[str, Any] = {
    "principals": [
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "worker", "match": {"cn": "worker"}},
        {"name": "ops", "match": {"cn": "ops-*", "ou": "SRE"}},
        {"name": "mon", "match": {"cn": "mon"}},
        {"name": "weird", "match": {"cn": "weird"}},
        {"name": "idle", "match": {"cn": "idle"}},
    ],
    "rules": [
        {  # 0
            "principal": "billing",
            "tubes": ["invoices", "invoices.*"],
            "allow": ["produce"],
            "put": {"max_body": 4096, "priority": [0, 1024], "delay": [0, 3600], "ttr": [1, 600]},
        },
        {"principal": "billing", "tubes": ["invoices"], "allow": ["inspect"]},  # 1
        {"principal": "worker", "tubes": ["invoices"], "allow": ["consume"]},  # 2
        {"principal": "worker", "tubes": ["invoices"], "allow": ["kick-job"]},  # 3
        {"principal": "ops", "tubes": ["*"], "allow": ["all"]},  # 4
        {"principal": "*", "tubes": ["secrets.*"], "deny": ["all"]},  # 5
        {"principal": "mon", "allow": ["server", "inspect"]},  # 6
        {"principal": "weird", "tubes": ["a.$b", "x(y)*", "*.q;", "m*d*e"], "allow": ["put"]},  # 7
        {"principal": "ops", "tubes": ["ops.frozen"], "deny": ["pause-tube"]},  # 8
        {"principal": "*", "tubes": ["public"], "allow": ["inspect"]},  # 9
        {"principal": "billing", "tubes": ["invoices.eu"], "allow": ["put"]},  # 10
    ],
}

R0 = "rules[0] (allow produce on invoices,invoices.*)"
R1 = "rules[1] (allow inspect on invoices)"
R2 = "rules[2] (allow consume on invoices)"
R3 = "rules[3] (allow kick-job on invoices)"
R4 = "rules[4] (allow all on *)"
R5 = "rules[5] (deny all on secrets.*)"
R6 = "rules[6] (allow server,inspect on *)"
R7 = "rules[7] (allow put on a.$b,x(y)*,*.q;,m*d*e)"
R8 = "rules[8] (deny pause-tube on ops.frozen)"
R9 = "rules[9] (allow inspect on public)"
DEFAULT = "default deny"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_acl(copy.deepcopy(DECIDE_ACL), "decide.yaml")


@pytest.mark.parametrize(
    ("principal", "command", "verb", "tube", "allowed", "rule"),
    [
        # allow by verb class, exact and glob tube patterns
        ("billing", "put", "produce", "invoices", True, R0),
        ("billing", "put", "produce", "invoices.eu", True, R0),  # first matching allow
        ("billing", "put", "produce", "invoices.", True, R0),  # '*' may match nothing
        ("billing", "put", "produce", "invoicesXeu", False, DEFAULT),  # '.' is literal
        ("billing", "put", "produce", "Invoices", False, DEFAULT),  # case-sensitive
        ("billing", "put", "produce", "default", False, DEFAULT),  # no free pass
        ("billing", "reserve", "consume", "invoices", False, DEFAULT),
        ("billing", "peek-ready", "inspect", "invoices", True, R1),
        ("billing", "peek-ready", "inspect", "invoices.eu", False, DEFAULT),
        # consume, delete in both flavours, command-name entries
        ("worker", "reserve", "consume", "invoices", True, R2),
        ("worker", "watch", "consume", "invoices", True, R2),
        ("worker", "delete", "consume", "invoices", True, R2),
        ("worker", "delete", DELETE_OTHER_VERB, "invoices", False, DEFAULT),
        ("worker", "kick-job", "manage", "invoices", True, R3),
        ("worker", "kick", "manage", "invoices", False, DEFAULT),
        ("worker", "reserve", "consume", "secrets.x", False, R5),
        # all, explicit deny beats allow, command-name deny
        ("ops", "pause-tube", "manage", "anything", True, R4),
        ("ops", "put", "produce", "secrets.db", False, R5),
        ("ops", "put", "produce", "secrets.", False, R5),
        ("ops", "put", "produce", "secrets", True, R4),
        ("ops", "pause-tube", "manage", "ops.frozen", False, R8),
        ("ops", "kick", "manage", "ops.frozen", True, R4),
        # the tube-less stats: only rules whose tubes include the bare "*"
        ("ops", "stats", "server", None, True, R4),
        ("mon", "stats", "server", None, True, R6),
        ("billing", "stats", "server", None, False, DEFAULT),
        ("mon", "peek", "inspect", "secrets.a", False, R5),
        ("mon", "stats-tube", "inspect", "whatever", True, R6),
        # literal '.', '$', '(', ')', ';' in tube patterns
        ("weird", "put", "produce", "a.$b", True, R7),
        ("weird", "put", "produce", "aX$b", False, DEFAULT),
        ("weird", "put", "produce", "a.b", False, DEFAULT),
        ("weird", "put", "produce", "x(y)", True, R7),
        ("weird", "put", "produce", "x(y)z.1", True, R7),
        ("weird", "put", "produce", "xy", False, DEFAULT),
        ("weird", "put", "produce", "foo.q;", True, R7),
        ("weird", "put", "produce", ".q;", True, R7),
        ("weird", "put", "produce", "q;", False, DEFAULT),
        ("weird", "put", "produce", "mde", True, R7),
        ("weird", "put", "produce", "m1d2d3e", True, R7),
        ("weird", "put", "produce", "m1e", False, DEFAULT),
        ("weird", "reserve", "consume", "a.$b", False, DEFAULT),  # command entry is put only
        # "*" principal rules apply to everyone
        ("billing", "stats-tube", "inspect", "public", True, R9),
        ("idle", "peek", "inspect", "public", True, R9),
        ("idle", "put", "produce", "public", False, DEFAULT),
        # unknown principals and verbs fail closed; always-verbs are always allowed
        ("ghost", "peek", "inspect", "public", False, DEFAULT),
        ("ops", "put", "fly", "x", False, DEFAULT),
        ("idle", "quit", ALWAYS, None, True, "always allowed"),
        ("idle", "list-tubes-watched", ALWAYS, None, True, "always allowed"),
    ],
)
def test_decide(
    policy: Policy,
    principal: str,
    command: str,
    verb: str,
    tube: str | None,
    allowed: bool,
    rule: str,
) -> None:
    decision = policy.decide(principal, command, verb, tube)
    assert decision.allowed is allowed
    if rule == DEFAULT:
        assert decision.rule.startswith("default deny (")
    else:
        assert decision.rule.startswith(rule)
    # the second call is served from the cache and must agree
    assert policy.decide(principal, command, verb, tube) == decision


def test_default_deny_text(policy: Policy) -> None:
    assert policy.decide("billing", "reserve", "consume", "x").rule == (
        "default deny (no rule allows consume on 'x' for billing)"
    )
    assert policy.decide("billing", "stats", "server", None).rule == (
        "default deny (no rule allows server server-wide for billing)"
    )
    assert "unknown principal 'ghost'" in policy.decide("ghost", "put", "produce", "x").rule


def test_put_limits_returned(policy: Policy) -> None:
    limits = PutLimits(max_body=4096, priority=(0, 1024), delay=(0, 3600), ttr=(1, 600))
    assert policy.decide("billing", "put", "produce", "invoices") == Decision(True, R0, limits)
    # only for put, and only from the first matching allow
    assert policy.decide("billing", "peek-ready", "inspect", "invoices").limits is None
    assert policy.decide("ops", "put", "produce", "x").limits is None
    assert policy.decide("weird", "put", "produce", "a.$b").limits is None


def test_first_matching_allow_provides_limits() -> None:
    acl = {
        "principals": [{"name": "p", "match": {"cn": "p"}}],
        "rules": [
            {"principal": "p", "tubes": ["a"], "allow": ["put"], "put": {"max_body": 1}},
            {"principal": "*", "allow": ["produce"], "put": {"max_body": 2}},
        ],
    }
    pol = parse_acl(acl, "t")
    assert pol.decide("p", "put", "produce", "a").limits == PutLimits(max_body=1)
    assert pol.decide("p", "put", "produce", "b").limits == PutLimits(max_body=2)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((5, 0, 60, 4096), None),
        ((5, 0, 60, 4097), "body of 4097 bytes exceeds max_body 4096"),
        ((1025, 0, 60, 1), "priority 1025 outside [0, 1024]"),
        ((0, 3601, 60, 1), "delay 3601 outside [0, 3600]"),
        ((0, 0, 0, 1), "ttr 0 outside [1, 600]"),
        ((1024, 3600, 600, 0), None),
    ],
)
def test_put_limits_violation(args: tuple[int, int, int, int], expected: str | None) -> None:
    limits = PutLimits(max_body=4096, priority=(0, 1024), delay=(0, 3600), ttr=(1, 600))
    assert limits.violation(*args) == expected
    assert PutLimits().violation(*args) is None


def test_use_verb_goes_through_any_right(policy: Policy) -> None:
    assert policy.decide("billing", "use", ANY, "invoices.eu").allowed
    assert not policy.decide("billing", "use", ANY, "secrets.x").allowed
    assert not policy.decide("billing", "use", ANY, None).allowed


@pytest.mark.parametrize(
    ("principal", "tube", "allowed", "rule"),
    [
        ("billing", "invoices", True, R0),
        ("billing", "invoices.eu", True, R0),
        ("billing", "payroll", False, DEFAULT),
        ("worker", "invoices", True, R2),
        ("ops", "secrets.x", False, R5),
        ("ops", "ops.frozen", True, R4),
        ("weird", "a.$b", True, R7),  # a command-name allow is a right on the tube
        ("idle", "public", True, R9),
        ("idle", "default", False, DEFAULT),
        ("ghost", "public", False, DEFAULT),
    ],
)
def test_any_right(policy: Policy, principal: str, tube: str, allowed: bool, rule: str) -> None:
    decision = policy.any_right(principal, tube)
    assert decision.allowed is allowed
    assert decision.rule.startswith(rule)


def test_any_right_with_partial_denies() -> None:
    acl = {
        "principals": [{"name": n, "match": {"cn": n}} for n in ("a", "b", "c")],
        "rules": [
            {"principal": "a", "tubes": ["t"], "allow": ["put"]},
            {"principal": "a", "tubes": ["t"], "deny": ["produce"]},
            {"principal": "b", "tubes": ["t"], "allow": ["delete"]},
            {"principal": "b", "tubes": ["t"], "deny": ["consume"]},
            {"principal": "c", "allow": ["all"]},
            {"principal": "c", "tubes": ["t"], "deny": ["produce", "consume", "inspect"]},
        ],
    }
    pol = parse_acl(acl, "t")
    a = pol.any_right("a", "t")
    assert not a.allowed and a.rule.startswith("rules[1]")
    assert pol.any_right("b", "t").allowed  # delete of a job it did not reserve (manage)
    assert pol.any_right("c", "t").allowed  # manage survives
    assert pol.any_right("c", "u").allowed


UNIFORM_ACL: dict[str, Any] = {
    "principals": [{"name": n, "match": {"cn": n}} for n in ("a", "b", "c", "d")],
    "rules": [
        {"principal": "a", "tubes": ["*"], "allow": ["all"]},
        {"principal": "b", "allow": ["consume"]},
        {"principal": "b", "tubes": ["x"], "deny": ["delete"]},
        {"principal": "c", "tubes": ["x.*"], "allow": ["all"]},
        {"principal": "d", "tubes": ["q", "*"], "allow": ["kick-job", "peek"]},
        {"principal": "d", "tubes": ["nothing-here"], "deny": ["server"]},
    ],
}


@pytest.mark.parametrize(
    ("principal", "command", "verb", "expected"),
    [
        ("a", "put", "produce", True),
        ("a", "stats", "server", True),
        ("a", "delete", DELETE_OTHER_VERB, True),
        ("a", "quit", ALWAYS, True),
        ("a", "use", ANY, True),
        ("b", "reserve", "consume", True),
        ("b", "release", "consume", True),
        ("b", "delete", "consume", False),  # a deny names delete somewhere
        ("b", "put", "produce", False),
        ("b", "use", ANY, True),
        ("c", "put", "produce", False),  # no "*" tube
        ("c", "use", ANY, False),
        ("c", "quit", ALWAYS, True),
        ("d", "kick-job", "manage", True),
        ("d", "peek", "inspect", True),
        ("d", "stats-job", "inspect", False),
        ("d", "stats", "server", False),
        ("ghost", "put", "produce", False),
        ("a", "put", "nonsense", False),
    ],
)
def test_uniform(principal: str, command: str, verb: str, expected: bool) -> None:
    pol = parse_acl(copy.deepcopy(UNIFORM_ACL), "u")
    assert pol.uniform(principal, command, verb) is expected
    if expected and verb != ANY:
        for tube in ("x", "x.1", "default", "q", None if verb == "server" else "z"):
            assert pol.decide(principal, command, verb, tube).allowed


def test_uniform_false_with_any_deny_for_everyone(policy: Policy) -> None:
    # rules[5] denies all on secrets.* for "*": nothing is uniform for anyone any more
    assert not policy.uniform("ops", "put", "produce")
    assert not policy.uniform("mon", "peek", "inspect")


# --------------------------------------------------------------------------------------------
# Parse errors
# --------------------------------------------------------------------------------------------


def base() -> dict[str, Any]:
    return {
        "principals": [{"name": "p", "match": {"cn": "p"}}],
        "rules": [{"principal": "p", "tubes": ["t"], "allow": ["produce"]}],
    }


def with_principal(**match: Any) -> dict[str, Any]:
    doc = base()
    doc["principals"][0]["match"] = match
    return doc


def with_rule(**fields: Any) -> dict[str, Any]:
    doc = base()
    doc["rules"][0] = {"principal": "p", **fields}
    return doc


def _set(doc: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


def _drop(doc: dict[str, Any], path: list[Any]) -> dict[str, Any]:
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return doc


PIN = "sha256:" + "0" * 64

REJECTIONS: list[tuple[str, object, str, str]] = [
    # (id, data, key path, reason fragment)
    ("empty-file", None, "", "the ACL is empty"),
    ("not-mapping", ["principals"], "", "expected a mapping, got a list"),
    ("unknown-top-key", {**base(), "version": 1}, "version", "unknown key 'version'"),
    ("missing-principals", {"rules": []}, "principals", "missing required key"),
    ("missing-rules", {"principals": []}, "rules", "missing required key"),
    ("principals-not-list", {"principals": {}, "rules": []}, "principals", "expected a list"),
    ("principal-not-mapping", {"principals": ["p"], "rules": []}, "principals[0]", "mapping"),
    ("principal-no-name", _drop(base(), ["principals", 0, "name"]), "principals[0].name", "miss"),
    ("principal-no-match", _drop(base(), ["principals", 0, "match"]), "principals[0].match", "m"),
    (
        "principal-unknown-key",
        _set(base(), ["principals", 0, "role"], "x"),
        "principals[0].role",
        "unknown key 'role'",
    ),
    (
        "name-int",
        _set(base(), ["principals", 0, "name"], 5),
        "principals[0].name",
        "got an integer",
    ),
    ("name-star", _set(base(), ["principals", 0, "name"], "*"), "principals[0].name", "reserved"),
    (
        "name-bad",
        _set(base(), ["principals", 0, "name"], "bad name!"),
        "principals[0].name",
        "invalid principal name",
    ),
    (
        "name-empty",
        _set(base(), ["principals", 0, "name"], ""),
        "principals[0].name",
        "must not be empty",
    ),
    (
        "name-duplicate",
        {
            "principals": [
                {"name": "p", "match": {"cn": "a"}},
                {"name": "p", "match": {"cn": "b"}},
            ],
            "rules": [],
        },
        "principals[1].name",
        "duplicate principal name 'p' (first defined at principals[0])",
    ),
    ("match-empty", with_principal(), "principals[0].match", "must name at least one of"),
    (
        "match-not-mapping",
        _set(base(), ["principals", 0, "match"], "cn=p"),
        "principals[0].match",
        "expected a mapping, got a string",
    ),
    (
        "match-unknown-key",
        with_principal(cm="x"),
        "principals[0].match.cm",
        "unknown key 'cm' (did you mean 'cn'?)",
    ),
    ("cn-empty", with_principal(cn=""), "principals[0].match.cn", "must not be empty"),
    ("cn-empty-list", with_principal(cn=[]), "principals[0].match.cn", "list of patterns is empty"),
    ("cn-list-int", with_principal(cn=["ok", 3]), "principals[0].match.cn[1]", "got an integer"),
    ("cn-null", with_principal(cn=None), "principals[0].match.cn", "got null"),
    (
        "dns-bad-char",
        with_principal(dns="a b.example.com"),
        "principals[0].match.dns",
        "invalid character ' '",
    ),
    (
        "dns-triple-star",
        with_principal(dns="***.example.com"),
        "principals[0].match.dns",
        "'***' is ambiguous",
    ),
    ("uri-space", with_principal(uri="spiffe://x/ a"), "principals[0].match.uri", "whitespace"),
    (
        "uri-triple-star",
        with_principal(uri="spiffe://x/***"),
        "principals[0].match.uri",
        "ambiguous",
    ),
    ("ip-host-bits", with_principal(ip="10.0.0.1/8"), "principals[0].match.ip", "host bits set"),
    (
        "ip-garbage",
        with_principal(ip=["10.0.0.1", "nope"]),
        "principals[0].match.ip[1]",
        "expected an IP address or CIDR network",
    ),
    (
        "fp-sha1",
        with_principal(fingerprint="sha1:" + "0" * 40),
        "principals[0].match.fingerprint",
        "expected 'sha256:' followed by 64 hex digits",
    ),
    (
        "fp-short",
        with_principal(fingerprint=PIN[:-2]),
        "principals[0].match.fingerprint",
        "64 hex digits",
    ),
    (
        "fp-not-hex",
        with_principal(fingerprint=PIN[:-1] + "g"),
        "principals[0].match.fingerprint",
        "64 hex digits",
    ),
    (
        "fp-no-prefix",
        with_principal(fingerprint="0" * 64),
        "principals[0].match.fingerprint",
        "sha256:",
    ),
    (
        "spki-bad-colons",
        with_principal(spki="sha256:" + "000:" * 16),
        "principals[0].match.spki",
        "64 hex digits",
    ),
    ("rules-not-list", {**base(), "rules": "allow all"}, "rules", "expected a list of rules"),
    ("rule-not-mapping", {**base(), "rules": [["p"]]}, "rules[0]", "expected a mapping"),
    (
        "rule-unknown-key",
        with_rule(allow=["produce"], colour="red"),
        "rules[0].colour",
        "unknown key 'colour'",
    ),
    (
        "rule-no-principal",
        {**base(), "rules": [{"allow": ["produce"]}]},
        "rules[0].principal",
        "missing required key",
    ),
    (
        "rule-principal-int",
        {**base(), "rules": [{"principal": 1, "allow": ["all"]}]},
        "rules[0].principal",
        "got an integer",
    ),
    (
        "rule-unknown-principal",
        {**base(), "rules": [{"principal": "q", "allow": ["all"]}]},
        "rules[0].principal",
        "unknown principal 'q'",
    ),
    (
        "rule-typo-principal",
        {
            "principals": [{"name": "billing", "match": {"cn": "b"}}],
            "rules": [{"principal": "biling", "allow": ["all"]}],
        },
        "rules[0].principal",
        "(did you mean 'billing'?)",
    ),
    (
        "rule-allow-and-deny",
        with_rule(allow=["produce"], deny=["consume"]),
        "rules[0]",
        "exactly one of 'allow' or 'deny'",
    ),
    ("rule-neither", with_rule(tubes=["t"]), "rules[0]", "exactly one of 'allow' or 'deny'"),
    (
        "verb-typo",
        with_rule(allow=["produse"]),
        "rules[0].allow[0]",
        "unknown verb 'produse' (did you mean 'produce'?)",
    ),
    ("verb-case", with_rule(deny=["ALL"]), "rules[0].deny[0]", "unknown verb 'ALL'"),
    ("verb-int", with_rule(allow=["produce", 7]), "rules[0].allow[1]", "got an integer"),
    ("allow-empty", with_rule(allow=[]), "rules[0].allow", "at least one verb"),
    (
        "allow-string",
        with_rule(allow="produce"),
        "rules[0].allow",
        "expected a list of verbs or command names, got a string",
    ),
    ("allow-quit", with_rule(allow=["quit"]), "rules[0].allow[0]", "'quit' is always allowed"),
    ("deny-ignore", with_rule(deny=["ignore"]), "rules[0].deny[0]", "always allowed"),
    ("allow-use", with_rule(allow=["use"]), "rules[0].allow[0]", "'use' cannot be named"),
    (
        "tubes-string",
        with_rule(tubes="t", allow=["all"]),
        "rules[0].tubes",
        "expected a list of tube patterns",
    ),
    ("tubes-empty", with_rule(tubes=[], allow=["all"]), "rules[0].tubes", "at least one tube"),
    (
        "tube-space",
        with_rule(tubes=["ok", "a b"], allow=["all"]),
        "rules[0].tubes[1]",
        "invalid character ' '",
    ),
    (
        "tube-colon",
        with_rule(tubes=["a:b"], allow=["all"]),
        "rules[0].tubes[0]",
        "invalid character ':'",
    ),
    (
        "tube-unicode",
        with_rule(tubes=["café"], allow=["all"]),
        "rules[0].tubes[0]",
        "invalid character 'é'",
    ),
    (
        "tube-dash",
        with_rule(tubes=["-x*"], allow=["all"]),
        "rules[0].tubes[0]",
        "never begin with '-'",
    ),
    (
        "tube-too-long",
        with_rule(tubes=["a" * 201], allow=["all"]),
        "rules[0].tubes[0]",
        "at most 200",
    ),
    ("tube-int", with_rule(tubes=["a", 5], allow=["all"]), "rules[0].tubes[1]", "got an integer"),
    ("tube-empty", with_rule(tubes=[""], allow=["all"]), "rules[0].tubes[0]", "must not be empty"),
    (
        "put-on-deny",
        with_rule(deny=["produce"], put={"max_body": 1}),
        "rules[0].put",
        "belong on allow rules",
    ),
    (
        "put-without-produce",
        with_rule(allow=["consume"], put={"max_body": 1}),
        "rules[0].put",
        "need a rule that allows put",
    ),
    ("put-not-mapping", with_rule(allow=["put"], put=[1]), "rules[0].put", "expected a mapping"),
    ("put-empty", with_rule(allow=["put"], put={}), "rules[0].put", "empty producer constraints"),
    (
        "put-unknown-key",
        with_rule(allow=["all"], put={"max_bdy": 1}),
        "rules[0].put.max_bdy",
        "(did you mean 'max_body'?)",
    ),
    (
        "put-max-body-bool",
        with_rule(allow=["all"], put={"max_body": True}),
        "rules[0].put.max_body",
        "expected an integer, got a boolean",
    ),
    (
        "put-max-body-negative",
        with_rule(allow=["all"], put={"max_body": -1}),
        "rules[0].put.max_body",
        "out of range",
    ),
    (
        "put-priority-one",
        with_rule(allow=["all"], put={"priority": [1]}),
        "rules[0].put.priority",
        "expected [low, high], got 1 values",
    ),
    (
        "put-priority-scalar",
        with_rule(allow=["all"], put={"priority": 5}),
        "rules[0].put.priority",
        "expected a list of two integers",
    ),
    (
        "put-priority-negative",
        with_rule(allow=["all"], put={"priority": [0, -1]}),
        "rules[0].put.priority[1]",
        "out of range",
    ),
    (
        "put-delay-float",
        with_rule(allow=["all"], put={"delay": [0.5, 3]}),
        "rules[0].put.delay[0]",
        "got a number",
    ),
    (
        "put-ttr-reversed",
        with_rule(allow=["all"], put={"ttr": [5, 1]}),
        "rules[0].put.ttr",
        "low 5 is greater than high 1",
    ),
    (
        "put-ttr-too-big",
        with_rule(allow=["all"], put={"ttr": [0, 2**32]}),
        "rules[0].put.ttr[1]",
        "out of range",
    ),
]


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [pytest.param(d, k, r, id=i) for i, d, k, r in REJECTIONS],
)
def test_parse_rejects(data: object, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_acl(copy.deepcopy(data), "acl.yaml")
    err = info.value
    assert err.source == "acl.yaml"
    assert err.key == key
    assert reason in err.reason
    assert str(err).startswith(f"acl.yaml: {key}: " if key else "acl.yaml: ")


def test_enough_rejection_cases() -> None:
    assert len(REJECTIONS) >= 20


def test_verb_error_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        parse_acl(with_rule(allow=["fly"]), "acl.yaml")
    assert "expected one of produce, consume, inspect, manage, server, all" in info.value.reason
    assert "kick-job" in info.value.reason


def test_accepted_forms() -> None:
    doc = {
        "principals": [
            {"name": "a.b@c:d/e+f-g_h", "match": {"fingerprint": "SHA256:" + ":".join(["AB"] * 32)}}
        ],
        "rules": [
            {"principal": "*", "deny": ["server"]},  # tubes default to "*"
            {"principal": "a.b@c:d/e+f-g_h", "tubes": ["x**y", "a" * 200], "allow": ["all"]},
            {
                "principal": "*",
                "tubes": ["t"],
                "allow": ["put", "delete", "stats-job"],
                "put": {"ttr": [1, 2**32 - 1]},
            },
        ],
        # an empty rules list is valid too (tested separately)
    }
    pol = parse_acl(doc, "ok")
    assert pol.principal_for(ident(fingerprint=FP_A)) == "a.b@c:d/e+f-g_h"
    assert pol.decide("a.b@c:d/e+f-g_h", "put", "produce", "xanythingy").allowed
    assert pol.decide("a.b@c:d/e+f-g_h", "put", "produce", "xy").allowed
    assert not pol.decide("a.b@c:d/e+f-g_h", "stats", "server", None).allowed
    empty = parse_acl({"principals": [], "rules": []}, "empty")
    assert empty.principals == ()
    assert empty.principal_for(ident(cn="x")) is None


# --------------------------------------------------------------------------------------------
# Lint
# --------------------------------------------------------------------------------------------


def lint(doc: dict[str, Any]) -> list[str]:
    return lint_acl(parse_acl(doc, "lint.yaml"))


def test_lint_clean(policy: Policy, match_policy: Policy) -> None:
    assert lint_acl(policy) == []
    assert lint(UNIFORM_ACL) == [
        "rules[5]: server never applies here: stats is server-wide and only matches rules "
        'whose tubes include "*"',
    ]


def test_lint_empty() -> None:
    warnings = lint({"principals": [], "rules": []})
    assert any("no principals" in w for w in warnings)
    assert any("no rules" in w for w in warnings)


def test_lint_principal_without_rules() -> None:
    doc: dict[str, Any] = {
        "principals": [{"name": "a", "match": {"cn": "a"}}, {"name": "b", "match": {"cn": "b"}}],
        "rules": [{"principal": "a", "allow": ["all"]}],
    }
    assert lint(doc) == [
        "principals[1] (b) has no rules (none names it and there is no '*' rule): everything "
        "it sends beyond connection-local commands is denied"
    ]
    doc["rules"].append({"principal": "*", "tubes": ["pub"], "allow": ["inspect"]})
    assert lint(doc) == []


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        ({"cn": "a", "ou": "X"}, {"ou": "X", "cn": "a"}, "has the same match block"),
        ({"cn": ["a", "b"]}, {"cn": ["b", "a"]}, "has the same match block"),
        ({"cn": "*"}, {"cn": "ops-*"}, "matches every certificate it matches"),
        ({"cn": "ops-*"}, {"cn": "ops-a", "ou": "SRE"}, "matches every certificate it matches"),
        ({"ou": ["A", "B"]}, {"ou": "B"}, "matches every certificate it matches"),
        ({"dns": "*.x.com"}, {"dns": "a.x.com"}, "matches every certificate it matches"),
        ({"uri": "spiffe://t/**"}, {"uri": "spiffe://t/a/b"}, "matches every"),
        ({"ip": "10.0.0.0/8"}, {"ip": "10.1.0.0/16"}, "matches every certificate it matches"),
        ({"fingerprint": FP_A}, {"fingerprint": FP_A.upper().replace("SHA", "sha")}, "same"),
    ],
)
def test_lint_unreachable_principal(
    first: dict[str, Any], second: dict[str, Any], reason: str
) -> None:
    doc = {
        "principals": [{"name": "one", "match": first}, {"name": "two", "match": second}],
        "rules": [
            {"principal": "one", "allow": ["inspect"]},
            {"principal": "two", "allow": ["all"]},
        ],
    }
    warnings = lint(doc)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("principals[1] (two) can never match: principals[0] (one) ")
    assert reason in warnings[0]
    assert warnings[1] == "rules[1] can never match: principal 'two' is unreachable"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"cn": "a", "ou": "X"}, {"cn": "a"}),  # the earlier one is narrower
        ({"cn": "ops-*"}, {"cn": "*"}),
        ({"dns": "*.x.com"}, {"dns": "**.x.com"}),  # '**' is broader than '*'
        ({"dns": "*.x.com"}, {"dns": "*.*.x.com"}),
        ({"uri": "spiffe://t/*"}, {"uri": "spiffe://t/**"}),
        ({"ip": "10.1.0.0/16"}, {"ip": "10.0.0.0/8"}),
        ({"ip": "10.0.0.0/8"}, {"ip": "2001:db8::/32"}),
        ({"fingerprint": FP_A}, {"spki": SPKI_A}),
        ({"cn": "a"}, {"cn": ["a", "b"]}),
    ],
)
def test_lint_reachable_principal(first: dict[str, Any], second: dict[str, Any]) -> None:
    doc = {
        "principals": [{"name": "one", "match": first}, {"name": "two", "match": second}],
        "rules": [{"principal": "*", "allow": ["inspect"]}],
    }
    assert lint(doc) == []


@pytest.mark.parametrize(
    ("allow", "denies", "shadowed"),
    [
        (["produce"], [("p", ["all"])], True),
        (["produce"], [("*", ["produce"])], True),
        (["put"], [("p", ["produce"])], True),
        (["put", "reserve"], [("p", ["produce"])], False),
        (["put", "reserve"], [("p", ["produce"]), ("*", ["consume"])], True),
        (["delete"], [("p", ["consume"])], False),  # delete of others is manage
        (["delete"], [("p", ["consume", "manage"])], True),
        (["delete"], [("p", ["delete"])], True),
        (["all"], [("p", ["produce", "consume", "inspect", "manage", "server"])], True),
        (["all"], [("p", ["produce", "consume", "inspect", "manage"])], False),
        (["inspect"], [("p", [c for c, v in ALL_25.items() if v == "inspect"])], True),
        (["consume"], [("p", [c for c, v in ALL_25.items() if v == "consume"])], True),
        (["manage"], [("p", [c for c, v in ALL_25.items() if v == "manage"])], False),
        (["produce"], [("q", ["all"])], False),  # another principal's deny
    ],
)
def test_lint_allow_shadowed_by_deny(
    allow: list[str], denies: list[tuple[str, list[str]]], shadowed: bool
) -> None:
    doc: dict[str, Any] = {
        "principals": [{"name": "p", "match": {"cn": "p"}}, {"name": "q", "match": {"cn": "q"}}],
        "rules": [{"principal": "p", "tubes": ["t"], "allow": allow}]
        + [{"principal": who, "deny": what} for who, what in denies]
        + [{"principal": "q", "allow": ["inspect"]}],
    }
    warnings = [w for w in lint(doc) if w.startswith("rules[0]")]
    if shadowed:
        assert warnings == [
            "rules[0] never allows anything: every entry is denied on every tube by a deny "
            "rule for 'p' or '*'"
        ]
    else:
        assert warnings == []


def test_lint_deny_with_tube_does_not_shadow() -> None:
    doc = {
        "principals": [{"name": "p", "match": {"cn": "p"}}],
        "rules": [
            {"principal": "p", "tubes": ["t"], "allow": ["all"]},
            {"principal": "p", "tubes": ["t"], "deny": ["all"]},
        ],
    }
    assert lint(doc) == []  # only "*"-tube denies are considered (conservative)


def test_lint_server_on_named_tube() -> None:
    doc = {
        "principals": [{"name": "p", "match": {"cn": "p"}}],
        "rules": [{"principal": "p", "tubes": ["t"], "allow": ["stats", "server", "peek"]}],
    }
    assert lint(doc) == [
        "rules[0]: stats, server never applies here: stats is server-wide and only matches "
        'rules whose tubes include "*"'
    ]


# --------------------------------------------------------------------------------------------
# The shipped files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["acl.example.yaml", "acl.yaml"])
def test_shipped_acl_files_load_and_lint_clean(name: str) -> None:
    path = ROOT / "config" / name
    policy = parse_acl(yaml.safe_load(path.read_text()), str(path))
    assert policy.principals
    assert lint_acl(policy) == []


def test_example_file_behaves_as_documented() -> None:
    path = ROOT / "config" / "acl.example.yaml"
    pol = parse_acl(yaml.safe_load(path.read_text()), str(path))
    billing = pol.principal_for(ident(uris=("spiffe://example.org/billing/api",)))
    assert billing == "billing"
    put = pol.decide("billing", "put", "produce", "invoices.eu")
    assert put.allowed and put.limits == PutLimits(4096, (0, 1024), (0, 3600), (1, 600))
    assert not pol.decide("billing", "reserve", "consume", "invoices").allowed
    assert pol.principal_for(ident(cn="ops-bob", ous=("SRE",))) == "ops"
    assert pol.decide("ops", "stats", "server", None).allowed
    assert not pol.decide("ops", "peek-ready", "inspect", "secrets.db").allowed
    assert pol.principal_for(ident(dns=("a.b.workers.example.com",))) == "workers"
    assert pol.decide("workers", "put", "produce", "jobs.(high)").allowed
    assert pol.principal_for(ident(ips=("10.20.1.1",))) == "batch-hosts"
    assert pol.principal_for(ident(cn="invoice-worker-3", ous=("Payments",))) == "invoice-worker"
    assert pol.decide("invoice-worker", "kick-job", "manage", "invoices").allowed
    assert not pol.decide("invoice-worker", "pause-tube", "manage", "invoices").allowed
    assert pol.principal_for(ident(uris=("spiffe://example.org/ns/a/b/sa/reporting",))) == (
        "reporting"
    )
    dev_path = ROOT / "config" / "acl.yaml"
    dev = parse_acl(yaml.safe_load(dev_path.read_text()), str(dev_path))
    assert dev.principal_for(ident(cn="dev-client")) == "dev-client"
    assert dev.uniform("dev-client", "delete", DELETE_OTHER_VERB)
    assert dev.decide("dev-client", "stats", "server", None).allowed


# --------------------------------------------------------------------------------------------
# Glob matchers and performance
# --------------------------------------------------------------------------------------------


def _star_oracle(pattern: str, text: str) -> bool:
    regex = ".*".join(re.escape(p) for p in pattern.split("*"))
    return re.fullmatch(regex, text, re.DOTALL) is not None


def _segment_oracle(pattern: str, sep: str, text: str) -> bool:
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        ".*" if p == "**" else f"[^{re.escape(sep)}]*" if p == "*" else re.escape(p) for p in parts
    )
    return re.fullmatch(regex, text, re.DOTALL) is not None


@settings(max_examples=400, deadline=None)
@given(st.text("ab*.", max_size=8), st.text("ab.*", max_size=10))
def test_star_glob_matches_oracle(pattern: str, text: str) -> None:
    assert StarGlob(pattern)(text) == _star_oracle(pattern, text)


@settings(max_examples=400, deadline=None)
@given(
    st.text("ab*/", max_size=8).filter(lambda p: "***" not in p),
    st.text("ab/", max_size=10),
)
def test_segment_glob_matches_oracle(pattern: str, text: str) -> None:
    assert SegmentGlob(pattern, "/")(text) == _segment_oracle(pattern, "/", text)


def _traced_steps(call: Callable[[], object]) -> int:
    """Python line events executed by ``call()``: a deterministic measure of work (no clock)."""
    steps = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return steps


def test_no_backtracking_blowup() -> None:
    """Adversarial patterns (many stars, no match) cost work linear in the input: doubling the
    input at most about doubles the steps (a backtracking matcher grows polynomially)."""
    tube_pattern = "*a" * 40 + "*b"
    doc = {
        "principals": [{"name": "p", "match": {"uri": "*a" * 30 + "*b", "cn": "*a" * 40 + "*b"}}],
        "rules": [{"principal": "p", "tubes": [tube_pattern], "allow": ["all"]}],
    }
    pol = parse_acl(doc, "slow")
    assert not pol.decide("p", "put", "produce", "a" * 200).allowed
    assert pol.principal_for(ident(cn="a" * 300, uris=("a" * 300,))) is None

    star, segment = StarGlob("*a" * 40 + "*b"), SegmentGlob("*a" * 30 + "*b", "/")
    for size in (200, 400):  # the matchers are cached per name in the policy: call them directly
        assert not star("a" * size) and not segment("a" * size)
    small = _traced_steps(lambda: (star("a" * 200), segment("a" * 200)))
    large = _traced_steps(lambda: (star("a" * 800), segment("a" * 800)))
    assert large <= 4.5 * small, (small, large)


# --------------------------------------------------------------------------------------------
# Randomized: deny always wins, uniform() is sound
# --------------------------------------------------------------------------------------------

TUBE_ALPHABET = "ab.$(-_"
tube_names = st.text(TUBE_ALPHABET, min_size=1, max_size=8).filter(lambda t: t[0] != "-")
tube_patterns = st.text(TUBE_ALPHABET + "**", min_size=1, max_size=6).filter(lambda t: t[0] != "-")
ENTRY_CHOICES = [*VERBS, "all", "put", "reserve", "delete", "kick", "stats", "peek", "kick-job"]
TUBE_VERBS = ("produce", "consume", "inspect", "manage")
COMBOS = [(c, v) for c, v in COMMAND_VERBS.items() if v in TUBE_VERBS] + [("delete", "manage")]

rule_strategy = st.fixed_dictionaries(
    {
        "principal": st.sampled_from(["p", "q", "*"]),
        "tubes": st.lists(st.one_of(tube_patterns, st.just("*")), min_size=1, max_size=3),
        "effect": st.sampled_from(["allow", "deny"]),
        "entries": st.lists(st.sampled_from(ENTRY_CHOICES), min_size=1, max_size=3),
    }
)


def _build(rules: list[dict[str, Any]]) -> Policy:
    doc = {
        "principals": [{"name": "p", "match": {"cn": "p"}}, {"name": "q", "match": {"cn": "q"}}],
        "rules": [
            {"principal": r["principal"], "tubes": r["tubes"], r["effect"]: r["entries"]}
            for r in rules
        ],
    }
    return parse_acl(doc, "random")


def _rule_matches(rule: dict[str, Any], command: str, verb: str, tube: str | None) -> bool:
    if rule["principal"] not in ("p", "*"):
        return False
    entries = rule["entries"]
    if not ("all" in entries or verb in entries or command in entries):
        return False
    if tube is None:  # only the bare "*" (runs of stars collapse: "**" is "*")
        return any(set(t) == {"*"} for t in rule["tubes"])
    return any(_star_oracle(t, tube) for t in rule["tubes"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(rule_strategy, max_size=6),
    st.lists(st.one_of(tube_names, st.none()), min_size=1, max_size=5),
)
def test_random_policies_deny_wins_and_uniform_is_sound(
    rules: list[dict[str, Any]], tubes: list[str | None]
) -> None:
    pol = _build(rules)
    for tube in tubes:
        for command, verb in [*COMBOS, ("stats", "server")]:
            matching = [r for r in rules if _rule_matches(r, command, verb, tube)]
            denied = any(r["effect"] == "deny" for r in matching)
            expected = not denied and any(r["effect"] == "allow" for r in matching)
            decision = pol.decide("p", command, verb, tube)
            if denied:
                assert not decision.allowed, (command, verb, tube, decision)
                assert decision.rule.startswith("rules[")
            assert decision.allowed == expected, (command, verb, tube, decision)
            if pol.uniform("p", command, verb):
                assert decision.allowed, (command, verb, tube, decision)
        if tube is not None:
            any_right = pol.any_right("p", tube)
            assert any_right.allowed == any(pol.decide("p", c, v, tube).allowed for c, v in COMBOS)
            if pol.uniform("p", "use", ANY):
                assert any_right.allowed

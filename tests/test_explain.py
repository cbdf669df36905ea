"""Tests for proxy.explain: the decision ``explain`` prints, as a table over the pure function
(the command line around it is tested in test_cli.py and test_shadow_live.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pki_helpers import identity

from proxy.acl import Policy, parse_acl
from proxy.explain import Explanation, Query, explain_command, explain_shadow
from proxy.identity import Identity

ACL: dict[str, Any] = {
    "principals": [
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "worker", "match": {"cn": "worker", "ou": "jobs"}},
    ],
    "rules": [
        {"principal": "billing", "tubes": ["invoices"], "allow": ["produce", "inspect"]},
        {"principal": "worker", "tubes": ["invoices"], "allow": ["consume"]},
        {"principal": "*", "tubes": ["secrets.*"], "deny": ["all"]},
    ],
}
# The shadow: billing may also consume from invoices.
SHADOW: dict[str, Any] = {
    **ACL,
    "rules": [
        *ACL["rules"],
        {"principal": "billing", "tubes": ["invoices"], "allow": ["consume"]},
    ],
}


def ident(cn: str | None = None, **fields: Any) -> Identity:
    return identity(
        subject=f"CN={cn}" if cn else "",
        cn=cn,
        fingerprint="sha256:" + "ab" * 32,
        spki="sha256:" + "cd" * 32,
        **fields,
    )


def ask(policy: Policy, line: str, **kwargs: Any) -> Explanation:
    return explain_command(policy, Query(line, **kwargs))


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_acl(ACL, "acl.yaml")


BILLING = ident(uris=("spiffe://example.org/billing/api",))

# (case, who (Identity or principal name), command line, tube, allowed, lines that must appear)
CASES: list[tuple[str, Identity | str, str, str | None, bool, list[str]]] = [
    (
        "allow put",
        "billing",
        "put 0 0 60 5",
        "invoices",
        True,
        ["principal: billing", "command: put (produce) on tube 'invoices' (the used tube)"],
    ),
    (
        "allow by certificate",
        BILLING,
        "put 0 0 60 5",
        "invoices",
        True,
        ["principal: billing (principals[0])"],
    ),
    (
        "deny by default",
        "billing",
        "reserve",
        "invoices",
        False,
        [
            "decision: DENY by default deny (no rule allows consume on 'invoices' for billing): "
            "the client gets UNKNOWN_COMMAND"
        ],
    ),
    (
        "explicit deny beats allow",
        "worker",
        "watch secrets.db",
        None,
        False,
        ["command: watch (consume) on tube 'secrets.db' (named in the command)"],
    ),
    (
        "connection-local",
        "worker",
        "list-tube-used",
        None,
        True,
        ["command: list-tube-used (connection-local)"],
    ),
    ("malformed", "worker", "put 0 0 60", None, False, []),
    ("too big", "billing", "put 0 0 60 70000", "invoices", False, []),
    (
        "no principal",
        ident(cn="worker", ous=("web",)),
        "stats",
        None,
        False,
        ["no principal matches: connection refused"],
    ),
    (
        "refused certificate",
        ident(cn="x", refusal="two CNs"),
        "stats",
        None,
        False,
        ["refused: two CNs"],
    ),
]


@pytest.mark.parametrize(
    ("who", "line", "tube", "allowed", "expect"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_explain_table(
    policy: Policy,
    who: Identity | str,
    line: str,
    tube: str | None,
    allowed: bool,
    expect: list[str],
) -> None:
    result = ask(
        policy,
        line,
        identity=who if isinstance(who, Identity) else None,
        principal=who if isinstance(who, str) else None,
        tube=tube,
    )
    assert result.allowed is allowed
    assert result.usage_error is None
    for wanted in expect:
        assert wanted in result.lines
    assert any(x.startswith("decision: ALLOW") for x in result.lines) is allowed


def test_no_principal_gives_a_reason_per_principal(policy: Policy) -> None:
    result = ask(policy, "stats", identity=ident(cn="worker", ous=("web",)))
    assert not result.allowed
    reasons = result.lines[result.lines.index("no principal matches: connection refused") + 1 :]
    assert len(reasons) == 2  # one per principal, in file order
    assert reasons[0].startswith("  principals[0] billing: ")
    assert reasons[1].startswith("  principals[1] worker: ")
    assert "ou" in reasons[1]


def test_malformed_and_too_big_say_why(policy: Policy) -> None:
    bad = ask(policy, "put 0 0 60", principal="worker")
    assert bad.lines[-1].startswith("rejected: ")
    big = ask(policy, "put 0 0 60 70000", principal="billing", max_job_size=1000)
    assert big.lines[-1] == (
        "rejected: body of 70000 bytes exceeds limits.max_job_size 1000: the client gets "
        "JOB_TOO_BIG"
    )


def test_denied_reply_follows_acl_denial_reply(policy: Policy) -> None:
    explicit = ask(
        policy, "put 0 0 60 5", principal="worker", tube="invoices", denial_reply="explicit"
    )
    assert explicit.lines[-1].endswith("the client gets NOT_PERMITTED")
    assert not explicit.allowed


def test_unknown_principal_name_is_noted(policy: Policy) -> None:
    result = ask(policy, "stats", principal="nobody")
    assert result.lines[0].startswith("note: 'nobody' is not a principal defined in acl.yaml")
    assert not result.allowed


def test_job_command_needs_the_tube_unless_uniform(policy: Policy) -> None:
    needs = ask(policy, "delete 5", principal="billing")
    assert (
        needs.usage_error
        == "the decision for delete depends on the job's tube; give it with --tube"
    )
    given = ask(policy, "delete 5", principal="billing", tube="secrets.x")
    assert given.usage_error is None
    assert not given.allowed


def test_exactly_one_of_identity_or_principal() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Query("stats")
    with pytest.raises(ValueError, match="exactly one"):
        Query("stats", identity=BILLING, principal="billing")


@pytest.mark.parametrize(
    ("line", "mismatch"),
    [("reserve", True), ("put 0 0 60 5", False), ("watch secrets.x", False)],
)
def test_shadow_mismatch(policy: Policy, line: str, mismatch: bool) -> None:
    shadow = parse_acl(SHADOW, "shadow.yaml")
    both = explain_shadow(policy, shadow, Query(line, principal="billing", tube="invoices"))
    assert both.mismatch is mismatch
    assert isinstance(both.enforced, Explanation)
    if mismatch:
        assert (both.enforced.allowed, both.shadow.allowed) == (False, True)

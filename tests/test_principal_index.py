"""The indexed principal lookup (``Policy.principal_rule``) against the simple ordered scan.

Principals with an exact (glob-free) condition on cn, ou, dns, uri, fingerprint, spki or issuer
are found through an index; the rest (globs, ``ip``) are checked in file order. The property
test draws principal lists that mix exact and glob patterns, several keys per match block,
case variants, refused URIs and non-ASCII DNS names, and identities from the same small pools
(so that most of them match something), and checks that the lookup, with and without its
per-identity cache, names the same principal as the first-match scan. The fixed cases pin the
orderings a wrong merge would get wrong; the counting cases show that finding the last of
2,000 exact principals evaluates a constant number of conditions (counted, never timed).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki_helpers import identity as make_identity

from proxy.acl import Policy, parse_acl
from proxy.acl.policy import Condition
from proxy.identity import Identity

FP = ["sha256:" + c * 32 for c in ("ab", "cd", "ef")]
SPKI = ["sha256:" + c * 32 for c in ("12", "34", "56")]
CA_DN = ["CN=CA A,O=Ex", "CN=CA B,O=Ex"]
CA_FP = ["sha256:" + c * 32 for c in ("0a", "0b")]
KELVIN = "\u212a"


#: An identity whose fingerprint and SPKI are the pools' third entries unless given.
ident = functools.partial(make_identity, fingerprint=FP[2], spki=SPKI[2])


def policy(*matches: dict[str, Any]) -> Policy:
    principals = [{"name": f"p{i}", "match": m} for i, m in enumerate(matches)]
    return parse_acl({"principals": principals, "rules": []}, "<test>")


def scan(pol: Policy, identity: Identity) -> str | None:
    found = pol._principal_scan(identity)
    return None if found is None else found.name


# --------------------------------------------------------------------------------------------
# Property: indexed lookup == ordered scan
# --------------------------------------------------------------------------------------------

# Pattern pools per key: exact values, globs, and spellings the parser normalizes (case,
# colon-separated pins), so index keys and identity values meet in their compared forms.
PATTERNS: dict[str, list[str]] = {
    "cn": ["a", "b", "ab", "A", "a*", "*b", "*", "a*b"],
    "ou": ["eng", "ops", "Eng", "e*", "*"],
    "dns": ["a.ex", "b.ex", "x.a.ex", "A.EX", "*.ex", "**.ex", "*.a.ex", "**"],
    "uri": [
        "spiffe://ex/a",
        "spiffe://ex/b",
        "SPIFFE://EX/a",
        "spiffe://ex/a/b",
        "spiffe://ex/*",
        "spiffe://ex/**",
        "spiffe://*/a",
        "spiffe://ex/%2F",
    ],
    "ip": ["10.0.0.0/8", "10.1.2.3/32", "192.168.0.0/16"],
    "fingerprint": [
        FP[0],
        FP[1],
        FP[0].upper(),
        "SHA256:" + ":".join(FP[1][7:][i : i + 2] for i in range(0, 64, 2)),
    ],
    "spki": [SPKI[0], SPKI[1], SPKI[1].upper()],
    "issuer": [CA_DN[0], CA_DN[1], CA_FP[0], CA_FP[1].upper()],
}

match_blocks = st.dictionaries(
    st.sampled_from(sorted(PATTERNS)),
    st.none(),
    min_size=1,
    max_size=3,
).flatmap(
    lambda keys: st.fixed_dictionaries(
        {
            k: st.one_of(
                st.sampled_from(PATTERNS[k]),
                st.lists(st.sampled_from(PATTERNS[k]), min_size=1, max_size=3),
            )
            for k in keys
        }
    )
)

identities = st.builds(
    ident,
    cn=st.sampled_from([None, "a", "b", "ab", "A", "ba", "axb"]),
    ous=st.lists(st.sampled_from(["eng", "ops", "Eng", "x"]), max_size=2).map(tuple),
    dns=st.lists(
        st.sampled_from(["a.ex", "A.Ex", "b.ex", "x.a.ex", "y.x.a.ex", f"{KELVIN}.ex", "a.ex."]),
        max_size=2,
    ).map(tuple),
    uris=st.lists(
        st.sampled_from(
            [
                "spiffe://ex/a",
                "SPIFFE://Ex/a",
                "spiffe://ex/A",
                "spiffe://ex/a/b",
                "spiffe://ex/./a",
                "spiffe://ex/%41",
                "spiffe://ex/%2f",
                "spiffe://u@ex/a",
                "spiffe://ex/b",
            ]
        ),
        max_size=2,
    ).map(tuple),
    ips=st.lists(st.sampled_from(["10.1.2.3", "10.9.9.9", "192.168.1.1", "::1"]), max_size=2).map(
        tuple
    ),
    fingerprint=st.sampled_from(FP),
    spki=st.sampled_from(SPKI),
    issuer=st.sampled_from([None, *CA_DN]),
    issuer_fingerprint=st.sampled_from([None, *CA_FP]),
    refusal=st.sampled_from([None, None, None, "two common names"]),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(match_blocks, min_size=0, max_size=12), st.lists(identities, max_size=12))
def test_indexed_lookup_equals_ordered_scan(
    blocks: list[dict[str, Any]], idents: list[Identity]
) -> None:
    pol = policy(*blocks)
    for identity in idents:
        expected = scan(pol, identity)
        found = pol._principal_lookup(identity)
        assert (None if found is None else found.name) == expected
        for _ in range(2):  # first call fills the cache, second reads it
            assert pol.principal_for(identity) == expected
            rule = pol.principal_rule(identity)
            assert rule == (None if expected is None else (expected, f"principals[{expected[1:]}]"))
        if identity.refusal is not None:
            assert expected is None


# --------------------------------------------------------------------------------------------
# Orderings and comparison forms, fixed
# --------------------------------------------------------------------------------------------


def test_earlier_glob_beats_later_exact() -> None:
    pol = policy({"cn": "a*"}, {"cn": "ab"})
    assert pol.principal_for(ident(cn="ab")) == "p0"


def test_earlier_exact_beats_later_glob() -> None:
    pol = policy({"cn": "ab"}, {"cn": "a*"})
    assert pol.principal_for(ident(cn="ab")) == "p0"
    assert pol.principal_for(ident(cn="ax")) == "p1"


def test_exact_candidate_that_fails_another_key_falls_through() -> None:
    # p0 is indexed under its fingerprint pin but also needs cn "b"; p1 (glob) comes next,
    # p2 (exact cn) last.
    pol = policy({"fingerprint": FP[0], "cn": "b"}, {"cn": "x*"}, {"cn": "a"})
    assert pol.principal_for(ident(cn="a", fingerprint=FP[0])) == "p2"
    assert pol.principal_for(ident(cn="b", fingerprint=FP[0])) == "p0"
    assert pol.principal_for(ident(cn="xa", fingerprint=FP[0])) == "p1"
    assert pol.principal_for(ident(cn="c", fingerprint=FP[0])) is None


def test_several_exact_candidates_first_in_file_order_wins() -> None:
    pol = policy({"dns": "a.ex"}, {"uri": "spiffe://ex/a"}, {"cn": "a"}, {"fingerprint": FP[0]})
    both = ident(cn="a", dns=("a.ex",), uris=("spiffe://ex/a",), fingerprint=FP[0])
    assert pol.principal_for(both) == "p0"
    assert pol.principal_for(ident(cn="a", fingerprint=FP[0])) == "p2"
    assert pol.principal_for(ident(fingerprint=FP[0])) == "p3"


def test_refused_identity_matches_no_indexed_or_glob_principal() -> None:
    pol = policy({"fingerprint": FP[0]}, {"cn": "*"})
    assert pol.principal_for(ident(cn="a", fingerprint=FP[0])) == "p0"
    assert pol.principal_for(ident(cn="a", fingerprint=FP[0], refusal="no clientAuth")) is None
    assert pol.principal_rule(ident(cn="a", refusal="two common names")) is None


@pytest.mark.parametrize(
    ("pattern", "dns", "expected"),
    [
        ("a.ex", "A.EX", "p0"),  # ASCII case folding
        ("A.Ex", "a.ex", "p0"),  # the pattern is folded too
        ("k.ex", f"{KELVIN}.ex", None),  # the Kelvin sign is not a "k"
        ("a.ex", "a.ex.", None),  # no trailing-dot equivalence
        ("a.ex", "b.a.ex", None),
    ],
)
def test_indexed_dns_uses_the_match_form(pattern: str, dns: str, expected: str | None) -> None:
    assert policy({"dns": pattern}).principal_for(ident(dns=(dns,))) == expected


@pytest.mark.parametrize(
    ("pattern", "uri", "expected"),
    [
        ("spiffe://ex/a", "SPIFFE://EX/a", "p0"),  # scheme and host fold
        ("spiffe://ex/a", "spiffe://ex/A", None),  # the path keeps its case
        ("spiffe://ex/a", "spiffe://ex/./a", None),  # dot segment: refused
        ("spiffe://ex/A", "spiffe://ex/%41", None),  # encoded unreserved character: refused
        ("spiffe://ex/%2f", "spiffe://ex/%2F", "p0"),  # escapes compare in upper-case hex
        ("spiffe://ex/a", "spiffe://u@ex/a", None),  # userinfo: refused
    ],
)
def test_indexed_uri_uses_the_match_form(pattern: str, uri: str, expected: str | None) -> None:
    assert policy({"uri": pattern}).principal_for(ident(uris=(uri,))) == expected


def test_indexed_pins_and_issuer() -> None:
    colons = "SHA256:" + ":".join(FP[0][7:][i : i + 2].upper() for i in range(0, 64, 2))
    pol = policy(
        {"fingerprint": colons},
        {"spki": SPKI[0].upper()},
        {"issuer": CA_DN[1]},
        {"issuer": CA_FP[0]},
    )
    assert pol.principal_for(ident(fingerprint=FP[0])) == "p0"
    assert pol.principal_for(ident(spki=SPKI[0])) == "p1"
    assert pol.principal_for(ident(issuer=CA_DN[1], issuer_fingerprint=CA_FP[1])) == "p2"
    assert pol.principal_for(ident(issuer=CA_DN[0], issuer_fingerprint=CA_FP[0])) == "p3"
    assert pol.principal_for(ident(issuer=CA_DN[0], issuer_fingerprint=CA_FP[1])) is None
    assert pol.principal_for(ident()) is None  # unknown issuer never matches


def test_ip_only_principals_stay_in_order_with_indexed_ones() -> None:
    pol = policy({"cn": "a"}, {"ip": "10.0.0.0/8"}, {"cn": "b"})
    assert pol.principal_for(ident(cn="b", ips=("10.1.2.3",))) == "p1"
    assert pol.principal_for(ident(cn="a", ips=("10.1.2.3",))) == "p0"
    assert pol.principal_for(ident(cn="b", ips=("11.1.2.3",))) == "p2"


def test_cache_is_per_identity_and_per_policy() -> None:
    first = policy({"cn": "a"})
    same_cert_other_issuer = ident(cn="a", issuer=CA_DN[1])
    assert first.principal_for(ident(cn="a", issuer=CA_DN[0])) == "p0"
    # Same certificate values but verified through another CA: a new lookup, not the cache's.
    bound = policy({"cn": "a", "issuer": CA_DN[0]})
    assert bound.principal_for(ident(cn="a", issuer=CA_DN[0])) == "p0"
    assert bound.principal_for(same_cert_other_issuer) is None
    # A reloaded policy (a new object) answers from its own principals.
    reloaded = policy({"cn": "b"})
    assert reloaded.principal_for(ident(cn="a", issuer=CA_DN[0])) is None


def test_cache_is_bounded() -> None:
    pol = policy({"cn": "*"})
    for i in range(5000):
        assert pol.principal_for(ident(cn=f"c{i}")) == "p0"
    assert 0 < len(pol._principal_cache) <= 4096


# --------------------------------------------------------------------------------------------
# Cost does not grow with the number of principals (counted, not timed)
# --------------------------------------------------------------------------------------------


def _count_holds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = Condition.holds

    def counting(self: Condition, identity: Identity) -> bool:
        calls[0] += 1
        return original(self, identity)

    monkeypatch.setattr(Condition, "holds", counting)
    return calls


@pytest.mark.parametrize("key", ["cn", "uri", "dns", "fingerprint"])
def test_last_of_2000_exact_principals_checks_one_candidate(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    def value(i: int) -> str:
        if key == "cn":
            return f"svc-{i}"
        if key == "uri":
            return f"spiffe://ex/svc-{i}"
        if key == "dns":
            return f"svc-{i}.ex"
        return f"sha256:{i:064x}"

    pol = policy(*({key: value(i), "ou": "eng"} for i in range(2000)))
    by_key: dict[str, dict[str, Any]] = {
        "cn": {"cn": value(1999)},
        "uri": {"uris": (value(1999),)},
        "dns": {"dns": (value(1999),)},
        "fingerprint": {"fingerprint": value(1999)},
    }
    kwargs = by_key[key]
    calls = _count_holds(monkeypatch)
    assert pol._principal_lookup(ident(ous=("eng",), **kwargs)) is not None
    assert calls[0] == 2  # the one candidate's two conditions
    calls[0] = 0
    assert pol._principal_lookup(ident(ous=("ops",), **kwargs)) is None
    assert 1 <= calls[0] <= 2  # the candidate fails on ou; nothing else is looked at
    calls[0] = 0
    assert pol._principal_scan(ident(ous=("eng",), **kwargs)) is not None
    assert calls[0] > 2000  # the reference scan walks every principal before it


def test_globs_before_the_match_are_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    pol = policy(*({"cn": f"g{i}-*"} for i in range(100)), {"cn": "target"})
    calls = _count_holds(monkeypatch)
    assert pol.principal_for(ident(cn="target")) == "p100"
    assert calls[0] == 101  # 100 globs in order, then the indexed candidate
    calls[0] = 0
    assert pol.principal_for(ident(cn="target")) == "p100"
    assert calls[0] == 0  # answered from the cache

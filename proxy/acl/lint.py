"""Read-only diagnostics over a valid ``Policy``: ``lint_acl`` and ``principal_mismatches``.

``lint_acl`` warns about principals that can never match (an earlier one takes every
certificate they would), principals without rules, rules that can never apply and allow rules a
deny cancels on every tube; ``principal_mismatches`` says, principal by principal, which match
conditions a certificate failed (for ``explain`` and refusal logs). Both read the policy only
through its public accessors (``compiled_principals``, ``compiled_rules``). Pure: no I/O imports.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from proxy.acl.globs import segment_matcher, star_matcher
from proxy.acl.policy import Condition, Policy, Principal
from proxy.acl.verbs import ALL, COMMAND_VERBS, DELETE_OTHER_VERB, VERBS

if TYPE_CHECKING:
    from proxy.identity import Identity

__all__ = ["lint_acl", "principal_mismatches"]


def _pattern_covers(key: str, broad: str, narrow: str) -> bool:
    """Every value matching pattern ``narrow`` also matches pattern ``broad`` (sound, partial)."""
    if broad == narrow:
        return True
    if key in ("cn", "ou"):
        # With a single kind of '*', a glob that matches the other glob's text literally
        # (its '*' absorbing the other's '*') matches every expansion of it.
        return star_matcher(broad)(narrow)
    if key in ("dns", "uri"):
        sep = "." if key == "dns" else "/"
        return "*" not in narrow and segment_matcher(broad, sep)(narrow)
    if key == "ip":
        b, n = ipaddress.ip_network(broad), ipaddress.ip_network(narrow)
        return b.version == n.version and n.subnet_of(b)  # type: ignore[arg-type]
    return False


def _condition_implied(broad: Condition, narrow: Condition) -> bool:
    """Whenever ``narrow`` holds, ``broad`` holds too (same key, every pattern covered)."""
    return broad.key == narrow.key and all(
        any(_pattern_covers(broad.key, b, n) for b in broad.patterns) for n in narrow.patterns
    )


def _shadowed_by(earlier: Principal, later: Principal) -> bool:
    """Every identity that matches ``later`` also matches ``earlier``."""
    return all(
        any(_condition_implied(e, l_) for l_ in later.conditions) for e in earlier.conditions
    )


def _same_match(a: Principal, b: Principal) -> bool:
    def norm(p: Principal) -> set[tuple[str, frozenset[str]]]:
        return {(c.key, frozenset(c.patterns)) for c in p.conditions}

    return norm(a) == norm(b)


def _entry_covered(entry: str, denied: set[str]) -> bool:
    """Is everything that allow-entry ``entry`` grants taken away by deny entries ``denied``?"""
    if ALL in denied or entry in denied:
        return True
    if entry == ALL:
        return all(_entry_covered(v, denied) for v in VERBS)
    if entry in VERBS:
        members = [c for c, v in COMMAND_VERBS.items() if v == entry]
        if entry == DELETE_OTHER_VERB:
            members.append("delete")
        return all(c in denied for c in members)
    verb = COMMAND_VERBS[entry]
    if entry == "delete":
        return {verb, DELETE_OTHER_VERB} <= denied
    return verb in denied


def lint_acl(policy: Policy) -> list[str]:
    """Warnings about a valid policy: unreachable principals, principals with no rules, rules
    that can never match, and allow rules entirely cancelled by a deny on every tube."""
    warnings: list[str] = []
    principals = policy.compiled_principals
    rules = policy.compiled_rules
    if not principals:
        warnings.append("no principals are defined: every connection will be refused")
    if not rules:
        warnings.append(
            "no rules are defined: every command except connection-local ones is denied"
        )

    unreachable: dict[str, str] = {}
    for i, later in enumerate(principals):
        for earlier in principals[:i]:
            if _same_match(earlier, later):
                why = f"{earlier.where} ({earlier.name}) has the same match block"
            elif _shadowed_by(earlier, later):
                why = f"{earlier.where} ({earlier.name}) matches every certificate it matches"
            else:
                continue
            unreachable[later.name] = why
            warnings.append(f"{later.where} ({later.name}) can never match: {why}")
            break

    star_rules = any(r.principal == "*" for r in rules)
    named = {r.principal for r in rules}
    for p in principals:
        if p.name not in named and not star_rules and p.name not in unreachable:
            warnings.append(
                f"{p.where} ({p.name}) has no rules (none names it and there is no '*' rule): "
                "everything it sends beyond connection-local commands is denied"
            )

    for rule in rules:
        if rule.principal in unreachable:
            warnings.append(
                f"{rule.where} can never match: principal {rule.principal!r} is unreachable"
            )
            continue
        server_entries = [e for e in rule.entries if e in ("server", "stats")]
        if server_entries and not rule.any_tube:
            warnings.append(
                f"{rule.where}: {', '.join(server_entries)} never applies here: stats is "
                'server-wide and only matches rules whose tubes include "*"'
            )
        if rule.deny:
            continue
        denied: set[str] = set()
        for other in rules:
            if (
                other.deny
                and other.any_tube
                and (other.principal == "*" or other.principal == rule.principal)
            ):
                denied.update(other.entries)
        if all(_entry_covered(e, denied) for e in rule.entries):
            warnings.append(
                f"{rule.where} never allows anything: every entry is denied on every tube by "
                f"a deny rule for {rule.principal!r} or '*'"
            )
    return warnings


def principal_mismatches(policy: Policy, identity: Identity) -> list[str]:
    """Why no principal takes ``identity``: one line per principal, in file order, naming
    every condition of its match block that failed and the certificate's values for it, e.g.
    ``principals[2] billing: uri spiffe://example.org/billing/* did not match any of
    [spiffe://example.org/web]``. For ``explain`` and refusal logs; read-only, and no faster
    path than ``Policy.principal_for`` (it looks at every condition). Control and non-ASCII
    characters in certificate values are escaped."""
    values_of: dict[str, tuple[str, ...]] = {
        "cn": () if identity.cn is None else (identity.cn,),
        "ou": identity.ous,
        "dns": identity.dns,
        "uri": identity.uris,
        "ip": identity.ips,
        "fingerprint": (identity.fingerprint,),
        "spki": (identity.spki,),
        "issuer": tuple(v for v in (identity.issuer, identity.issuer_fingerprint) if v),
    }
    lines: list[str] = []
    for p in policy.compiled_principals:
        if identity.refusal is not None:
            lines.append(f"{p.where} {p.name}: the certificate is refused ({identity.refusal})")
            continue
        failed: list[str] = []
        for c in p.conditions:
            if c.holds(identity):
                continue
            patterns = ", ".join(c.patterns)
            values = values_of.get(c.key, ())
            if not values:
                what = "unknown issuer" if c.key == "issuer" else f"no {c.key}"
                failed.append(f"{c.key} {patterns}: the certificate has {what}")
            else:
                shown = ", ".join(ascii(v)[1:-1] for v in values)
                failed.append(f"{c.key} {patterns} did not match any of [{shown}]")
        if failed:
            lines.append(f"{p.where} {p.name}: " + "; ".join(failed))
        else:
            lines.append(f"{p.where} {p.name}: matches")
    return lines

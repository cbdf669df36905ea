"""The compiled ACL: an immutable ``Policy`` that answers one question per command.

A ``Policy`` holds an ordered list of principals, each a set of certificate match conditions
(first match names the connection's principal) and an optional command rate (``rate_for``), and
an ordered list of allow/deny rules over principal x tube patterns x verb classes or command
names. ``decide`` answers: may this principal run this command on this tube? -- with default
deny and "a matching deny beats every allow", naming the rule that decided. Principals are found
through an index of their exact match values, so the lookup does not grow with their number.
Build one with ``proxy.acl.parse_acl``; ``compiled_principals`` and ``compiled_rules`` give
read-only access to what it was built from (for ``proxy.acl.lint``). Pure: no asyncio, socket,
ssl, click or yaml imports.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.acl.globs import StarGlob, glob_regex
from proxy.acl.verbs import ALWAYS, ANY, TUBE_COMBOS, VERBS
from proxy.identity import dns_match_form, uri_match_form

if TYPE_CHECKING:
    from proxy.identity import Identity

__all__ = [
    "Condition",
    "Decision",
    "Policy",
    "Principal",
    "PutLimits",
    "Rule",
    "VisibleTubes",
]

_CACHE_MAX: Final = 8192  # bounded: tube names are client-chosen
_PRINCIPAL_CACHE_MAX: Final = 4096  # bounded: certificates are client-chosen (any the CA signed)
# Match keys whose exact patterns index principals, the most selective first: a principal is
# indexed under the first of its exact conditions in this order.
_INDEX_KEYS: Final = ("fingerprint", "spki", "cn", "uri", "dns", "ou", "issuer")

# --------------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PutLimits:
    """Optional producer constraints on an allow rule; a ``put`` outside them is refused."""

    max_body: int | None = None
    priority: tuple[int, int] | None = None  # inclusive [low, high]
    delay: tuple[int, int] | None = None
    ttr: tuple[int, int] | None = None

    def violation(self, pri: int, delay: int, ttr: int, size: int) -> str | None:
        """Why a ``put pri delay ttr size`` breaks these limits, or ``None`` if it does not."""
        if self.max_body is not None and size > self.max_body:
            return f"body of {size} bytes exceeds max_body {self.max_body}"
        return _outside(
            (("priority", pri, self.priority), ("delay", delay, self.delay), ("ttr", ttr, self.ttr))
        )

    def requeue_violation(self, pri: int, delay: int | None = None) -> str | None:
        """Why a ``release <id> pri delay`` (or, without ``delay``, a ``bury <id> pri``)
        breaks these limits, or ``None``: the same bounds as for a ``put``."""
        checks = [("priority", pri, self.priority)]
        if delay is not None:
            checks.append(("delay", delay, self.delay))
        return _outside(checks)


def _outside(checks: Iterable[tuple[str, int, tuple[int, int] | None]]) -> str | None:
    """The first ``name value outside [low, high]`` among ``checks``, or ``None``."""
    for name, value, bounds in checks:
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            return f"{name} {value} outside [{bounds[0]}, {bounds[1]}]"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of ``Policy.decide``: allowed or not, and which rule said so."""

    allowed: bool
    rule: str  # "rules[3] (deny all on secrets.*)" style, or "default deny (...)"
    limits: PutLimits | None = None  # for an allowed `put`: the first matching allow's limits


@dataclass(frozen=True, slots=True)
class VisibleTubes:
    """One principal's ``any_right`` compiled into a regex (``Policy.visible_tubes``).

    ``match(tube)`` answers exactly what ``Policy.any_right(principal, tube).allowed`` answers.
    ``lines.findall`` returns, from a ``list-tubes`` YAML body (bytes, lines ``- name`` each
    after a newline), every visible name, in one pass in C. ``everything`` / ``nothing``: the
    answer is the same for every tube name. Glob pieces are matched with atomic groups, so
    matching stays linear (no backtracking blow-up whatever the tube name).
    """

    match: Callable[[str], bool]
    lines: re.Pattern[bytes]
    everything: bool
    nothing: bool


# --------------------------------------------------------------------------------------------
# Compiled principals and rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One match key: holds when any certificate value matches any of its patterns."""

    key: str
    patterns: tuple[str, ...]  # normalized text (lowercase dns/pins, canonical ip networks)
    matchers: tuple[Callable[[str], bool], ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def holds(self, identity: Identity) -> bool:
        key = self.key
        if key == "ip":
            for text in identity.ips:
                try:
                    addr = ipaddress.ip_address(text)
                except ValueError:
                    continue
                if any(addr in net for net in self.networks):
                    return True
            return False
        return any(m(v) for v in match_values(key, identity) for m in self.matchers)

    @property
    def exact(self) -> bool:
        """Every pattern is compared by equality with ``match_values`` (no glob, not ``ip``):
        the condition holds exactly when one of the identity's values is one of the patterns.
        (Each pattern's matcher is ``exact_matcher(pattern)`` when it has no ``*``; a pattern that
        contains a literal ``*``, as an ``issuer`` DN may, is conservatively left out.)"""
        return self.key != "ip" and not any("*" in p for p in self.patterns)


def match_values(key: str, identity: Identity) -> Iterable[str]:
    """The identity's values for match key ``key`` (any key but ``ip``), in the form patterns
    are compared against."""
    if key == "cn":
        return () if identity.cn is None else (identity.cn,)
    if key == "ou":
        return identity.ous
    if key == "dns":
        return [f for f in map(dns_match_form, identity.dns) if f is not None]
    if key == "uri":
        return [f for f in map(uri_match_form, identity.uris) if f is not None]
    if key == "fingerprint":
        return (identity.fingerprint.lower(),)
    if key == "issuer":  # unknown issuer (None): never holds
        return [v for v in (identity.issuer, identity.issuer_fingerprint) if v is not None]
    return (identity.spki.lower(),)  # spki


@dataclass(frozen=True, slots=True)
class Principal:
    index: int
    name: str
    conditions: tuple[Condition, ...]
    rate: tuple[float, int] | None = None  # (per_second, burst) of the optional rate limit

    @property
    def where(self) -> str:
        return f"principals[{self.index}]"

    def matches(self, identity: Identity) -> bool:
        return identity.refusal is None and all(c.holds(identity) for c in self.conditions)

    @property
    def bound_to_ca(self) -> bool:
        """Only certificates from one CA (``issuer``) or pinned ones can match."""
        return any(c.key in ("issuer", "fingerprint", "spki") for c in self.conditions)


def _index_condition(p: Principal) -> Condition | None:
    """The condition ``p`` is indexed under: its exact one with the most selective key."""
    exact = {c.key: c for c in p.conditions if c.exact}
    return next((exact[k] for k in _INDEX_KEYS if k in exact), None)


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    principal: str
    tubes: tuple[str, ...]
    deny: bool
    entries: tuple[str, ...]
    verbs: frozenset[str]  # verb classes covered ("all" expanded)
    commands: frozenset[str]  # command names covered
    limits: PutLimits | None
    any_tube: bool  # tubes include the bare "*"
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    globs: tuple[StarGlob, ...]
    text: str

    @property
    def where(self) -> str:
        return f"rules[{self.index}]"

    @property
    def effect(self) -> str:
        return "deny" if self.deny else "allow"

    def covers(self, command: str, verb: str) -> bool:
        return verb in self.verbs or command in self.commands

    def matches_tube(self, tube: str | None) -> bool:
        if self.any_tube:
            return True
        if tube is None:
            return False
        if tube in self.exact or (self.prefixes and tube.startswith(self.prefixes)):
            return True
        return any(g(tube) for g in self.globs)


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


class Policy:
    """A compiled, immutable ACL. Build it with ``parse_acl``; swap whole policies on reload."""

    __slots__ = (
        "_by_value",
        "_cache",
        "_deniable",
        "_index_keys",
        "_principal_cache",
        "_principals",
        "_put_limited",
        "_rates",
        "_rules",
        "_rules_for",
        "_unindexed",
        "_visible",
        "principals",
        "source",
    )

    def __init__(
        self, principals: Iterable[Principal], rules: Iterable[Rule], source: str
    ) -> None:
        self.source = source
        self._principals = tuple(principals)
        self._rules = tuple(rules)
        self.principals: tuple[str, ...] = tuple(p.name for p in self._principals)
        self._rates: dict[str, tuple[float, int]] = {
            p.name: p.rate for p in self._principals if p.rate is not None
        }
        # Per principal, the rules that can apply to it (its own and "*"), in file order.
        self._rules_for: dict[str, tuple[Rule, ...]] = {
            name: tuple(r for r in self._rules if r.principal in (name, "*"))
            for name in self.principals
        }
        # Principals some allow rule constrains with ``put:`` limits (see has_put_limits).
        self._put_limited = frozenset(
            name
            for name, rules in self._rules_for.items()
            if any(r.limits is not None for r in rules)
        )
        self._cache: dict[tuple[str, str, str, str | None], Decision] = {}
        self._visible: dict[str, VisibleTubes] = {}  # bounded by the principals (+ unknowns)
        # Principals some deny rule applies to (their denials name the deny, see any_right).
        self._deniable = frozenset(
            name for name, rules in self._rules_for.items() if any(r.deny for r in rules)
        )
        # Principal lookup that does not grow with the number of principals: each principal
        # with an exact (glob-free) condition is indexed under that condition's patterns; an
        # identity's candidates are the principals indexed under its own values, checked in
        # file order together with the unindexed ones (see ``_principal_lookup``).
        unindexed: list[Principal] = []
        by_value: dict[tuple[str, str], list[int]] = {}
        for p in self._principals:
            cond = _index_condition(p)
            if cond is None:
                unindexed.append(p)
                continue
            for pattern in cond.patterns:
                by_value.setdefault((cond.key, pattern), []).append(p.index)
        self._by_value: dict[tuple[str, str], tuple[int, ...]] = {
            k: tuple(dict.fromkeys(v)) for k, v in by_value.items()
        }
        self._index_keys: tuple[str, ...] = tuple(
            k for k in _INDEX_KEYS if any(key == k for key, _ in by_value)
        )
        self._unindexed: tuple[Principal, ...] = tuple(unindexed)
        # Identity -> first matching principal, for the life of this policy (a reload builds a
        # new Policy, so nothing stale survives). Keyed by the whole identity, not only the
        # certificate fingerprint: the same certificate can verify through another chain
        # (a cross-signed CA) and so carry another ``issuer``.
        self._principal_cache: dict[Identity, Principal | None] = {}

    def __repr__(self) -> str:
        return (
            f"<Policy {self.source}: {len(self._principals)} principals, {len(self._rules)} rules>"
        )

    # -- identity -> principal ----------------------------------------------------------------

    def principal_for(self, identity: Identity) -> str | None:
        """The name of the first principal whose match block holds, or ``None`` (always for an
        identity with a ``refusal``)."""
        found = self.principal_rule(identity)
        return None if found is None else found[0]

    def principal_rule(self, identity: Identity) -> tuple[str, str] | None:
        """The first matching principal as ``(name, "principals[i]")``, or ``None``."""
        cache = self._principal_cache
        try:
            found = cache[identity]
        except KeyError:
            found = self._principal_lookup(identity)
            if len(cache) >= _PRINCIPAL_CACHE_MAX:
                cache.clear()
            cache[identity] = found
        return None if found is None else (found.name, found.where)

    def _principal_lookup(self, identity: Identity) -> Principal | None:
        """The first principal (in file order) whose match block holds, found through the
        index: the answer equals ``_principal_scan``'s for every identity.

        A principal in the index can only match when its indexed condition holds, that is when
        one of the identity's values for that key equals one of the condition's patterns; so the
        principals indexed under the identity's values are the only indexed ones that can
        match. The first of those that does match bounds the search among the unindexed ones
        (glob, ``ip``-only, ...), which are checked in file order below it."""
        if identity.refusal is not None:
            return None
        principals = self._principals
        by_value = self._by_value
        candidates: set[int] = set()
        for key in self._index_keys:
            for value in match_values(key, identity):
                hit = by_value.get((key, value))
                if hit is not None:
                    candidates.update(hit)
        best: Principal | None = None
        for i in sorted(candidates):
            if principals[i].matches(identity):
                best = principals[i]
                break
        limit = len(principals) if best is None else best.index
        for p in self._unindexed:
            if p.index >= limit:
                break
            if p.matches(identity):
                return p
        return best

    def _principal_scan(self, identity: Identity) -> Principal | None:
        """The simple ordered scan ``_principal_lookup`` must agree with (the tests' reference)."""
        for p in self._principals:
            if p.matches(identity):
                return p
        return None

    def match_rule_for(self, identity: Identity) -> str:
        """``"principals[i]"`` of the first matching principal, or ``"no principal matches"``."""
        found = self.principal_rule(identity)
        return "no principal matches" if found is None else found[1]

    def unbound_principals(self) -> tuple[str, ...]:
        """Principals whose match block any trusted CA could satisfy: no ``issuer`` key and no
        ``fingerprint``/``spki`` pin."""
        return tuple(p.name for p in self._principals if not p.bound_to_ca)

    def rate_for(self, principal: str) -> tuple[float, int] | None:
        """``(per_second, burst)`` of the principal's command rate limit, or ``None``."""
        return self._rates.get(principal)

    def has_put_limits(self, principal: str) -> bool:
        """Whether any allow rule that can apply to ``principal`` constrains ``put`` (those
        constraints also bind its ``release`` and ``bury``)."""
        return principal in self._put_limited

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, principal: str, command: str, verb: str, tube: str | None) -> Decision:
        """May ``principal`` run ``command`` (of verb class ``verb``) on ``tube``?

        ``tube`` is ``None`` for the tube-less ``stats``; it then matches only rules whose tubes
        include the bare ``"*"``. A rule matches when its principal is the name or ``"*"``, one of
        its tube patterns matches and its list names the verb, the command or ``all``. Default
        deny; any matching deny beats every allow. For an allowed ``put`` the decision carries
        the first matching allow rule's ``PutLimits``. Unknown principals and verbs are denied.
        """
        if verb == ALWAYS:
            return Decision(True, "always allowed (connection-local command)")
        if verb == ANY:
            if tube is None:
                return Decision(False, "default deny (no tube given)")
            return self.any_right(principal, tube)
        key = (principal, command, verb, tube)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rules = self._rules_for.get(principal)
        if rules is None:
            decision = Decision(False, f"default deny (unknown principal {principal!r})")
        elif verb not in VERBS:
            decision = Decision(False, f"default deny (unknown verb {verb!r})")
        else:
            deny, allow = _evaluate(rules, command, verb, tube)
            if deny is not None:
                decision = Decision(False, deny.text)
            elif allow is not None:
                limits = allow.limits if command == "put" else None
                decision = Decision(True, allow.text, limits)
            else:
                where = "server-wide" if tube is None else f"on {tube!r}"
                decision = Decision(
                    False, f"default deny (no rule allows {verb} {where} for {principal})"
                )
        self._remember(key, decision)
        return decision

    def any_right(self, principal: str, tube: str) -> Decision:
        """Allowed when the principal may produce, consume, inspect or manage on ``tube``.

        Used for ``use`` and to filter ``list-tubes``. A rule naming a single command (such as
        ``put``) counts as a right on its tubes. The decision names the allow rule that grants
        a right, or the first deny that took one away, or the default deny.
        """
        key = (principal, "", ANY, tube)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rules = self._rules_for.get(principal)
        if rules is not None and principal not in self._deniable:
            if self.visible_tubes(principal).match(tube):
                decision = self._any_right_full(principal, tube)  # to name the allow rule
            else:
                # The compiled matcher says no and no deny rule can be the one to name: the
                # default deny, without evaluating every (command, verb) a right consists of
                # (the cost of each distinct name in a flood of denied ``use``).
                decision = Decision(
                    False, f"default deny (no rule grants any right on {tube!r} for {principal})"
                )
        else:
            decision = self._any_right_full(principal, tube)
        self._remember(key, decision)
        return decision

    def _any_right_full(self, principal: str, tube: str) -> Decision:
        """``any_right`` evaluated rule by rule (uncached; the reference of the matcher)."""
        rules = self._rules_for.get(principal)
        if rules is None:
            return Decision(False, f"default deny (unknown principal {principal!r})")
        first_deny: Rule | None = None
        for command, verb in TUBE_COMBOS:
            deny, allow = _evaluate(rules, command, verb, tube)
            if deny is None and allow is not None:
                return Decision(True, allow.text)
            if first_deny is None:
                first_deny = deny
        if first_deny is not None:
            return Decision(False, first_deny.text)
        return Decision(
            False, f"default deny (no rule grants any right on {tube!r} for {principal})"
        )

    def visible_tubes(self, principal: str) -> VisibleTubes:
        """``any_right`` for ``principal`` on every tube at once, compiled once per policy.

        For each (command, verb) a tube right consists of, the tube is visible through it when
        an allow rule covering it matches and no deny rule covering it does; combinations with
        the same allow and deny patterns share one alternative of the regex."""
        found = self._visible.get(principal)
        if found is None:
            if principal not in self._rules_for and len(self._visible) >= _CACHE_MAX:
                self._visible.clear()
            found = self._visible[principal] = _compile_visible(
                self._rules_for.get(principal, ())
            )
        return found

    def uniform(self, principal: str, command: str, verb: str) -> bool:
        """True when ``decide`` allows this command on *every* possible tube name.

        That is: some allow rule for the principal (or ``"*"``) with the bare tube pattern
        ``"*"`` covers the command, and no deny rule for the principal (or ``"*"``) names its
        verb, the command or ``all`` on any tubes at all (conservative). The session uses it to
        skip learning a job's tube with ``stats-job`` when the answer cannot depend on it.
        """
        if verb == ALWAYS:
            return True
        if verb == ANY:
            return any(self.uniform(principal, c, v) for c, v in TUBE_COMBOS)
        rules = self._rules_for.get(principal)
        if rules is None or verb not in VERBS:
            return False
        allowed_everywhere = False
        for rule in rules:
            if not rule.covers(command, verb):
                continue
            if rule.deny:
                return False
            if rule.any_tube:
                allowed_everywhere = True
        return allowed_everywhere

    @property
    def compiled_principals(self) -> tuple[Principal, ...]:
        """The principals as compiled, in file order (immutable; for lint and diagnostics)."""
        return self._principals

    @property
    def compiled_rules(self) -> tuple[Rule, ...]:
        """The rules as compiled, in file order (immutable; for lint and diagnostics)."""
        return self._rules

    def match_blocks(self) -> dict[str, tuple[tuple[str, tuple[str, ...]], ...]]:
        """Principal name -> its match keys with their normalized patterns, in file order."""
        return {p.name: tuple((c.key, c.patterns) for c in p.conditions) for p in self._principals}

    def rules_of(
        self, principal: str
    ) -> tuple[tuple[str, tuple[str, ...], tuple[str, ...], PutLimits | None], ...]:
        """(effect, tube patterns, entries, put limits) of each rule that applies to the
        principal (its own and ``"*"``), in file order: what its decisions depend on."""
        return tuple(
            (r.effect, r.tubes, r.entries, r.limits) for r in self._rules_for.get(principal, ())
        )

    def _remember(self, key: tuple[str, str, str, str | None], decision: Decision) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = decision


def _evaluate(
    rules: tuple[Rule, ...], command: str, verb: str, tube: str | None
) -> tuple[Rule | None, Rule | None]:
    """(first matching deny, first matching allow) among ``rules``."""
    first_allow: Rule | None = None
    for rule in rules:
        if not rule.covers(command, verb) or not rule.matches_tube(tube):
            continue
        if rule.deny:
            return rule, first_allow
        if first_allow is None:
            first_allow = rule
    return None, first_allow


def _union(patterns: Iterable[str]) -> str:
    return "(?:" + "|".join(glob_regex(p) for p in sorted(patterns)) + ")"


_NEVER: Final = "(?!)"


def _compile_visible(rules: tuple[Rule, ...]) -> VisibleTubes:
    classes: set[tuple[frozenset[str], frozenset[str]]] = set()
    for command, verb in TUBE_COMBOS:
        allow: set[str] = set()
        deny: set[str] = set()
        for rule in rules:
            if rule.covers(command, verb):
                (deny if rule.deny else allow).update(rule.tubes)
        if allow and "*" not in deny:
            classes.add((frozenset(allow), frozenset(deny)))
    # (A1 and not D) or (A2 and not D) == (A1 or A2) and not D: one alternative per deny set.
    by_deny: dict[frozenset[str], set[str]] = {}
    for allowed, denied in classes:
        by_deny.setdefault(denied, set()).update(allowed)
    everything = any("*" in a and not d for d, a in by_deny.items())
    nothing = not by_deny
    ordered = sorted((sorted(a), sorted(d)) for d, a in by_deny.items())

    def regex(end: str) -> str:
        if everything:
            return ".*"
        if nothing:
            return _NEVER
        alternatives = []
        for allowed, denied in ordered:
            guard = f"(?!{_union(denied)}{end})" if denied else ""
            alternatives.append(f"{guard}{_union(allowed)}")
        return "|".join(alternatives)

    # Single names: the whole string (DOTALL and \Z, so any string is judged like StarGlob).
    single = re.compile(regex(r"\Z"), re.DOTALL)
    # list-tubes bodies: the names of lines "- name" (each after a newline); "." never
    # crosses a line; the literal prefix lets the regex engine skip to each line in C.
    lines = re.compile(f"\n- ({regex('$')})$".encode("ascii"), re.MULTILINE)
    fullmatch = single.fullmatch
    return VisibleTubes(
        match=lambda tube: fullmatch(tube) is not None,
        lines=lines,
        everything=everything,
        nothing=nothing,
    )

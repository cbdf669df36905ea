"""The access-control list: an already-parsed ACL document -> a compiled, immutable ``Policy``.

``parse_acl`` validates the YAML *data* (the CLI loads the file) and compiles it: an ordered list
of principals, each a set of certificate match conditions (first match names the connection's
principal) and an optional command rate (``Policy.rate_for``), and an ordered list of allow/deny
rules over principal x tube patterns x verb classes or command names. ``Policy.decide`` answers
one question per command -- may this principal run this command on this tube? -- with default
deny and "a matching deny beats every allow", and names the rule that decided. ``COMMAND_VERBS``
maps all 25 beanstalkd 1.12 commands to their verb class. Globs are matched by hand-written
linear-time matchers (no regex backtracking), and the module is pure: no asyncio, socket, ssl,
click or yaml imports. The file format is documented in ``config/ACL.md``. Principals are found
through an index of their exact match values, so the lookup does not grow with their number.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.errors import ConfigError
from proxy.identity import dns_match_form, normalize_dn, uri_match_form

if TYPE_CHECKING:
    from proxy.identity import Identity

__all__ = [
    "ALWAYS",
    "ANY",
    "COMMAND_VERBS",
    "DELETE_OTHER_VERB",
    "MATCH_KEYS",
    "TUBE_CHARS",
    "TUBE_VERBS",
    "VERBS",
    "Decision",
    "Policy",
    "PutLimits",
    "VisibleTubes",
    "lint_acl",
    "parse_acl",
    "principal_mismatches",
]

# --------------------------------------------------------------------------------------------
# Verb classes and the command table
# --------------------------------------------------------------------------------------------

VERBS: Final = ("produce", "consume", "inspect", "manage", "server")
"""The verb classes a rule can name (plus ``all``, which means every one of them)."""

TUBE_VERBS: Final = ("produce", "consume", "inspect", "manage")
"""The verb classes that are about a tube (``server`` is server-wide)."""

ALWAYS: Final = "always"
"""Pseudo-verb of commands that only read or narrow the connection's own state."""

ANY: Final = "any"
"""Pseudo-verb of ``use``: allowed on a tube where the principal holds any tube right."""

COMMAND_VERBS: Final[dict[str, str]] = {
    # always: connection-local state only
    "quit": ALWAYS,
    "list-tube-used": ALWAYS,
    "list-tubes-watched": ALWAYS,
    "ignore": ALWAYS,
    # any right on the named tube
    "use": ANY,
    # produce: the used tube
    "put": "produce",
    # consume: the named tube, every watched tube, or the job's tube
    "watch": "consume",
    "reserve": "consume",
    "reserve-with-timeout": "consume",
    "release": "consume",
    "bury": "consume",
    "touch": "consume",
    "delete": "consume",  # of a job this connection reserved; else DELETE_OTHER_VERB
    # inspect
    "peek": "inspect",
    "peek-ready": "inspect",
    "peek-delayed": "inspect",
    "peek-buried": "inspect",
    "stats-job": "inspect",
    "stats-tube": "inspect",
    "list-tubes": "inspect",
    # manage
    "kick": "manage",
    "kick-job": "manage",
    "reserve-job": "manage",
    "pause-tube": "manage",
    # server-wide, tube-less
    "stats": "server",
}
"""Every beanstalkd 1.12 command name -> its verb class (or ``always`` / ``any``)."""

DELETE_OTHER_VERB: Final = "manage"
"""The verb of ``delete`` on a job that is *not* reserved by this connection."""

# (command, verb) pairs a tube right can consist of; ``any_right`` asks about each of them.
_TUBE_COMBOS: Final = (
    *((c, v) for c, v in COMMAND_VERBS.items() if v in TUBE_VERBS),
    ("delete", DELETE_OTHER_VERB),
)

TUBE_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-+/;.$_()"
)
"""beanstalkd's NAME_CHARS (protocol reference section 2.5); all are literal in tube patterns."""

MAX_TUBE_PATTERN: Final = 200
MATCH_KEYS: Final = ("cn", "ou", "dns", "uri", "ip", "fingerprint", "spki", "issuer")

_ALL: Final = "all"
_U32_MAX: Final = 2**32 - 1
_MAX_RATE: Final = 1e9  # commands per second; far beyond what a proxy process can relay
_PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@:/+-]{0,99}")
_DNS_PATTERN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._*")
_HEX: Final = frozenset("0123456789abcdef")
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
# Glob matchers (linear time, no regex)
# --------------------------------------------------------------------------------------------


class _StarGlob:
    """``*`` matches any run of characters (including none); everything else is literal.

    Matching splits the pattern at the stars and finds the pieces left to right; the leftmost
    occurrence of each middle piece is always the best choice, so this is exact and linear-ish.
    """

    __slots__ = ("_head", "_literal", "_middle", "_tail")

    def __init__(self, pattern: str) -> None:
        parts = pattern.split("*")
        self._literal = len(parts) == 1
        self._head = parts[0]
        self._tail = parts[-1] if len(parts) > 1 else ""
        self._middle = tuple(p for p in parts[1:-1] if p)

    def __call__(self, text: str) -> bool:
        head, tail = self._head, self._tail
        if self._literal:
            return text == head
        if len(text) < len(head) + len(tail):
            return False
        if not text.startswith(head) or not text.endswith(tail):
            return False
        pos, end = len(head), len(text) - len(tail)
        for piece in self._middle:
            found = text.find(piece, pos, end)
            if found < 0:
                return False
            pos = found + len(piece)
        return True


class _SegmentGlob:
    """``*`` matches within one segment (never ``sep``), ``**`` matches any run.

    Matching simulates the pattern's NFA over a set of positions: O(len(text) * len(pattern)),
    with no backtracking whatever the input.
    """

    __slots__ = ("_n", "_sep", "_tokens")

    _ONE: Final = 1  # token kinds: literal characters are plain strings
    _MANY: Final = 2

    def __init__(self, pattern: str, sep: str) -> None:
        tokens: list[str | int] = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                tokens.append(self._MANY)
                i += 2
            elif pattern[i] == "*":
                tokens.append(self._ONE)
                i += 1
            else:
                tokens.append(pattern[i])
                i += 1
        self._tokens = tuple(tokens)
        self._n = len(tokens)
        self._sep = sep

    def _closure(self, states: Iterable[int]) -> set[int]:
        out: set[int] = set()
        for i in states:
            while i not in out:
                out.add(i)
                if i < self._n and isinstance(self._tokens[i], int):
                    i += 1
                else:
                    break
        return out

    def __call__(self, text: str) -> bool:
        tokens, n, sep = self._tokens, self._n, self._sep
        states = self._closure((0,))
        for ch in text:
            nxt: list[int] = []
            for i in states:
                if i == n:
                    continue
                tok = tokens[i]
                if tok == self._MANY or (tok == self._ONE and ch != sep):
                    nxt.append(i)
                elif tok == ch:
                    nxt.append(i + 1)
            if not nxt:
                return False
            states = self._closure(nxt)
        return n in states


def _exact(pattern: str) -> Callable[[str], bool]:
    return pattern.__eq__


def _star_matcher(pattern: str) -> Callable[[str], bool]:
    return _StarGlob(pattern) if "*" in pattern else _exact(pattern)


def _segment_matcher(pattern: str, sep: str) -> Callable[[str], bool]:
    return _SegmentGlob(pattern, sep) if "*" in pattern else _exact(pattern)


# --------------------------------------------------------------------------------------------
# Compiled principals and rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Condition:
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
        return any(m(v) for v in _match_values(key, identity) for m in self.matchers)

    @property
    def exact(self) -> bool:
        """Every pattern is compared by equality with ``_match_values`` (no glob, not ``ip``):
        the condition holds exactly when one of the identity's values is one of the patterns.
        (Each pattern's matcher is ``_exact(pattern)`` when it has no ``*``; a pattern that
        contains a literal ``*``, as an ``issuer`` DN may, is conservatively left out.)"""
        return self.key != "ip" and not any("*" in p for p in self.patterns)


def _match_values(key: str, identity: Identity) -> Iterable[str]:
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
class _Principal:
    index: int
    name: str
    conditions: tuple[_Condition, ...]
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


def _index_condition(p: _Principal) -> _Condition | None:
    """The condition ``p`` is indexed under: its exact one with the most selective key."""
    exact = {c.key: c for c in p.conditions if c.exact}
    return next((exact[k] for k in _INDEX_KEYS if k in exact), None)


@dataclass(frozen=True, slots=True)
class _Rule:
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
    globs: tuple[_StarGlob, ...]
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
        self, principals: Iterable[_Principal], rules: Iterable[_Rule], source: str
    ) -> None:
        self.source = source
        self._principals = tuple(principals)
        self._rules = tuple(rules)
        self.principals: tuple[str, ...] = tuple(p.name for p in self._principals)
        self._rates: dict[str, tuple[float, int]] = {
            p.name: p.rate for p in self._principals if p.rate is not None
        }
        # Per principal, the rules that can apply to it (its own and "*"), in file order.
        self._rules_for: dict[str, tuple[_Rule, ...]] = {
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
        unindexed: list[_Principal] = []
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
        self._unindexed: tuple[_Principal, ...] = tuple(unindexed)
        # Identity -> first matching principal, for the life of this policy (a reload builds a
        # new Policy, so nothing stale survives). Keyed by the whole identity, not only the
        # certificate fingerprint: the same certificate can verify through another chain
        # (a cross-signed CA) and so carry another ``issuer``.
        self._principal_cache: dict[Identity, _Principal | None] = {}

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

    def _principal_lookup(self, identity: Identity) -> _Principal | None:
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
            for value in _match_values(key, identity):
                hit = by_value.get((key, value))
                if hit is not None:
                    candidates.update(hit)
        best: _Principal | None = None
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

    def _principal_scan(self, identity: Identity) -> _Principal | None:
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
        first_deny: _Rule | None = None
        for command, verb in _TUBE_COMBOS:
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
            return any(self.uniform(principal, c, v) for c, v in _TUBE_COMBOS)
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
    rules: tuple[_Rule, ...], command: str, verb: str, tube: str | None
) -> tuple[_Rule | None, _Rule | None]:
    """(first matching deny, first matching allow) among ``rules``."""
    first_allow: _Rule | None = None
    for rule in rules:
        if not rule.covers(command, verb) or not rule.matches_tube(tube):
            continue
        if rule.deny:
            return rule, first_allow
        if first_allow is None:
            first_allow = rule
    return None, first_allow


def _glob_regex(pattern: str) -> str:
    """A tube glob as a linear-time regex: ``*`` is any run; each middle piece is found at its
    leftmost place inside an atomic group (as ``_StarGlob`` does), the tail at the end."""
    if pattern == "*":
        return ".*"
    parts = pattern.split("*")
    if len(parts) == 1:
        return re.escape(pattern)
    head, *middle, tail = parts
    out = [re.escape(head)]
    out.extend(f"(?>.*?{re.escape(piece)})" for piece in middle if piece)
    out.append(f".*{re.escape(tail)}")
    return "".join(out)


def _union(patterns: Iterable[str]) -> str:
    return "(?:" + "|".join(_glob_regex(p) for p in sorted(patterns)) + ")"


_NEVER: Final = "(?!)"


def _compile_visible(rules: tuple[_Rule, ...]) -> VisibleTubes:
    classes: set[tuple[frozenset[str], frozenset[str]]] = set()
    for command, verb in _TUBE_COMBOS:
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

    # Single names: the whole string (DOTALL and \Z, so any string is judged like _StarGlob).
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


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _one_of(names: Iterable[str]) -> str:
    return ", ".join(names)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def mapping(self, value: object, key: str, allowed: tuple[str, ...]) -> Mapping[str, object]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                hint = _suggest(str(k), allowed)
                sub = f"{key}.{k}" if key else str(k)
                raise self.fail(sub, f"unknown key {k!r}{hint}; expected one of {_one_of(allowed)}")
        return value

    def seq(self, value: object, key: str, what: str) -> list[object]:
        if not isinstance(value, list | tuple):
            raise self.fail(key, f"expected a list of {what}, got {_kind(value)}")
        return list(value)

    def string(self, value: object, key: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected {what} (a string), got {_kind(value)}")
        if not value:
            raise self.fail(key, f"{what} must not be empty")
        return value

    def integer(self, value: object, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is out of range [{low}, {high}]")
        return value

    # -- document -----------------------------------------------------------------------------

    def document(self, data: object) -> Policy:
        if data is None:
            raise self.fail(
                "", "the ACL is empty; expected a mapping with 'principals' and 'rules'"
            )
        doc = self.mapping(data, "", ("principals", "rules"))
        for required in ("principals", "rules"):
            if required not in doc:
                raise self.fail(required, "missing required key")
        raw_principals = self.seq(doc["principals"], "principals", "principal definitions")
        principals: list[_Principal] = []
        first_index: dict[str, int] = {}
        for i, raw in enumerate(raw_principals):
            p = self.principal(raw, i)
            if p.name in first_index:
                raise self.fail(
                    f"principals[{i}].name",
                    f"duplicate principal name {p.name!r} (first defined at "
                    f"principals[{first_index[p.name]}])",
                )
            first_index[p.name] = i
            principals.append(p)
        raw_rules = self.seq(doc["rules"], "rules", "rules")
        rules = [self.rule(raw, i, first_index) for i, raw in enumerate(raw_rules)]
        return Policy(principals, rules, self.source)

    # -- principals ---------------------------------------------------------------------------

    def principal(self, raw: object, index: int) -> _Principal:
        key = f"principals[{index}]"
        body = self.mapping(raw, key, ("name", "match", "rate"))
        for required in ("name", "match"):
            if required not in body:
                raise self.fail(f"{key}.{required}", "missing required key")
        name = self.string(body["name"], f"{key}.name", "a principal name")
        if name == "*":
            raise self.fail(f"{key}.name", "'*' is reserved for rules that apply to everyone")
        if not _PRINCIPAL_NAME.fullmatch(name):
            raise self.fail(
                f"{key}.name",
                f"invalid principal name {name!r}: use 1-100 characters from A-Z a-z 0-9 "
                "_ . @ : / + -, starting with a letter, digit or _",
            )
        match = self.mapping(body["match"], f"{key}.match", MATCH_KEYS)
        if not match:
            raise self.fail(f"{key}.match", f"must name at least one of {_one_of(MATCH_KEYS)}")
        conditions = tuple(
            self.condition(k, match[k], f"{key}.match.{k}") for k in MATCH_KEYS if k in match
        )
        rate = self.rate(body["rate"], f"{key}.rate") if "rate" in body else None
        return _Principal(index, name, conditions, rate)

    def rate(self, raw: object, key: str) -> tuple[float, int]:
        body = self.mapping(raw, key, ("per_second", "burst"))
        if "per_second" not in body:
            raise self.fail(f"{key}.per_second", "missing required key")
        per_second = self.positive_number(body["per_second"], f"{key}.per_second")
        if "burst" in body:
            burst = self.integer(body["burst"], f"{key}.burst", 1, _U32_MAX)
        else:
            burst = max(1, math.ceil(per_second))
        return per_second, burst

    def positive_number(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = " (unquote it; YAML reads 1e3 as a string: write 1000 or 1.0e+3)"
                except ValueError:
                    pass
            raise self.fail(key, f"expected a number > 0, got {_kind(value)}{hint}")
        number = float(value)
        if not math.isfinite(number) or not 0 < number <= _MAX_RATE:
            raise self.fail(key, f"expected a number > 0 (at most {_MAX_RATE:.0f}), got {value}")
        return number

    def condition(self, mkey: str, raw: object, key: str) -> _Condition:
        items: list[tuple[object, str]]
        if isinstance(raw, list | tuple):
            if not raw:
                raise self.fail(key, "the list of patterns is empty")
            items = [(v, f"{key}[{i}]") for i, v in enumerate(raw)]
        else:
            items = [(raw, key)]
        patterns: list[str] = []
        matchers: list[Callable[[str], bool]] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for value, vkey in items:
            text = self.string(value, vkey, f"a {mkey} pattern")
            if mkey in ("cn", "ou"):
                patterns.append(text)
                matchers.append(_star_matcher(text))
            elif mkey == "dns":
                if not text.isascii():
                    raise self.fail(vkey, _non_ascii_dns(text))
                text = text.encode("ascii").lower().decode("ascii")
                bad = sorted(set(text) - _DNS_PATTERN_CHARS)
                if bad:
                    raise self.fail(vkey, f"invalid character {bad[0]!r} in DNS pattern {text!r}")
                self.no_triple_star(text, vkey)
                patterns.append(text)
                matchers.append(_segment_matcher(text, "."))
            elif mkey == "uri":
                if any(ch.isspace() or not ch.isprintable() for ch in text):
                    raise self.fail(vkey, f"URI pattern {text!r} contains whitespace or controls")
                self.no_triple_star(text, vkey)
                form = uri_match_form(text, pattern=True)
                if form is None:
                    raise self.fail(
                        vkey,
                        f"URI pattern {text!r} is not a plain URI: it needs a scheme and must "
                        f"have no userinfo, query, fragment, '.' or '..' segment, malformed "
                        f"'%' escape or percent-encoded unreserved character (no certificate "
                        f"URI of that form ever matches)",
                    )
                patterns.append(form)
                matchers.append(_segment_matcher(form, "/"))
            elif mkey == "ip":
                try:
                    net = ipaddress.ip_network(text, strict=True)
                except ValueError as exc:
                    raise self.fail(
                        vkey, f"expected an IP address or CIDR network: {exc}"
                    ) from None
                networks.append(net)
                patterns.append(str(net))
            elif mkey == "issuer" and not text.lower().startswith("sha256:"):
                try:
                    dn = normalize_dn(text)
                except ValueError:
                    raise self.fail(
                        vkey,
                        f"expected the CA's subject as an RFC 4514 string (e.g. "
                        f"'CN=Example CA,O=Example', attribute names in upper case, no space "
                        f"after ',') or 'sha256:' and the CA certificate's fingerprint, "
                        f"got {text!r}",
                    ) from None
                patterns.append(dn)
                matchers.append(_exact(dn))
            else:  # fingerprint, spki, issuer as sha256: pin
                pin = _normalize_pin(text)
                if pin is None:
                    raise self.fail(
                        vkey,
                        f"expected 'sha256:' followed by 64 hex digits (colons between pairs "
                        f"allowed), got {text!r}",
                    )
                patterns.append(pin)
                matchers.append(_exact(pin))
        return _Condition(mkey, tuple(patterns), tuple(matchers), tuple(networks))

    def no_triple_star(self, text: str, key: str) -> None:
        if "***" in text:
            raise self.fail(key, f"'***' is ambiguous in {text!r}; use '*' (one segment) or '**'")

    # -- rules --------------------------------------------------------------------------------

    def rule(self, raw: object, index: int, principals: Mapping[str, int]) -> _Rule:
        key = f"rules[{index}]"
        body = self.mapping(raw, key, ("principal", "tubes", "allow", "deny", "put"))
        if "principal" not in body:
            raise self.fail(f"{key}.principal", "missing required key")
        principal = self.string(body["principal"], f"{key}.principal", "a principal name or '*'")
        if principal != "*" and principal not in principals:
            defined = _one_of(principals) or "none"
            raise self.fail(
                f"{key}.principal",
                f"unknown principal {principal!r}{_suggest(principal, list(principals))}; "
                f"defined principals: {defined} (or '*' for everyone)",
            )
        tubes = self.tubes(body.get("tubes", ["*"]), f"{key}.tubes")
        has_allow, has_deny = "allow" in body, "deny" in body
        if has_allow == has_deny:
            raise self.fail(
                key,
                "a rule needs exactly one of 'allow' or 'deny' (write two rules for both)"
                if has_allow
                else "a rule needs exactly one of 'allow' or 'deny'",
            )
        effect = "allow" if has_allow else "deny"
        entries = self.entries(body[effect], f"{key}.{effect}")
        verbs: set[str] = set()
        commands: set[str] = set()
        for entry in entries:
            if entry == _ALL:
                verbs.update(VERBS)
            elif entry in VERBS:
                verbs.add(entry)
            else:
                commands.add(entry)
        limits: PutLimits | None = None
        if "put" in body:
            if effect == "deny":
                raise self.fail(f"{key}.put", "producer constraints belong on allow rules")
            if "produce" not in verbs and "put" not in commands:
                raise self.fail(
                    f"{key}.put",
                    "producer constraints need a rule that allows put (produce, put or all)",
                )
            limits = self.put_limits(body["put"], f"{key}.put")
        # Precompile the tube patterns into the cheapest test for each shape.
        exact: set[str] = set()
        prefixes: list[str] = []
        globs: list[_StarGlob] = []
        for t in tubes:
            if "*" not in t:
                exact.add(t)
            elif t != "*" and t.index("*") == len(t) - 1:
                prefixes.append(t[:-1])
            elif t != "*":
                globs.append(_StarGlob(t))
        text = f"{key} ({effect} {','.join(entries)} on {','.join(tubes)})"
        return _Rule(
            index=index,
            principal=principal,
            tubes=tubes,
            deny=effect == "deny",
            entries=entries,
            verbs=frozenset(verbs),
            commands=frozenset(commands),
            limits=limits,
            any_tube="*" in tubes,
            exact=frozenset(exact),
            prefixes=tuple(prefixes),
            globs=tuple(globs),
            text=text,
        )

    def tubes(self, raw: object, key: str) -> tuple[str, ...]:
        items = self.seq(raw, key, "tube patterns")
        if not items:
            raise self.fail(key, 'must list at least one tube pattern (use "*" for every tube)')
        out: list[str] = []
        for i, value in enumerate(items):
            ikey = f"{key}[{i}]"
            pattern = self.string(value, ikey, "a tube pattern")
            if len(pattern) > MAX_TUBE_PATTERN:
                raise self.fail(
                    ikey, f"tube pattern is {len(pattern)} characters; at most {MAX_TUBE_PATTERN}"
                )
            for ch in pattern:
                if ch != "*" and ch not in TUBE_CHARS:
                    raise self.fail(
                        ikey,
                        f"invalid character {ch!r} in tube pattern {pattern!r}; tube names use "
                        "A-Z a-z 0-9 - + / ; . $ _ ( ) and patterns add '*'",
                    )
            if pattern.startswith("-"):
                raise self.fail(
                    ikey, f"tube names never begin with '-', so {pattern!r} never matches"
                )
            # Normalize runs of stars: "a**b" means the same as "a*b".
            while "**" in pattern:
                pattern = pattern.replace("**", "*")
            out.append(pattern)
        return tuple(out)

    def entries(self, raw: object, key: str) -> tuple[str, ...]:
        items = self.seq(raw, key, "verbs or command names")
        if not items:
            raise self.fail(key, "must name at least one verb or command")
        out: list[str] = []
        choices = (*VERBS, _ALL)
        for i, value in enumerate(items):
            ikey = f"{key}[{i}]"
            entry = self.string(value, ikey, "a verb or command name")
            if entry in choices:
                out.append(entry)
                continue
            verb = COMMAND_VERBS.get(entry)
            if verb == ALWAYS:
                raise self.fail(
                    ikey,
                    f"{entry!r} is always allowed (it only touches the connection's own state) "
                    "and cannot be named in a rule",
                )
            if verb == ANY:
                raise self.fail(
                    ikey,
                    f"{entry!r} cannot be named in a rule: it is allowed on any tube where the "
                    "principal holds some right (produce, consume, inspect or manage)",
                )
            if verb is None:
                named = [c for c, v in COMMAND_VERBS.items() if v not in (ALWAYS, ANY)]
                raise self.fail(
                    ikey,
                    f"unknown verb {entry!r}{_suggest(entry, [*choices, *named])}; expected one "
                    f"of {_one_of(choices)} or a command name ({_one_of(named)})",
                )
            out.append(entry)
        return tuple(out)

    def put_limits(self, raw: object, key: str) -> PutLimits:
        body = self.mapping(raw, key, ("max_body", "priority", "delay", "ttr"))
        if not body:
            raise self.fail(key, "empty producer constraints; set max_body, priority, delay or ttr")
        max_body = None
        if "max_body" in body:
            max_body = self.integer(body["max_body"], f"{key}.max_body", 0, _U32_MAX)
        ranges: dict[str, tuple[int, int] | None] = {}
        for name in ("priority", "delay", "ttr"):
            ranges[name] = None
            if name not in body:
                continue
            rkey = f"{key}.{name}"
            items = self.seq(body[name], rkey, "two integers [low, high]")
            if len(items) != 2:
                raise self.fail(rkey, f"expected [low, high], got {len(items)} values")
            low = self.integer(items[0], f"{rkey}[0]", 0, _U32_MAX)
            high = self.integer(items[1], f"{rkey}[1]", 0, _U32_MAX)
            if low > high:
                raise self.fail(rkey, f"low {low} is greater than high {high}")
            ranges[name] = (low, high)
        return PutLimits(max_body, ranges["priority"], ranges["delay"], ranges["ttr"])


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _non_ascii_dns(text: str) -> str:
    """The error for a DNS pattern with non-ASCII characters, naming its A-label form."""
    try:
        alabel = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return f"DNS pattern {text!r} is not ASCII; write internationalized names as IDNA A-labels"
    return (
        f"DNS pattern {text!r} is not ASCII; names are compared as IDNA A-labels, write {alabel!r}"
    )


def _normalize_pin(text: str) -> str | None:
    """``sha256:<64 hex>`` (any case, optional colons between hex pairs) -> lowercase form."""
    prefix, sep, digest = text.partition(":")
    if not sep or prefix.lower() != "sha256":
        return None
    digest = digest.lower()
    if ":" in digest:
        pairs = digest.split(":")
        if any(len(p) != 2 for p in pairs):
            return None
        digest = "".join(pairs)
    if len(digest) != 64 or not set(digest) <= _HEX:
        return None
    return "sha256:" + digest


def parse_acl(data: object, source: str) -> Policy:
    """Validate and compile an ACL document (already-parsed YAML data) into a ``Policy``.

    Raises ``ConfigError(source, key_path, reason)`` on the first problem, e.g.
    ``rules[2].allow[0]: unknown verb 'produse' (did you mean 'produce'?) ...``.
    """
    return _Parser(source).document(data)


# --------------------------------------------------------------------------------------------
# Lint
# --------------------------------------------------------------------------------------------


def _pattern_covers(key: str, broad: str, narrow: str) -> bool:
    """Every value matching pattern ``narrow`` also matches pattern ``broad`` (sound, partial)."""
    if broad == narrow:
        return True
    if key in ("cn", "ou"):
        # With a single kind of '*', a glob that matches the other glob's text literally
        # (its '*' absorbing the other's '*') matches every expansion of it.
        return _star_matcher(broad)(narrow)
    if key in ("dns", "uri"):
        sep = "." if key == "dns" else "/"
        return "*" not in narrow and _segment_matcher(broad, sep)(narrow)
    if key == "ip":
        b, n = ipaddress.ip_network(broad), ipaddress.ip_network(narrow)
        return b.version == n.version and n.subnet_of(b)  # type: ignore[arg-type]
    return False


def _condition_implied(broad: _Condition, narrow: _Condition) -> bool:
    """Whenever ``narrow`` holds, ``broad`` holds too (same key, every pattern covered)."""
    return broad.key == narrow.key and all(
        any(_pattern_covers(broad.key, b, n) for b in broad.patterns) for n in narrow.patterns
    )


def _shadowed_by(earlier: _Principal, later: _Principal) -> bool:
    """Every identity that matches ``later`` also matches ``earlier``."""
    return all(
        any(_condition_implied(e, l_) for l_ in later.conditions) for e in earlier.conditions
    )


def _same_match(a: _Principal, b: _Principal) -> bool:
    def norm(p: _Principal) -> set[tuple[str, frozenset[str]]]:
        return {(c.key, frozenset(c.patterns)) for c in p.conditions}

    return norm(a) == norm(b)


def _entry_covered(entry: str, denied: set[str]) -> bool:
    """Is everything that allow-entry ``entry`` grants taken away by deny entries ``denied``?"""
    if _ALL in denied or entry in denied:
        return True
    if entry == _ALL:
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
    principals = policy._principals
    rules = policy._rules
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
    for p in policy._principals:
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

"""What an ACL change does: per principal, the effective rights gained and lost between two
policies, and the text a reviewer reads.

``diff_policies(old, new)`` compares two compiled ``Policy`` objects by their decisions, not
their text: for every principal whose rules differ, and every tube pattern named by a rule that
applies to it in either policy and matched by a rule added or removed (one representative tube
per pattern; the bare ``"*"`` stands for a tube no other pattern names), it asks both policies
about every tube command (and ``stats``) and reports the commands that became allowed or
denied, grouped back into verb classes where a whole class changed, and dropped for a pattern
when a broader pattern already reports the same change. It also reports principals added and
removed, match blocks and first-match positions changed, rate limits and producer constraints
(``put`` limits) changed. ``render`` writes it as text; ``PolicyDiff`` carries the counts the
reload event logs. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final

from proxy.acl import COMMAND_VERBS, DELETE_OTHER_VERB, TUBE_VERBS, Policy, PutLimits

__all__ = ["PolicyDiff", "PrincipalDiff", "RightsChange", "diff_policies", "render"]

#: Every (command, verb) a tube right consists of; ``delete`` twice (own job / any job).
_COMBOS: Final = (
    *((c, v) for c, v in COMMAND_VERBS.items() if v in TUBE_VERBS),
    ("delete", DELETE_OTHER_VERB),
)
#: Representative tube of the bare "*": no tube name (and so no other pattern) contains "?".
_ANY_TUBE: Final = "?"
_SERVER: Final = "server-wide"


def _label(command: str, verb: str) -> str:
    if command == "delete":
        return "delete (jobs it holds)" if verb != DELETE_OTHER_VERB else "delete (any job)"
    return command


@dataclass(frozen=True, slots=True)
class RightsChange:
    """Rights gained and lost on one tube pattern (``server-wide`` for ``stats``)."""

    tubes: str
    gained: tuple[str, ...]  # verb classes, or command names where only part of a class moved
    lost: tuple[str, ...]
    exceptions: tuple[str, ...] = ()  # narrower patterns where the change does not hold


@dataclass(frozen=True, slots=True)
class PrincipalDiff:
    name: str
    status: str  # "added", "removed" or "changed"
    rights: tuple[RightsChange, ...] = ()
    match: tuple[str, ...] = ()  # added/removed: the match block; changed: what changed
    position: tuple[int, int] | None = None  # first-match rank among common principals
    rate: tuple[tuple[float, int] | None, tuple[float, int] | None] | None = None
    put_limits: tuple[tuple[str, PutLimits | None, PutLimits | None], ...] = ()

    @property
    def gained(self) -> int:
        return sum(len(r.gained) for r in self.rights)

    @property
    def lost(self) -> int:
        return sum(len(r.lost) for r in self.rights)


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    principals: tuple[PrincipalDiff, ...]

    @property
    def changed(self) -> frozenset[str]:
        """Names of the principals with any difference (added and removed included)."""
        return frozenset(p.name for p in self.principals)

    @property
    def gained(self) -> int:
        return sum(p.gained for p in self.principals)

    @property
    def lost(self) -> int:
        return sum(p.lost for p in self.principals)


def _witness(pattern: str) -> str:
    return _ANY_TUBE if pattern == "*" else pattern.replace("*", "_")


def _covers(broad: str, narrow: str) -> bool:
    """Every tube ``narrow`` matches, ``broad`` matches too (both use only ``*``)."""
    return broad != narrow and fnmatchcase(narrow, broad)


def _group(combos: set[tuple[str, str]]) -> tuple[str, ...]:
    out: list[str] = []
    for verb in TUBE_VERBS:
        members = [c for c in _COMBOS if c[1] == verb]
        if all(m in combos for m in members):
            out.append(verb)
        else:
            out.extend(_label(*m) for m in members if m in combos)
    both = (_label("delete", "consume"), _label("delete", DELETE_OTHER_VERB))
    if all(b in out for b in both):  # both kinds of delete: say "delete"
        out[out.index(both[0])] = "delete"
        out.remove(both[1])
    return tuple(out)


def _rights(old: Policy, new: Policy, name: str, patterns: list[str]) -> list[RightsChange]:
    per: dict[str, tuple[set[tuple[str, str]], set[tuple[str, str]], set[tuple[str, str]]]] = {}
    for pattern in patterns:
        tube = _witness(pattern)
        gained: set[tuple[str, str]] = set()
        lost: set[tuple[str, str]] = set()
        allowed: set[tuple[str, str]] = set()
        for command, verb in _COMBOS:
            before = old.decide(name, command, verb, tube).allowed
            after = new.decide(name, command, verb, tube).allowed
            if after:
                allowed.add((command, verb))
            if after and not before:
                gained.add((command, verb))
            elif before and not after:
                lost.add((command, verb))
        per[pattern] = (gained, lost, allowed)
    changes: list[RightsChange] = []
    changed = [p for p in patterns if per[p][0] or per[p][1]]
    for pattern in changed:
        gained, lost, _ = per[pattern]
        gained, lost = set(gained), set(lost)
        for broad in changed:
            if _covers(broad, pattern):
                gained -= per[broad][0]
                lost -= per[broad][1]
        exceptions: list[str] = []
        for narrow in patterns:
            if _covers(pattern, narrow):
                allowed = per[narrow][2]
                if not_gained := {c for c in gained if c not in allowed}:
                    exceptions.append(f"not {', '.join(_group(not_gained))} on {narrow}")
                if kept := {c for c in lost if c in allowed}:
                    exceptions.append(f"it keeps {', '.join(_group(kept))} on {narrow}")
        if gained or lost:
            changes.append(RightsChange(pattern, _group(gained), _group(lost), tuple(exceptions)))
    before = old.decide(name, "stats", "server", None).allowed
    after = new.decide(name, "stats", "server", None).allowed
    if before != after:
        server = ("server",)
        changes.append(RightsChange(_SERVER, server if after else (), () if after else server))
    return changes


def _put_limits(
    old: Policy, new: Policy, name: str, patterns: list[str]
) -> list[tuple[str, PutLimits | None, PutLimits | None]]:
    per: dict[str, tuple[PutLimits | None, PutLimits | None]] = {}
    for pattern in patterns:
        tube = _witness(pattern)
        a = old.decide(name, "put", "produce", tube)
        b = new.decide(name, "put", "produce", tube)
        if a.allowed and b.allowed and a.limits != b.limits:
            per[pattern] = (a.limits, b.limits)
    return [
        (p, limits[0], limits[1])
        for p, limits in per.items()
        if not any(_covers(q, p) and per[q] == limits for q in per)
    ]


def _blocks(policy: Policy) -> dict[str, dict[str, frozenset[str]]]:
    return {
        name: {key: frozenset(pats) for key, pats in block}
        for name, block in policy.match_blocks().items()
    }


def _describe(block: dict[str, frozenset[str]]) -> tuple[str, ...]:
    return tuple(f"{key} {' or '.join(sorted(pats))}" for key, pats in block.items())


def _match_changes(old: dict[str, frozenset[str]], new: dict[str, frozenset[str]]) -> list[str]:
    out: list[str] = []
    for key in [*old, *(k for k in new if k not in old)]:
        before, after = old.get(key, frozenset()), new.get(key, frozenset())
        if not before:
            out.append(f"now also requires {key} {' or '.join(sorted(after))}")
        elif not after:
            out.append(f"no longer requires {key} ({' or '.join(sorted(before))})")
        else:
            if after - before:
                out.append(f"{key} now also accepts {', '.join(sorted(after - before))}")
            if before - after:
                out.append(f"{key} no longer accepts {', '.join(sorted(before - after))}")
    return out


def diff_policies(old: Policy, new: Policy) -> PolicyDiff:
    """The structured difference between two policies (see the module docstring)."""
    old_blocks, new_blocks = _blocks(old), _blocks(new)
    common = [n for n in old.principals if n in new_blocks]
    old_rank = {n: i for i, n in enumerate(common)}
    new_rank = {n: i for i, n in enumerate(p for p in new.principals if p in old_rank)}
    names = [*old.principals, *(n for n in new.principals if n not in old_blocks)]
    out: list[PrincipalDiff] = []
    for name in names:
        in_old, in_new = name in old_blocks, name in new_blocks
        old_rules, new_rules = old.rules_of(name), new.rules_of(name)
        rights: tuple[RightsChange, ...] = ()
        limits: tuple[tuple[str, PutLimits | None, PutLimits | None], ...] = ()
        if old_rules != new_rules:  # else every decision is the same
            patterns = sorted({t for r in (*old_rules, *new_rules) for t in r[1]} | {"*"})
            moved = set(old_rules) ^ set(new_rules)
            if moved:  # only tubes a rule added or removed matches can decide differently
                touched = {t for r in moved for t in r[1]}
                patterns = [
                    p for p in patterns if any(fnmatchcase(_witness(p), t) for t in touched)
                ]
            rights = tuple(_rights(old, new, name, patterns))
            limits = tuple(_put_limits(old, new, name, patterns))
        old_match, new_match = old_blocks.get(name, {}), new_blocks.get(name, {})
        if not (in_old and in_new):
            out.append(
                PrincipalDiff(
                    name,
                    "added" if in_new else "removed",
                    rights,
                    _describe(new_match if in_new else old_match),
                )
            )
            continue
        rank = old_rank[name]
        position = (rank, new_rank[name]) if rank != new_rank[name] else None
        rates = (old.rate_for(name), new.rate_for(name))
        diff = PrincipalDiff(
            name,
            "changed",
            rights,
            tuple(_match_changes(old_match, new_match)),
            position,
            rates if rates[0] != rates[1] else None,
            limits,
        )
        if diff.rights or diff.match or diff.position or diff.rate or diff.put_limits:
            out.append(diff)
    return PolicyDiff(tuple(out))


# --------------------------------------------------------------------------------------------
# Text


def _tubes(pattern: str) -> str:
    if pattern == _SERVER:
        return "the server (stats)"
    if pattern == "*":
        return 'any tube ("*")'
    return f"tubes {pattern}" if "*" in pattern else f"tube {pattern}"


def _rate(rate: tuple[float, int] | None) -> str:
    return "no limit" if rate is None else f"{rate[0]:g}/s burst {rate[1]}"


def _limit_field(limits: PutLimits | None, key: str) -> str:
    value = None if limits is None else getattr(limits, key)
    if value is None:
        return "none"
    return str(value) if key == "max_body" else f"[{value[0]}, {value[1]}]"


def _limit_changes(before: PutLimits | None, after: PutLimits | None) -> tuple[str, ...]:
    return tuple(
        f"{key} {_limit_field(before, key)} -> {_limit_field(after, key)}"
        for key in ("max_body", "priority", "delay", "ttr")
        if _limit_field(before, key) != _limit_field(after, key)
    )


def _tubes_list(patterns: list[str]) -> str:
    if len(patterns) == 1:
        return _tubes(patterns[0])
    return "tubes " + ", ".join(patterns)


def _rights_lines(rights: tuple[RightsChange, ...]) -> list[str]:
    """``gains``/``loses`` lines, one per set of rights, naming every pattern it holds on."""
    merged: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for r in rights:
        gained = tuple(e for e in r.exceptions if e.startswith("not "))
        kept = tuple(e for e in r.exceptions if not e.startswith("not "))
        if r.gained:
            merged.setdefault(("gains", r.gained, gained), []).append(r.tubes)
        if r.lost:
            merged.setdefault(("loses", r.lost, kept), []).append(r.tubes)
    lines = []
    for (word, what, exceptions), patterns in merged.items():
        but = f" (but {'; '.join(exceptions)})" if exceptions else ""
        lines.append(f"  {word} {', '.join(what)} on {_tubes_list(patterns)}{but}")
    return lines


def render(diff: PolicyDiff) -> list[str]:
    """The diff as lines a reviewer reads; ``["no change in effective rights"]`` when empty."""
    if not diff.principals:
        return ["no change in effective rights"]
    lines: list[str] = []
    for p in diff.principals:
        if p.status == "added":
            lines.append(f"principal {p.name}: added, matching {' and '.join(p.match)}")
        elif p.status == "removed":
            lines.append(
                f"principal {p.name}: removed (was matching {' and '.join(p.match)}); "
                "its live connections are closed on reload"
            )
        else:
            lines.append(f"principal {p.name}:")
            for change in p.match:
                lines.append(f"  match: {change}")
            if p.position is not None:
                lines.append(
                    f"  match order: {p.position[0] + 1} -> {p.position[1] + 1} among the "
                    "principals of both files (the first matching principal names a certificate)"
                )
        lines.extend(_rights_lines(p.rights))
        if p.rate is not None:
            lines.append(f"  rate limit: {_rate(p.rate[0])} -> {_rate(p.rate[1])}")
        merged: dict[tuple[str, ...], list[str]] = {}
        for pattern, before, after in p.put_limits:
            merged.setdefault(_limit_changes(before, after), []).append(pattern)
        for changes, patterns in merged.items():
            lines.append(
                f"  put limits on {_tubes_list(patterns)} (also bind release and bury): "
                f"{'; '.join(changes)}"
            )
    lines.append(
        f"{len(diff.principals)} principal(s) changed, {diff.gained} right(s) gained, "
        f"{diff.lost} right(s) lost"
    )
    return lines

"""The shadow policy: a second ACL that decides every command next to the enforced one.

Pure and synchronous (no asyncio, ssl, yaml or logging). A ``ShadowView`` belongs to one
session; the session hands it each command it runs (``run``) and each answered ``stats-job``
lookup (``after_lookup``) only when a shadow is loaded (one ``is None`` check otherwise). The
view decides the command under the shadow policy *before* the session acts (from what the
session already knows: its own used tube and watch list as the shadow would have left them,
the job ids this connection learned), lets the session run it under the enforced policy, reads
the enforced outcome from what the session did (a denial recorded, bytes forwarded, a
``stats-job`` lookup started), and reports every difference to a ``sink``. The shadow never
sends anything upstream: a decision that needs a job's tube the session does not know is
``unknown`` (when the enforced policy asks beanstalkd for it anyway, the answer serves both).
Outcomes are ``allow``, ``deny``, ``filtered`` (``stats`` redacted, ``list-tubes`` filtered),
``unknown`` and ``refused`` (the shadow maps the certificate to no principal). Rate limits of
the shadow are not evaluated; commands the enforced rate limit refused are not seen. Cost: per
view, whether both policies decide alike is cached per (command, tube) (``_agree``, cleared
when the enforced policy or the principal changes), so a command they agree on costs one
dict lookup besides the enforced path (``put`` is checked inline in ``run``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy.acl import DELETE_OTHER_VERB, Decision, Policy
from proxy.protocol import (
    NAMES,
    OP_BURY,
    OP_DELETE,
    OP_IGNORE,
    OP_KICK,
    OP_KICK_JOB,
    OP_LIST_TUBES,
    OP_PAUSE_TUBE,
    OP_PEEK,
    OP_PEEK_BURIED,
    OP_PEEK_DELAYED,
    OP_PEEK_READY,
    OP_PUT,
    OP_RELEASE,
    OP_RESERVE,
    OP_RESERVE_JOB,
    OP_RESERVE_WITH_TIMEOUT,
    OP_STATS,
    OP_STATS_JOB,
    OP_STATS_TUBE,
    OP_TOUCH,
    OP_USE,
    OP_WATCH,
)
from proxy.session import K_LIST_TUBES, K_LOOKUP, K_STATS, K_STATS_JOB

if TYPE_CHECKING:
    from proxy.session import Session

#: The shadow reads a command by position after testing its op (the session narrows the typed
#: ``proxy.protocol.Command`` union; here one loose shape keeps the evaluation short).
Command = tuple[Any, ...]

__all__ = [
    "ALLOW",
    "DENY",
    "FILTERED",
    "OUTCOMES",
    "REFUSED",
    "UNKNOWN",
    "Mismatch",
    "ShadowSink",
    "ShadowView",
    "shadow_principal",
]

ALLOW: Final = "allow"
DENY: Final = "deny"
FILTERED: Final = "filtered"
UNKNOWN: Final = "unknown"
REFUSED: Final = "refused"
#: Every outcome label (bounded label values for the mismatch metric).
OUTCOMES: Final = (ALLOW, DENY, FILTERED, UNKNOWN, REFUSED)

#: Decisions cached per view (tube names are client-chosen: bounded).
_CACHE_MAX: Final = 4096

# How each op is judged (index: op code).
_SKIP, _PUT, _USE, _WATCH, _IGNORE, _RESERVE, _USED, _NAMED, _STATS, _LIST, _JOB = range(11)
_KIND: dict[int, int] = {
    OP_PUT: _PUT,
    OP_USE: _USE,
    OP_WATCH: _WATCH,
    OP_IGNORE: _IGNORE,
    OP_RESERVE: _RESERVE,
    OP_RESERVE_WITH_TIMEOUT: _RESERVE,
    OP_PEEK_READY: _USED,
    OP_PEEK_DELAYED: _USED,
    OP_PEEK_BURIED: _USED,
    OP_KICK: _USED,
    OP_STATS_TUBE: _NAMED,
    OP_PAUSE_TUBE: _NAMED,
    OP_STATS: _STATS,
    OP_LIST_TUBES: _LIST,
    OP_RESERVE_JOB: _JOB,
    OP_DELETE: _JOB,
    OP_RELEASE: _JOB,
    OP_BURY: _JOB,
    OP_TOUCH: _JOB,
    OP_PEEK: _JOB,
    OP_KICK_JOB: _JOB,
    OP_STATS_JOB: _JOB,
}
_KINDS: Final = tuple(_KIND.get(op, _SKIP) for op in range(len(NAMES)))
_OWN_ONLY: Final = frozenset({OP_RELEASE, OP_BURY, OP_TOUCH})
# ``ShadowView._agree`` values.
DIFFER: Final = 0
AGREE_ALLOW: Final = 1
AGREE_DENY: Final = 2


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One command the two policies decided differently (or the shadow could not decide)."""

    principal: str  # the enforced principal
    shadow_principal: str | None
    command: str
    tube: str | None
    job: int | None
    enforced: str
    enforced_rule: str
    shadow: str
    shadow_rule: str


class ShadowSink(Protocol):
    """Where a view reports (the relay's metrics and rate-limited log)."""

    def mismatch(self, record: Mismatch) -> None: ...

    def unknown(self, principal: str, command: str) -> None: ...


class PolicySource(Protocol):
    @property
    def current(self) -> Policy: ...


def shadow_principal(policy: Policy, identity: Any) -> str | None:
    """The shadow's principal for a certificate identity (``None``: the shadow refuses it)."""
    try:
        return policy.principal_for(identity)
    except Exception:  # the enforced mapping read this identity; the shadow must never fail it
        return None


def _own(decide: Callable[[str, str, str | None], Decision], command: str, tube: str) -> Decision:
    """A job this connection reserved: consume, or else manage, on its tube."""
    d = decide(command, "consume", tube)
    if not d.allowed:
        managed = decide(command, "manage", tube)
        if managed.allowed:
            return managed
    return d


class ShadowView:
    """See the module docstring. One per session; replaced (``successor``) when the shadow
    file reloads, so ``policy`` and ``principal`` never change under a view."""

    __slots__ = (
        "_agree",
        "_cache",
        "_deferred",
        "_seen",
        "_seen_principal",
        "enforced",
        "policy",
        "principal",
        "sink",
        "unwatched",
        "use_denied",
        "used",
    )

    def __init__(
        self,
        policy: Policy,
        principal: str | None,
        enforced: PolicySource,
        sink: ShadowSink,
        used: str = "default",
    ) -> None:
        self.policy = policy
        self.principal = principal
        self.enforced = enforced
        self.sink = sink
        self.used = used  # the used tube as the shadow would have left it
        self.use_denied: str | None = None  # the shadow denied this ``use``; see Session
        self.unwatched: set[str] = set()  # watched for real, but the shadow denied the watch
        self._cache: dict[tuple[str, str, str | None], Decision] = {}
        # Fast path: per (op, tube) or (op, verb, tube), whether both policies are sure to
        # decide alike (AGREE_ALLOW / AGREE_DENY) or not (DIFFER); valid for one enforced
        # policy object and principal (``_seen``, ``_seen_principal``).
        self._agree: dict[Any, int] = {}
        self._seen: Policy | None = None
        self._seen_principal: str | None = None
        # a job-id command waiting for the enforced lookup: (command, verb, shadow decision)
        self._deferred: tuple[Command, str, tuple[str, str, str | None]] | None = None

    def successor(self, policy: Policy, principal: str | None) -> ShadowView:
        """A view of a reloaded shadow that keeps this one's connection state."""
        view = ShadowView(policy, principal, self.enforced, self.sink, self.used)
        view.use_denied = self.use_denied
        view.unwatched = set(self.unwatched)
        return view

    # --- decisions ----------------------------------------------------------------------

    def _decide(self, command: str, verb: str, tube: str | None) -> Decision:
        key = (command, verb, tube)
        d = self._cache.get(key)
        if d is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            assert self.principal is not None
            d = self._cache[key] = self.policy.decide(self.principal, command, verb, tube)
        return d

    def decide(
        self, s: Session, cmd: Command, verb: str | None = None
    ) -> tuple[str, str, str | None]:
        """(outcome, rule, tube) of ``cmd`` under the shadow, from the session's state before
        it runs the command (``verb``: of a job-id command, if already known). Updates the
        shadow's own used tube and watch list."""
        kind = _KINDS[cmd[0]]
        name = NAMES[cmd[0]]
        if kind == _PUT:
            tube = self.used
            if self.use_denied is not None:
                return DENY, f"use {self.use_denied} was denied (shadow)", self.use_denied
            d = self._decide("put", "produce", tube)
            if not d.allowed:
                return DENY, d.rule, tube
            limits = d.limits
            if limits is not None:
                body = cmd[4]
                broken = limits.violation(cmd[1], cmd[2], cmd[3], 0 if body is None else len(body))
                if broken:
                    return DENY, f"{d.rule}: {broken}", tube
                if body is None and limits.max_body is not None:
                    return UNKNOWN, "body size not seen (refused at its put line)", tube
            return ALLOW, d.rule, tube
        if kind == _USE:
            tube = cmd[1]
            assert self.principal is not None
            d = self.policy.any_right(self.principal, tube)
            if d.allowed:
                self.used, self.use_denied = tube, None
                return ALLOW, d.rule, tube
            self.use_denied = tube
            return DENY, d.rule, tube
        if kind == _WATCH:
            tube = cmd[1]
            d = self._decide(name, "consume", tube)
            if d.allowed:
                self.unwatched.discard(tube)
                return ALLOW, d.rule, tube
            if tube not in s.watched and len(self.unwatched) < _CACHE_MAX:
                self.unwatched.add(tube)  # kept out of the shadow's watch list
            return DENY, d.rule, tube
        if kind == _RESERVE:
            unwatched = self.unwatched
            for watched in s.watched:
                if watched in unwatched:
                    continue
                d = self._decide(name, "consume", watched)
                if not d.allowed:
                    return DENY, d.rule, watched
            return ALLOW, "consume on every watched tube", None
        if kind == _USED:
            if self.use_denied is not None:
                return DENY, f"use {self.use_denied} was denied (shadow)", self.use_denied
            verb = "manage" if cmd[0] == OP_KICK else "inspect"
            d = self._decide(name, verb, self.used)
            return (ALLOW if d.allowed else DENY), d.rule, self.used
        if kind == _NAMED:
            verb = "manage" if cmd[0] == OP_PAUSE_TUBE else "inspect"
            d = self._decide(name, verb, cmd[1])
            return (ALLOW if d.allowed else DENY), d.rule, cmd[1]
        if kind == _STATS:
            d = self._decide("stats", "server", None)
            return (ALLOW if d.allowed else FILTERED), d.rule, None
        if kind == _LIST:
            assert self.principal is not None
            if self.policy.uniform(self.principal, "list-tubes", "inspect"):
                return ALLOW, "inspect on every tube", None
            return FILTERED, "only tubes the principal holds a right on", None
        if verb is None:
            verb = _job_verb(s, cmd)
        return self._decide_job(s, cmd, verb, _known_tubes(s, cmd[1]))

    def _decide_job(
        self, s: Session, cmd: Command, verb: str, tubes: tuple[str, ...]
    ) -> tuple[str, str, str | None]:
        name = NAMES[cmd[0]]
        op = cmd[0]
        if op == OP_STATS_JOB and (cmd[1] in s.reserved or cmd[1] in s.buried) and tubes:
            verb = "own"  # the connection holds the job: consume or manage suffice
        if verb == "maybe-own":
            # Perhaps this connection's (consume suffices), perhaps not (manage needed).
            if len(tubes) == 1 and self._decide(name, DELETE_OTHER_VERB, tubes[0]).allowed:
                d = self._decide(name, DELETE_OTHER_VERB, tubes[0])
                return ALLOW, d.rule, tubes[0]
            return UNKNOWN, "whether the job is still this connection's is not known", None
        if len(tubes) != 1:
            # Unknown tube: decidable only if the answer is the same on every tube.
            assert self.principal is not None
            uniform = self.policy.uniform
            own = verb == "own"
            if (
                own
                and (
                    uniform(self.principal, name, "consume")
                    or uniform(self.principal, name, "manage")
                )
            ) or (not own and uniform(self.principal, name, verb)):
                return ALLOW, f"{name} allowed on every tube", None
            if tubes and all(self._job_decision(name, verb, t).allowed for t in tubes):
                return ALLOW, self._job_decision(name, verb, tubes[0]).rule, tubes[0]
            return UNKNOWN, "the job's tube is not known to this connection", None
        tube = tubes[0]
        d = self._job_decision(name, verb, tube)
        if d.allowed and op in (OP_RELEASE, OP_BURY):
            limits = self._decide("put", "produce", tube).limits
            if limits is not None:
                broken = limits.requeue_violation(cmd[2], cmd[3] if op == OP_RELEASE else None)
                if broken is not None:
                    return DENY, f"{d.rule}: {broken}", tube
        return (ALLOW if d.allowed else DENY), d.rule, tube

    def _agrees(self, s: Session, cmd: Command, op: int, kind: int) -> bool:
        """True when ``cmd`` is certain to be decided alike by both policies in the session's
        present state (the shadow's own state updated as the decision implies); False when it
        must be decided and compared (the slow path)."""
        if self.principal is None:
            return False
        if kind == _PUT:
            if self.use_denied is not None or s.use_denied is not None or self.used != s.used:
                return False
            # put's keys are the bare tube names (see ``run``)
            return self._agreed(s.used, s, "put", "produce", s.used, limits=True) != DIFFER
        if kind == _RESERVE:
            if self.unwatched:
                return False
            name = NAMES[op]
            for tube in s.watched:
                if self._agreed((op, tube), s, name, "consume", tube) == DIFFER:
                    return False
            return True
        if kind == _JOB:
            if op == OP_STATS_JOB:
                return False
            tubes = _known_tubes(s, cmd[1])
            if len(tubes) != 1:
                return False
            verb = _job_verb(s, cmd)
            if verb == "maybe-own":
                return False
            limits = op in (OP_RELEASE, OP_BURY)
            key = (op, verb, tubes[0])
            return self._agreed(key, s, NAMES[op], verb, tubes[0], limits) != DIFFER
        if kind == _USE:
            tube = cmd[1]
            a = self._agreed((op, tube), s, "use", "", tube)
            if a == AGREE_ALLOW:
                self.used, self.use_denied = tube, None
            elif a == AGREE_DENY:
                self.use_denied = tube
            return a != DIFFER
        if kind == _WATCH:
            tube = cmd[1]
            a = self._agreed((op, tube), s, "watch", "consume", tube)
            if a == AGREE_ALLOW and self.unwatched:
                self.unwatched.discard(tube)
            return a != DIFFER
        return False

    def _agreed(
        self, key: Any, s: Session, command: str, verb: str, tube: str, limits: bool = False
    ) -> int:
        """``_agreement`` of ``command`` on ``tube``, cached in ``_agree`` under ``key``."""
        a = self._agree.get(key)
        if a is None:
            a = self._agree[key] = self._agreement(s, command, verb, tube, limits)
        return a

    def _agreement(
        self, s: Session, command: str, verb: str, tube: str, limits: bool = False
    ) -> int:
        """Whether the two policies decide ``command`` on ``tube`` alike (see ``_agree``).
        ``limits``: producer constraints take part (put, release, bury): they agree only
        when equal on both sides."""
        if len(self._agree) >= _CACHE_MAX:
            self._agree.clear()
        policy = self.enforced.current
        principal = s.principal
        if command == "use":
            mine = policy.any_right(principal, tube)
            assert self.principal is not None
            theirs = self.policy.any_right(self.principal, tube)
        elif verb == "own":
            mine = _own(lambda c, v, t: policy.decide(principal, c, v, t), command, tube)
            theirs = _own(self._decide, command, tube)
        else:
            mine = policy.decide(principal, command, verb, tube)
            theirs = self._decide(command, verb, tube)
        if mine.allowed != theirs.allowed:
            return DIFFER
        if not mine.allowed:
            return AGREE_DENY
        if limits:
            put_mine = policy.decide(principal, "put", "produce", tube)
            put_theirs = self._decide("put", "produce", tube)
            if command == "put":
                same = mine.limits == theirs.limits
            else:  # release, bury: the limits of the rule granting produce, if any
                same = put_mine.allowed == put_theirs.allowed and put_mine.limits == (
                    put_theirs.limits
                )
            if not same:
                return DIFFER
        return AGREE_ALLOW

    def _job_decision(self, name: str, verb: str, tube: str) -> Decision:
        if verb == "own":
            return _own(self._decide, name, tube)
        return self._decide(name, verb, tube)

    # --- hooks called by the session ----------------------------------------------------

    def run(self, s: Session, handler: Callable[[Session, Any], None], cmd: Command) -> None:
        """Decide ``cmd`` under the shadow, run ``handler`` (the enforced path), compare.
        When both policies are known to agree on it (the cached ``_agree``), only run it."""
        if self._seen is not self.enforced.current or self._seen_principal is not s.principal:
            self._agree.clear()
            self._seen = self.enforced.current
            self._seen_principal = s.principal
        op = cmd[0]
        if op == OP_PUT:  # the most frequent command: its agreement check inline
            used = self.used
            if used == s.used and self.use_denied is None and s.use_denied is None:
                a = self._agree.get(used)
                if a is not None and a != DIFFER:
                    handler(s, cmd)
                    return
        kind = _KINDS[op]
        if kind == _SKIP or (kind == _IGNORE and not self.unwatched):
            handler(s, cmd)
            return
        if self._agrees(s, cmd, op, kind):
            handler(s, cmd)
            return
        if kind == _IGNORE:
            handler(s, cmd)
            if cmd[1] not in s.watched:
                self.unwatched.discard(cmd[1])
            return
        if kind == _JOB and op in _OWN_ONLY and cmd[1] not in s.reserved and not s.forgot_reserved:
            handler(s, cmd)  # not this connection's job: NOT_FOUND whatever the policy
            return
        shadow: tuple[str, str, str | None]
        if self.principal is None:
            shadow = (REFUSED, "no shadow principal matches the certificate", None)
            verb = ""
        else:
            verb = _job_verb(s, cmd) if kind == _JOB else ""
            shadow = self.decide(s, cmd, verb or None)
        denials = len(s.denials)
        sent = len(s.to_upstream)
        pending = len(s.pending)
        handler(s, cmd)
        if s.blocked and s.pending and s.pending[-1][0] == K_LOOKUP:
            # The enforced policy asks beanstalkd for the job's tube: compare on its answer
            # (which also decides a shadow ``unknown``).
            self._deferred = (cmd, verb, shadow)
            return
        enforced = self._enforced_outcome(s, denials, sent, pending)
        if enforced is not None:
            self._compare(s, cmd, enforced, shadow, denials)

    def after_lookup(
        self,
        s: Session,
        on_lookup: Callable[[Any, str, bytes, bytes | None], None],
        entry: tuple[Any, ...],
        line: bytes,
        body: bytes | None,
    ) -> None:
        """The session's ``_on_lookup`` for ``entry``; then the deferred shadow decision."""
        deferred, self._deferred = self._deferred, None
        denials = len(s.denials)
        sent = len(s.to_upstream)
        pending = len(s.pending)
        on_lookup(entry[1], entry[2], line, body)
        if deferred is None or deferred[0] is not entry[1]:
            return
        cmd, verb, shadow = deferred
        enforced = self._enforced_outcome(s, denials, sent, pending)
        if enforced is None:
            return  # answered NOT_FOUND for a reason no policy changes
        tube = s.jobs.get(cmd[1])
        if shadow[0] == UNKNOWN and tube is not None:
            if verb == "maybe-own":
                own = cmd[1] in s.reserved or cmd[1] in s.buried
                verb = "own" if own else DELETE_OTHER_VERB
            shadow = self._decide_job(s, cmd, verb, (tube,))
        self._compare(s, cmd, enforced, shadow, denials)

    @staticmethod
    def _enforced_outcome(s: Session, denials: int, sent: int, pending: int) -> str | None:
        if len(s.denials) > denials:
            return DENY
        if len(s.to_upstream) > sent:
            last = s.pending[-1][0] if len(s.pending) > pending else 0
            if last == K_STATS_JOB:  # decided when beanstalkd's reply shows the tube
                return UNKNOWN
            if last in (K_LIST_TUBES, K_STATS):  # the reply is filtered
                return FILTERED
            return ALLOW
        return None  # answered locally without a policy decision (NOT_FOUND)

    def _compare(
        self,
        s: Session,
        cmd: Command,
        enforced: str,
        shadow: tuple[str, str, str | None],
        denials: int,
    ) -> None:
        outcome, rule, tube = shadow
        name = NAMES[cmd[0]]
        if outcome == UNKNOWN or enforced == UNKNOWN:
            self.sink.unknown(s.principal, name)
            return
        if outcome == enforced:
            return
        if enforced == DENY:
            enforced_rule = str(s.denials[denials]["rule"])
        else:
            enforced_rule = self._enforced_rule(s, cmd, tube)
        job = cmd[1] if _KINDS[cmd[0]] == _JOB else None
        self.sink.mismatch(
            Mismatch(
                s.principal,
                self.principal,
                name,
                tube,
                job,
                enforced,
                enforced_rule,
                outcome,
                rule,
            )
        )

    def _enforced_rule(self, s: Session, cmd: Command, tube: str | None) -> str:
        """The rule that let the enforced policy allow ``cmd`` (computed only on a mismatch;
        ``tube``: the shadow's tube for job-id commands)."""
        policy = self.enforced.current
        principal = s.principal
        op = cmd[0]
        name = NAMES[op]
        kind = _KINDS[op]
        if kind == _USE:
            return policy.any_right(principal, cmd[1]).rule
        if kind == _STATS:
            return policy.decide(principal, "stats", "server", None).rule
        if kind == _LIST:
            return "inspect on every tube"
        if kind == _RESERVE:
            return "consume on every watched tube"
        if kind == _PUT:
            return policy.decide(principal, name, "produce", s.used).rule
        if kind == _WATCH:
            return policy.decide(principal, name, "consume", cmd[1]).rule
        verb = "manage" if op in (OP_KICK, OP_PAUSE_TUBE) else "inspect"
        if kind == _USED:
            return policy.decide(principal, name, verb, s.used).rule
        if kind == _NAMED:
            return policy.decide(principal, name, verb, cmd[1]).rule
        tube = s.jobs.get(cmd[1], tube)
        if tube is None:
            return f"{name} allowed on every tube"
        job_verb = _job_verb(s, cmd)
        holds = cmd[1] in s.reserved or cmd[1] in s.buried
        if job_verb == "own" or (op == OP_STATS_JOB and holds):
            return _own(lambda c, v, t: policy.decide(principal, c, v, t), name, tube).rule
        if job_verb == "maybe-own":
            job_verb = DELETE_OTHER_VERB
        return policy.decide(principal, name, job_verb, tube).rule


def _job_verb(s: Session, cmd: Command) -> str:
    """The verb class of a job-id command as the session judges it (``Session._job_verb``):
    ``own`` for a job this connection reserved, ``maybe-own`` for a delete of a job it may
    still hold."""
    op = cmd[0]
    job = cmd[1]
    if op == OP_DELETE:
        if job in s.reserved:
            return "own"
        if job in s.buried or s.forgot_reserved:
            return "maybe-own"
        return DELETE_OTHER_VERB
    if op in (OP_PEEK, OP_STATS_JOB):
        return "inspect"
    if op in _OWN_ONLY:
        return "own"
    return "manage"


def _known_tubes(s: Session, job: int) -> tuple[str, ...]:
    tube = s.jobs.get(job)
    if tube is not None:
        return (tube,)
    tubes = s.reserved.get(job)
    if tubes is None:
        tubes = s.buried.get(job, ())
    return tubes

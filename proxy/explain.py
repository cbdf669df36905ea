"""``explain``: which principal a certificate (or a name) stands for, and how an ACL decides one
command line, as a value the command line prints.

``explain_command`` walks what the proxy does for one ``Query`` (a command line, who sends
it, the tube it acts on): the principal (or, for a certificate no principal takes, why each
one failed), the command's parse, the job-size limit, the tube the ACL is asked about, the
decision and the reply a denied client gets, and a put's rule limits. It returns an
``Explanation``: the lines to print, whether the command is allowed, and, when the answer
needs more input (a job-id command whose decision depends on the job's tube), a usage error.
``explain_shadow`` does it for the enforced and the shadow ACL.
Pure: no I/O; the caller reads the config, the ACLs and the certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.acl import ALWAYS, COMMAND_VERBS, DELETE_OTHER_VERB, Policy, principal_mismatches
from proxy.errors import ProtocolError
from proxy.identity import Identity
from proxy.protocol import OP_PUT, parse_command_line
from proxy.session import denial_replies

__all__ = ["Explanation", "Query", "ShadowExplanation", "explain_command", "explain_shadow"]


@dataclass(frozen=True, slots=True)
class Explanation:
    """What ``explain`` prints for one policy: ``lines`` in order; ``allowed`` (exit 0) or
    denied or refused (exit 1); ``usage_error`` when the decision needs more input (printed
    after the lines, exit 2)."""

    lines: tuple[str, ...]
    allowed: bool
    usage_error: str | None = None


@dataclass(frozen=True, slots=True)
class ShadowExplanation:
    """``explain --shadow``: the enforced ACL's explanation and the shadow ACL's."""

    enforced: Explanation
    shadow: Explanation

    @property
    def mismatch(self) -> bool:
        """True when the two ACLs decide differently."""
        return self.enforced.allowed != self.shadow.allowed


class _Done(Exception):
    """Ends an explanation early (refused, rejected, or a usage error)."""

    def __init__(self, allowed: bool = False, usage_error: str | None = None) -> None:
        super().__init__(usage_error)
        self.allowed = allowed
        self.usage_error = usage_error


@dataclass(frozen=True, slots=True)
class Query:
    """What ``explain`` is asked: ``commandline`` sent by the holder of ``identity`` or by the
    principal named ``principal`` (exactly one of them). ``tube`` is the used, watched or
    job's tube (default for used/watched: ``default``); ``max_job_size`` and
    ``denial_reply`` are the config's ``limits.max_job_size`` and ``acl_denial_reply``."""

    commandline: str
    identity: Identity | None = None
    principal: str | None = None
    tube: str | None = None
    max_job_size: int = 65535
    denial_reply: str = "compatible"

    def __post_init__(self) -> None:
        if (self.identity is None) == (self.principal is None):
            raise ValueError("give exactly one of identity or principal")


def explain_command(policy: Policy, query: Query) -> Explanation:
    """How ``policy`` decides ``query``."""
    lines: list[str] = []
    try:
        name = _principal(policy, query.identity, query.principal, lines)
        allowed = _decide(policy, name, query, lines)
    except _Done as done:
        return Explanation(tuple(lines), done.allowed, done.usage_error)
    return Explanation(tuple(lines), allowed)


def explain_shadow(enforced: Policy, shadow: Policy, query: Query) -> ShadowExplanation:
    """``explain_command`` under the enforced ACL and under the shadow ACL."""
    return ShadowExplanation(explain_command(enforced, query), explain_command(shadow, query))


def _principal(policy: Policy, identity: Identity | None, name: str | None, out: list[str]) -> str:
    if name is not None:
        if name not in policy.principals:
            out.append(
                f"note: {name!r} is not a principal defined in {policy.source}; no certificate "
                f"can be mapped to it"
            )
        out.append(f"principal: {name}")
        _rate(policy, name, out)
        return name
    assert identity is not None
    out.append(f"certificate: {identity.describe()}")
    out.append(f"  subject: {identity.subject}")
    if identity.issuer is not None:
        out.append(f"  issuer: {identity.issuer} ({identity.issuer_fingerprint})")
    else:
        out.append(
            "  issuer: unknown (no chain from this file to a CA of tls.client_ca; "
            "`issuer` match keys do not hold)"
        )
    for label, values in (("dns", identity.dns), ("uri", identity.uris), ("ip", identity.ips)):
        if values:
            out.append(f"  {label}: {', '.join(values)}")
    out.append(f"  fingerprint: {identity.fingerprint}")
    if identity.refusal is not None:
        out.append(f"refused: {identity.refusal}")
        raise _Done
    principal = policy.principal_for(identity)
    if principal is None:
        out.append("no principal matches: connection refused")
        out.extend(f"  {line}" for line in principal_mismatches(policy, identity))
        raise _Done
    out.append(f"principal: {principal} ({policy.match_rule_for(identity)})")
    _rate(policy, principal, out)
    return principal


def _rate(policy: Policy, principal: str, out: list[str]) -> None:
    rate = policy.rate_for(principal)
    if rate is not None:
        out.append(
            f"  rate limit: {rate[0]:g} commands/s, burst {rate[1]} (over it: OUT_OF_MEMORY, "
            "or RATE_LIMITED with acl_denial_reply: explicit)"
        )


def _decide(policy: Policy, principal: str, query: Query, out: list[str]) -> bool:
    tube, max_job_size = query.tube, query.max_job_size
    try:
        parsed = parse_command_line(query.commandline.encode("utf-8"))
    except ProtocolError as exc:
        out.append(f"rejected: {exc}: the proxy answers BAD_FORMAT and closes the connection")
        return False
    except ValueError as exc:
        out.append(f"rejected: {exc}; nothing is forwarded")
        return False
    name: str = parsed.name
    verb: str = getattr(parsed, "verb", None) or COMMAND_VERBS[name]
    job_id: int | None = parsed.job_id

    if name == "put":
        size = parsed.command[-1]
        if isinstance(size, int) and size > max_job_size:
            out.append(
                f"rejected: body of {size} bytes exceeds limits.max_job_size "
                f"{max_job_size}: the client gets JOB_TOO_BIG"
            )
            return False

    if verb == ALWAYS:
        out.append(f"command: {name} (connection-local)")
        out.append("decision: ALLOW (always allowed: it only reads or narrows the connection)")
        return True

    check_tube: str | None
    if verb == "server":
        check_tube, where = None, "server-wide"
    elif parsed.tube is not None:
        check_tube, where = parsed.tube, f"tube {parsed.tube!r} (named in the command)"
    elif job_id is not None:
        if tube is None:
            if policy.uniform(principal, name, verb):
                out.append(f"command: {name} ({verb}) on job {job_id}")
                out.append(
                    f"decision: ALLOW on every tube ({name} is allowed for {principal} on any tube)"
                )
                return True
            raise _Done(
                usage_error=f"the decision for {name} depends on the job's tube; give it with "
                "--tube"
            )
        check_tube, where = tube, f"tube {tube!r} (the job's tube)"
    else:
        check_tube = tube or "default"
        role = "watched" if name.startswith("reserve") else "used"
        where = f"tube {check_tube!r} (the {role} tube)"
        if role == "watched":
            where += "; reserve is checked against every watched tube"

    out.append(f"command: {name} ({verb}) on {where}")
    decision = policy.decide(principal, name, verb, check_tube)
    replies, _ = denial_replies(query.denial_reply)
    denied_reply = replies[parsed.command[0]].decode().strip()
    if job_id is not None and check_tube and not policy.any_right(principal, check_tube).allowed:
        denied_reply = "NOT_FOUND"  # a job in a tube the principal may not see
    if decision.allowed:
        out.append(f"decision: ALLOW by {decision.rule}")
        limits = decision.limits
        command = parsed.command
        if command[0] is OP_PUT and limits is not None:
            _, pri, delay, ttr, size = command
            problem = limits.violation(pri, delay, ttr, size)
            if problem is not None:
                out.append(f"but refused by the rule's put limits: {problem}: {denied_reply}")
                return False
    else:
        out.append(f"decision: DENY by {decision.rule}: the client gets {denied_reply}")
    if name == "delete":
        other = policy.decide(principal, name, DELETE_OTHER_VERB, check_tube)
        verdict = "ALLOW" if other.allowed else "DENY"
        out.append(
            f"(the above is for a job this connection reserved; deleting any other job needs "
            f"{DELETE_OTHER_VERB}: {verdict} by {other.rule})"
        )
    if name == "list-tubes":
        out.append("(the reply lists only the tubes the principal holds some right on)")
    return decision.allowed

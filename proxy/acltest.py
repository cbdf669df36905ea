"""ACL decision tables: run test cases (already-parsed YAML data) against a ``Policy``.

``parse_cases`` validates a case document (``{"cases": [...]}``, see config/ACL.md) into
``Case`` values, raising ``ConfigError`` with a key path such as ``cases[3].expect``.
``run_cases`` decides every case exactly as the proxy does: the principal comes from
``Policy.principal_for`` (for cases giving identity fields or a certificate), and the command
line is fed to a real ``proxy.session.Session`` seeded with the case's connection state (used
tube, watch list, the job's tube, whether this connection reserved or buried the job). The
outcome is read from what the session forwards upstream (``allow``), what it records in
``denials`` (``deny``, or ``not_found`` for a job in a tube the principal may not see) and
what it answers itself (``not_found``, ``rejected`` for protocol errors). When the session
asks beanstalkd for a job's tube (``stats-job``), the answer is made from the case's
``job_tube`` and job state. The module is pure: certificates are loaded by the caller (the
CLI) and passed in as ``Identity`` values; no asyncio, socket, ssl, click or yaml imports.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from proxy import schema
from proxy.acl import ALWAYS, ANY, COMMAND_VERBS, DELETE_OTHER_VERB, TUBE_CHARS, Decision, Policy
from proxy.errors import ConfigError, ProtocolError
from proxy.identity import Identity
from proxy.protocol import JOB_TOO_BIG, NOT_FOUND, parse_command_line
from proxy.session import K_LOOKUP, K_STATS, K_STATS_JOB, Session

__all__ = [
    "CASE_KEYS",
    "IDENTITY_KEYS",
    "OUTCOMES",
    "Case",
    "CaseResult",
    "Report",
    "parse_cases",
    "run_cases",
]

OUTCOMES: Final = ("allow", "deny", "not_found", "refused", "rejected")
"""What a case may expect: forwarded; denied by a rule; answered NOT_FOUND (a job the
principal may not see, or one this connection does not hold); no principal for the
certificate or identity; refused as a protocol error (BAD_FORMAT, JOB_TOO_BIG ...)."""

CASE_KEYS: Final = (
    "name",
    "principal",
    "cert",
    "identity",
    "command",
    "used",
    "watched",
    "job_tube",
    "reserved",
    "buried",
    "expect",
    "rule",
)
IDENTITY_KEYS: Final = ("cn", "ou", "dns", "uri", "ip", "fingerprint", "spki", "issuer")
_LIST_IDENTITY_KEYS: Final = ("ou", "dns", "uri", "ip")
_HEX: Final = frozenset("0123456789abcdef")
_ZERO_PIN: Final = "sha256:" + "0" * 64
_OWN_COMMANDS: Final = ("release", "bury", "touch", "delete")


@dataclass(frozen=True, slots=True)
class Case:
    """One row of a decision table. Exactly one of ``principal``, ``cert``, ``identity``."""

    index: int
    name: str
    command: str
    expect: str
    principal: str | None = None
    cert: str | None = None  # a PEM path, loaded by the caller
    identity: Identity | None = None
    used: str = "default"
    watched: tuple[str, ...] = ("default",)
    job_tube: str | None = None
    reserved: bool = False
    buried: bool = False
    rule: str | None = None

    @property
    def label(self) -> str:
        return f"cases[{self.index}] {self.name!r}"


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    outcome: str
    rule: str  # the deciding rule (or the reason for refused / rejected / not_found)
    principal: str | None

    @property
    def passed(self) -> bool:
        return self.outcome == self.case.expect and (
            self.case.rule is None or rule_matches(self.case.rule, self.rule)
        )


@dataclass(frozen=True, slots=True)
class Report:
    results: tuple[CaseResult, ...]

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def passed(self) -> int:
        return len(self.results) - len(self.failures)


def rule_matches(expected: str, got: str) -> bool:
    """An expected rule matches the deciding rule's text exactly, or as its leading words:
    ``rules[3]`` matches ``rules[3] (deny all on secrets.*)`` (but not ``rules[30] ...``) and
    ``default deny`` matches every default deny."""
    return got == expected or got.startswith((expected + " ", expected + ":"))


# --------------------------------------------------------------------------------------------
# Parsing


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise schema.wrong_type(self.source, key, "a non-empty string", value)
        return value

    def tube(self, value: object, key: str) -> str:
        text = self.string(value, key)
        bad = sorted(set(text) - TUBE_CHARS)
        if bad or text.startswith("-") or len(text) > 200:
            raise self.fail(key, f"{text!r} is not a valid tube name")
        return text

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise schema.wrong_type(self.source, key, "true or false", value)
        return value

    def strings(self, value: object, key: str) -> tuple[str, ...]:
        if isinstance(value, str):
            return (self.string(value, key),)
        if not isinstance(value, list) or not value:
            raise self.fail(key, "expected a string or a non-empty list of strings")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))

    def pin(self, value: object, key: str) -> str:
        text = self.string(value, key).lower()
        prefix, _, digest = text.partition(":")
        digest = digest.replace(":", "")
        if prefix != "sha256" or len(digest) != 64 or not set(digest) <= _HEX:
            raise self.fail(key, f"expected 'sha256:' and 64 hex digits, got {value!r}")
        return "sha256:" + digest

    def identity(self, value: object, key: str) -> Identity:
        what = f"a mapping of {', '.join(IDENTITY_KEYS)}"
        value = schema.mapping(self.source, key, value, IDENTITY_KEYS, what)
        if not value:
            raise schema.wrong_type(self.source, key, what, value)
        lists = {
            k: self.strings(value[k], f"{key}.{k}") if k in value else ()
            for k in _LIST_IDENTITY_KEYS
        }
        cn = self.string(value["cn"], f"{key}.cn") if "cn" in value else None
        fingerprint = (
            self.pin(value["fingerprint"], f"{key}.fingerprint")
            if "fingerprint" in value
            else _ZERO_PIN
        )
        spki = self.pin(value["spki"], f"{key}.spki") if "spki" in value else _ZERO_PIN
        issuer = issuer_fp = None
        if "issuer" in value:
            text = self.string(value["issuer"], f"{key}.issuer")
            if text.lower().startswith("sha256:"):
                issuer_fp = self.pin(text, f"{key}.issuer")
            else:
                issuer = text
        names = ([f"CN={cn}"] if cn is not None else []) + [f"OU={o}" for o in lists["ou"]]
        subject = ",".join(names)
        return Identity(
            subject=subject,
            cn=cn,
            ous=lists["ou"],
            dns=lists["dns"],
            uris=lists["uri"],
            ips=lists["ip"],
            fingerprint=fingerprint,
            spki=spki,
            serial=0,
            not_after=datetime.max.replace(tzinfo=UTC),
            issuer=issuer,
            issuer_fingerprint=issuer_fp,
        )

    def case(self, raw: object, index: int) -> Case:
        key = f"cases[{index}]"
        what = "a mapping (name, principal, command, expect ...)"
        raw = schema.mapping(self.source, key, raw, CASE_KEYS, what)
        for required in ("command", "expect"):
            if required not in raw:
                raise schema.missing_key(self.source, f"{key}.{required}")
        who = [k for k in ("principal", "cert", "identity") if k in raw]
        if len(who) != 1:
            raise self.fail(key, "give exactly one of principal, cert or identity")
        command = self.string(raw["command"], f"{key}.command")
        expect = self.string(raw["expect"], f"{key}.expect")
        if expect not in OUTCOMES:
            raise self.fail(
                f"{key}.expect",
                f"unknown outcome {expect!r}; expected one of {', '.join(OUTCOMES)}",
            )
        if expect == "refused" and "principal" in raw:
            raise self.fail(
                f"{key}.expect", "refused needs a cert or identity (a principal is never refused)"
            )
        watched = (
            tuple(
                self.tube(t, f"{key}.watched[{i}]")
                for i, t in enumerate(self._list(raw["watched"], f"{key}.watched"))
            )
            if "watched" in raw
            else ("default",)
        )
        reserved = self.boolean(raw["reserved"], f"{key}.reserved") if "reserved" in raw else False
        buried = self.boolean(raw["buried"], f"{key}.buried") if "buried" in raw else False
        if reserved and buried:
            raise self.fail(f"{key}.buried", "a job is either reserved or buried, not both")
        return Case(
            index=index,
            name=self.string(raw["name"], f"{key}.name") if "name" in raw else command,
            command=command,
            expect=expect,
            principal=self.string(raw["principal"], f"{key}.principal")
            if "principal" in raw
            else None,
            cert=self.string(raw["cert"], f"{key}.cert") if "cert" in raw else None,
            identity=self.identity(raw["identity"], f"{key}.identity")
            if "identity" in raw
            else None,
            used=self.tube(raw["used"], f"{key}.used") if "used" in raw else "default",
            watched=watched,
            job_tube=self.tube(raw["job_tube"], f"{key}.job_tube") if "job_tube" in raw else None,
            reserved=reserved,
            buried=buried,
            rule=self.string(raw["rule"], f"{key}.rule") if "rule" in raw else None,
        )

    def _list(self, value: object, key: str) -> list[object]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, "expected a non-empty list of tube names")
        return value

    def document(self, data: object) -> tuple[Case, ...]:
        if not isinstance(data, Mapping) or set(data) != {"cases"}:
            raise self.fail("", "expected a mapping with one key, 'cases': a list of cases")
        raw = data["cases"]
        if not isinstance(raw, list) or not raw:
            raise self.fail("cases", "expected a non-empty list of cases")
        return tuple(self.case(c, i) for i, c in enumerate(raw))


def parse_cases(data: object, source: str) -> tuple[Case, ...]:
    """Validate a case document (parsed YAML); ``ConfigError`` with a key path on a problem."""
    return _Parser(source).document(data)


# --------------------------------------------------------------------------------------------
# Running


class _Holder:
    __slots__ = ("current",)

    def __init__(self, policy: Policy) -> None:
        self.current = policy


def _stats_job_reply(job: int, tube: str, state: str) -> bytes:
    body = b"---\nid: %d\ntube: %s\nstate: %s\n" % (job, tube.encode(), state.encode())
    return b"OK %d\r\n%s\r\n" % (len(body), body)


def _allow_rule(
    policy: Policy, principal: str, case: Case, name: str, tube: str | None, job: bool
) -> str:
    """The rule that allows a forwarded command (the session only records denials)."""
    verb = COMMAND_VERBS[name]
    if verb == ALWAYS:
        return "always allowed (connection-local command)"
    if verb == ANY:
        return policy.any_right(principal, tube or case.used).rule
    if verb == "server":
        return policy.decide(principal, name, verb, None).rule
    if tube is None and not job:
        tube = case.watched[0] if name in ("reserve", "reserve-with-timeout") else case.used
    own = case.reserved or case.buried
    if name == "delete" and not own:
        verb = DELETE_OTHER_VERB
    d: Decision = policy.decide(principal, name, verb, tube)
    if not d.allowed and (name in _OWN_COMMANDS or (name == "stats-job" and own)):
        for alt in ("consume", "manage"):  # a held job: consume or manage on its tube
            other = policy.decide(principal, name, alt, tube)
            if other.allowed:
                return other.rule
    return d.rule


def _run_one(
    policy: Policy,
    case: Case,
    principal: str,
    max_job_size: int,
    source: str,
) -> tuple[str, str]:
    line = case.command.encode("utf-8", "surrogateescape")
    try:
        parsed = parse_command_line(line)
    except (ProtocolError, ValueError) as exc:
        return "rejected", str(exc)
    job = parsed.job_id
    session = Session(_Holder(policy), principal, max_job_size, denial_reply="explicit")
    session.used = case.used
    session.watched = dict.fromkeys(case.watched)
    if job is not None and case.job_tube is not None:
        session.jobs = OrderedDict({job: case.job_tube})
    if job is not None and case.reserved:
        session.reserved = OrderedDict({job: (case.job_tube,) if case.job_tube else ()})
    if job is not None and case.buried:
        session.buried = OrderedDict({job: (case.job_tube,) if case.job_tube else ()})
    data = line + b"\r\n"
    if parsed.name == "put":
        size = parsed.command[-1]
        assert isinstance(size, int)
        if size > max_job_size:
            return "rejected", f"body of {size} bytes exceeds max_job_size {max_job_size}: " + (
                JOB_TOO_BIG.decode().strip()
            )
        data += b"x" * size + b"\r\n"
    session.feed_client(data)
    state = "reserved" if case.reserved else "buried" if case.buried else "ready"
    forwarded_kind = None
    for _ in range(3):  # a lookup, then the command it held (at most one more lookup)
        if not session.pending or session.failed:
            break
        kind = session.pending[-1][0]
        if kind not in (K_LOOKUP, K_STATS_JOB):
            forwarded_kind = kind
            break
        if case.job_tube is None:
            raise ConfigError(
                source,
                f"cases[{case.index}].job_tube",
                f"{parsed.name} of job {job} depends on the job's tube, which the proxy would "
                "ask beanstalkd for; give job_tube",
            )
        session.to_upstream.clear()
        assert job is not None
        session.feed_upstream(_stats_job_reply(job, case.job_tube, state))
    if session.denials:
        denial = session.denials[-1]
        outcome = "not_found" if denial["reply"] == NOT_FOUND.decode().strip() else "deny"
        return outcome, str(denial["rule"])
    if session.to_upstream or (forwarded_kind is None and session.to_client.startswith(b"OK ")):
        tube = parsed.tube or (case.job_tube if job is not None else None)
        rule = _allow_rule(policy, principal, case, parsed.name, tube, job is not None)
        if forwarded_kind == K_STATS:
            return "deny", f"{rule}: stats answered with counters zeroed and hosts redacted"
        return "allow", rule
    reply = bytes(session.to_client).strip().decode("ascii", "replace")
    if reply == NOT_FOUND.decode().strip():
        why = "this connection has not reserved the job" if job is not None else "no such tube"
        return "not_found", f"NOT_FOUND: {why} (beanstalkd's own answer)"
    return "rejected", reply or "no reply"


def run_cases(
    policy: Policy,
    cases: tuple[Case, ...],
    *,
    identities: Callable[[Case], Identity] | None = None,
    max_job_size: int = 65535,
    source: str = "<cases>",
) -> Report:
    """Decide every case; ``identities`` maps a ``cert`` case to the certificate's identity
    (the caller reads the file). Raises ``ConfigError`` (key path into ``source``) for a case
    whose decision needs state it does not give."""
    results = []
    for case in cases:
        identity = case.identity
        if case.cert is not None:
            if identities is None:
                raise ConfigError(source, f"cases[{case.index}].cert", "certificates not supported")
            identity = identities(case)
        principal = case.principal
        if identity is not None:
            if identity.refusal is not None:
                results.append(CaseResult(case, "refused", identity.refusal, None))
                continue
            principal = policy.principal_for(identity)
            if principal is None:
                results.append(CaseResult(case, "refused", "no principal matches", None))
                continue
        assert principal is not None
        if principal not in policy.principals:
            raise ConfigError(
                source,
                f"cases[{case.index}].principal",
                f"unknown principal {principal!r}; {policy.source} defines "
                f"{', '.join(policy.principals) or 'none'}",
            )
        outcome, rule = _run_one(policy, case, principal, max_job_size, source)
        results.append(CaseResult(case, outcome, rule, principal))
    return Report(tuple(results))

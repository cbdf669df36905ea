"""Fairness under hostile load: cheap ``list-tubes`` filtering, fair turns, bounded audit.

The pure part proves the compiled tube matcher (``Policy.visible_tubes``) answers exactly what
``Policy.any_right`` answers, over random rule sets and tube names (hypothesis), and that the
session's one-pass ``list-tubes`` filter equals the per-name reference. The integration part
runs a real beanstalkd behind the proxy with real TLS: a tube-restricted principal's
``list-tubes`` over thousands of tubes, a flood of denied commands next to a bystander (served
in bounded turns, every bystander reply delivered), and the audit log's size during the flood.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, Beanstalkd, Client, direct, run_bench, start_proxy
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.acl import COMMAND_VERBS, VERBS, Policy, parse_acl
from proxy.logs import AUDIT_LOGGER, JsonFormatter
from proxy.logsummary import AUDIT_BURST, WindowCounter
from proxy.relay import PolicyHolder
from proxy.session import TURN_BUDGET, Session, _yaml_scalar, ok_reply

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
        full = policy._any_right_full(who, name)  # rule by rule
        assert visible.match(name) == full.allowed, name
        assert policy.any_right(who, name) == full  # the fast path decides the same
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
            if policy._any_right_full(who, name).allowed:
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
    assert policy._any_right_full("p", name).allowed is visible
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
        assert visible.match(name) == policy._any_right_full("p", name).allowed
    body = b"---\n" + b"".join(b"- " + n.encode() + b"\n" for n in names * 500) + b"\r\n"
    assert Session(PolicyHolder(policy), "p")._filter_tubes(body) == _reference_filter(
        policy, "p", body
    )


# --------------------------------------------------------------------------------------------
# Integration: real beanstalkd, real TLS
# --------------------------------------------------------------------------------------------

#: admin's certificate is the bystander (all rights); worker's is tube-restricted; inspector's
#: maps to a principal with no rights at all (the attacker).
FAIR_ACL: dict[str, Any] = {
    "principals": [
        {"name": "bystander", "match": {"cn": "admin"}},
        {"name": "restricted", "match": {"cn": "worker"}},
        {"name": "nobody", "match": {"cn": "inspector"}},
    ],
    "rules": [
        {"principal": "bystander", "tubes": ["*"], "allow": ["all"]},
        {"principal": "restricted", "tubes": ["t1*", "t2*5"], "allow": ["put"]},
        {"principal": "restricted", "tubes": ["t12*"], "deny": ["all"]},
        {"principal": "restricted", "tubes": ["t3*"], "allow": ["stats-tube"]},
        {"principal": "restricted", "tubes": ["t3*7"], "deny": ["inspect"]},
    ],
}
N_TUBES = 10_000


async def _make_tubes(port: int, names: list[bytes], per_conn: int) -> list[Client]:
    """Create tubes by watching them (a tube exists while a connection watches it)."""
    holders = []
    for start in range(0, len(names), per_conn):
        c = await direct(port)
        chunk = names[start : start + per_conn]
        await c.send(b"".join(b"watch %s\r\n" % n for n in chunk))
        want = len(chunk)
        got = 0
        async with asyncio.timeout(30):
            while got < want:
                line = await c.reader.readuntil(b"\r\n")
                assert line.startswith(b"WATCHING "), line
                got += 1
        holders.append(c)
    return holders


async def test_list_tubes_over_many_tubes_shows_exactly_the_visible_ones(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    names = [b"t%d" % i for i in range(N_TUBES)]
    holders = await _make_tubes(beanstalkd.port, names, 5000)
    running = await start_proxy(pki, beanstalkd.port, FAIR_ACL)
    try:
        admin = await direct(beanstalkd.port)
        _, everything = await admin.call(b"list-tubes")
        assert everything is not None
        all_names = [ln[2:].decode() for ln in everything.split(b"\n") if ln.startswith(b"- ")]
        assert len(all_names) == N_TUBES + 1  # and "default"
        policy = running.server.policy.current
        expected = [n for n in all_names if policy._any_right_full("restricted", n).allowed]
        assert 100 < len(expected) < N_TUBES / 2  # a real filter, neither all nor none
        c = await running.connect("worker")
        for _ in range(3):  # pipelined, like the attack in the issue
            await c.send(b"list-tubes\r\n")
        for _ in range(3):
            line, body = await c.reply()
            assert line.startswith(b"OK ") and body is not None
            assert body == ("---\n" + "".join(f"- {n}\n" for n in expected)).encode()
        # and nothing for a principal with no rights; everything for the bystander
        nobody = await running.connect("inspector")
        assert await nobody.call(b"list-tubes") == (b"OK 4", b"---\n")
        by = await running.connect("admin")
        _, seen = await by.call(b"list-tubes")
        assert seen is not None and seen.count(b"\n- ") == N_TUBES + 1
        for client in (c, nobody, by, admin):
            await client.close()
    finally:
        await running.server.close()
        for h in holders:
            await h.close()


class _AuditBytes(logging.Handler):
    """Counts the bytes the audit logger would write as JSON lines, and keeps the records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.bytes = 0
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.bytes += len(self.format(record)) + 1
        self.records.append(record)


@pytest.fixture
def audit_bytes() -> Iterator[_AuditBytes]:
    logger = logging.getLogger(AUDIT_LOGGER)
    handler = _AuditBytes()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


N_FLOOD = 200_000


async def test_denied_flood_is_served_in_turns_and_audited_in_summary(
    pki: PKI, beanstalkd: Beanstalkd, audit_bytes: _AuditBytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record, per session, the most commands one turn ran (a test-only wrapper).
    most: dict[int, int] = {}
    resumed: dict[int, int] = {}
    real_run, real_resume = Session._run, Session.resume

    def run(self: Session) -> None:
        before = sum(self.op_counts)
        real_run(self)
        ran = sum(self.op_counts) - before
        most[id(self)] = max(most.get(id(self), 0), ran)

    def resume(self: Session) -> None:
        resumed[id(self)] = resumed.get(id(self), 0) + 1
        real_resume(self)

    monkeypatch.setattr(Session, "_run", run)
    monkeypatch.setattr(Session, "resume", resume)

    running = await start_proxy(pki, beanstalkd.port, FAIR_ACL)
    # One window for the whole flood, so what is logged does not depend on how fast this
    # machine is (production windows are AUDIT_WINDOW; the timer path is tested below).
    running.server.denial_audit = WindowCounter(AUDIT_BURST, window=3600.0)
    try:
        bystander = await running.connect("admin")
        attacker = await running.connect("inspector")
        assert await attacker.line(b"use z0") == b"NOT_PERMITTED"  # session is up
        flood = b"".join(b"use z%07d\r\n" % i for i in range(1, N_FLOOD))
        reply = b"NOT_PERMITTED\r\n"

        async def attack() -> int:
            attacker.writer.write(flood)
            want = len(reply) * (N_FLOOD - 1)
            got = 0
            async with asyncio.timeout(120):
                while got < want:
                    chunk = await attacker.reader.read(1 << 16)
                    assert chunk, "the attacker's connection closed"
                    got += len(chunk)
            return got

        async def bystand() -> int:
            served = 0
            while not flooding.done():
                assert await bystander.line(b"list-tube-used") == b"USING default"
                served += 1
            return served

        flooding = asyncio.ensure_future(attack())
        served = await bystand()
        assert await flooding == len(reply) * (N_FLOOD - 1)
        assert served > 0  # the bystander was answered every time, during the flood
        conn = next(c for c in running.server.connections if c.principal == "nobody")
        session = conn.session
        assert session is not None
        assert sum(session.denied_counts) == N_FLOOD
        # served in turns: never more than the budget at once, resumed by the relay
        assert most[id(session)] <= TURN_BUDGET
        assert session.yields >= 1 and resumed.get(id(session), 0) >= session.yields
        assert sum(session.op_counts) == N_FLOOD

        await attacker.close()
        sent = len(flood) + len(b"use z0\r\n")

        def counted() -> tuple[int, int]:
            lines = [r for r in audit_bytes.records if r.getMessage() == "denied"]
            summaries = [r for r in audit_bytes.records if r.getMessage() == "denials suppressed"]
            suppressed = sum(r.fields["suppressed"] for r in summaries)  # type: ignore[attr-defined]
            return len(lines), suppressed

        async with asyncio.timeout(10):  # the close flushes the last window's summary
            while sum(counted()) < N_FLOOD:
                await asyncio.sleep(0.05)
        logged, suppressed = counted()
        assert (logged, suppressed) == (AUDIT_BURST, N_FLOOD - AUDIT_BURST)
        (summary,) = [r for r in audit_bytes.records if r.getMessage() == "denials suppressed"]
        fields = summary.fields  # type: ignore[attr-defined]
        assert fields["principal"] == "nobody" and fields["peer"].startswith("127.0.0.1:")
        assert fields["by_command"] == {"use": N_FLOOD - AUDIT_BURST}
        assert audit_bytes.bytes < sent / 100, (audit_bytes.bytes, sent)
        await bystander.close()
    finally:
        await running.server.close()


async def test_denial_summary_is_logged_when_the_window_ends(
    pki: PKI, beanstalkd: Beanstalkd, audit_bytes: _AuditBytes
) -> None:
    """Without closing the connection: the summary comes from the window timer."""
    running = await start_proxy(pki, beanstalkd.port, FAIR_ACL)
    running.server.denial_audit = WindowCounter(burst=3, window=0.2)
    try:
        attacker = await running.connect("inspector")
        await attacker.send(b"".join(b"use y%d\r\n" % i for i in range(10)) + b"watch x\r\n")
        for _ in range(11):
            assert (await attacker.reply())[0] == b"NOT_PERMITTED"
        async with asyncio.timeout(10):
            while not [r for r in audit_bytes.records if r.getMessage() == "denials suppressed"]:
                await asyncio.sleep(0.02)
        (summary,) = [r for r in audit_bytes.records if r.getMessage() == "denials suppressed"]
        assert summary.fields["by_command"] == {"use": 7, "watch": 1}  # type: ignore[attr-defined]
        assert summary.fields["suppressed"] == 8  # type: ignore[attr-defined]
        assert len([r for r in audit_bytes.records if r.getMessage() == "denied"]) == 3
        # still open, and a new window logs again
        assert await attacker.line(b"use again") == b"NOT_PERMITTED"
        async with asyncio.timeout(10):
            while len([r for r in audit_bytes.records if r.getMessage() == "denied"]) < 4:
                await asyncio.sleep(0.02)
        await attacker.close()
    finally:
        await running.server.close()


@pytest.mark.integration
def test_bench_fairness_workload_runs(tmp_path: Path) -> None:
    """``bench/bench.py --fairness`` runs to the end on a few tubes (never asserts speed)."""
    out_json = tmp_path / "fair.json"
    proc = run_bench("--fairness", "--tubes", "300", "--seconds", "0.5", "--json", str(out_json))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    result = json.loads(out_json.read_text())["results"]["proxy"]["fairness"]
    for phase in ("idle", "flood", "list_tubes"):
        assert result[phase]["round_trips"] > 0, output
    assert result["flood"]["denials_per_s"] > 0
    assert result["list_tubes"]["visible_tubes"] == 111  # t1, t10..t19, t100..t199 of t0..t299
    assert re.search(r"^  flood\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+", proc.stdout, re.M), output

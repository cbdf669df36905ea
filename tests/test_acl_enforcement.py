"""ACL enforcement of all 25 commands through the real proxy against a real beanstalkd.

Every command is run as a table row in three variants -- allowed, denied by default (no rule
grants it) and denied by an explicit deny rule -- by principals holding real client
certificates. A shared "world" of jobs is set up directly on beanstalkd first (two tenants'
tubes ``alpha`` and ``beta`` plus ``default``, with ready, delayed, buried and reserved jobs).
For each denial the tests check the reply, that the connection stays usable, that beanstalkd
shows nothing happened (server, tube and job stats compared before and after, net of the
observer's own commands), and that exactly one audit line was logged, without any job body.
Allowed rows check the effect really happened. Further tests cover cross-tenant job ids,
``list-tubes`` filtering, ``stats`` redaction, the implicit ``default`` tube, producer
constraints, and consumers sending their commands in any order.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import PKI, Beanstalkd, Client, direct, parse_yaml_map, serving

from proxy.identity import identity_from_der

pytestmark = pytest.mark.integration

ALPHA, BETA, GAMMA = "alpha", "beta", "gamma"  # tenant's tube, rival's tube, a tube nobody made

#: principal -> certificate name in the test PKI.
CERT = {"tenant": "worker", "rival": "billing", "ops": "admin", "auditor": "inspector"}

PRINCIPALS: list[dict[str, Any]] = [
    {"name": "tenant", "match": {"cn": "worker", "ou": "jobs"}},
    {"name": "rival", "match": {"uri": "spiffe://example.org/billing/*"}},
    {"name": "ops", "match": {"cn": "admin"}},
    {"name": "auditor", "match": {"cn": "inspector"}},
]

BASE_RULES: list[dict[str, Any]] = [
    {"principal": "ops", "tubes": ["*"], "allow": ["all"]},
    {"principal": "rival", "tubes": [BETA], "allow": ["all"]},
    {"principal": "auditor", "tubes": ["*"], "allow": ["inspect"]},
]

SECRET = b"SECRET"  # every job body contains it; it must never reach a log line


def acl(*tenant_rules: dict[str, Any]) -> dict[str, Any]:
    """The test ACL: fixed rules for the other principals plus ``tenant_rules``."""
    rules = [*BASE_RULES]
    for r in tenant_rules:
        rules.append({"principal": "tenant", **r})
    return {"principals": PRINCIPALS, "rules": rules}


def allow(verbs: list[str], *tubes: str, **extra: Any) -> dict[str, Any]:
    return {"tubes": list(tubes), "allow": verbs, **extra}


def deny(verbs: list[str], *tubes: str) -> dict[str, Any]:
    return {"tubes": list(tubes), "deny": verbs}


# --------------------------------------------------------------------------------------------
# The world: jobs made directly on beanstalkd, and an observer that snapshots the server
# --------------------------------------------------------------------------------------------

#: Job names -> ids (a fresh beanstalkd numbers jobs from 1, in the order ``build_world`` puts).
IDS = {
    "a_buried": 1,
    "a_taken": 2,  # reserved by another (direct) connection
    "a_ready": 3,
    "a_delayed": 4,
    "b_buried": 5,
    "b_taken": 6,
    "b_ready": 7,
    "b_delayed": 8,
    "d_ready": 9,
    "new": 10,  # the next id beanstalkd hands out
    "missing": 999,
}
TUBES = ("default", ALPHA, BETA, GAMMA)
JOBS = tuple(range(1, 13))

Snapshot = dict[str, Any]

#: Fields that change by themselves (time, rusage) or with connections coming and going.
VOLATILE = frozenset(
    {
        "uptime",
        "rusage-utime",
        "rusage-stime",
        "current-connections",
        "total-connections",
        "age",
        "time-left",
        "pause-time-left",
    }
)


async def expect(c: Client, line: bytes, reply: bytes, body: bytes | None = None) -> bytes:
    got, _ = await c.call(line, body)
    assert got == reply, (line, got)
    return got


async def put_direct(c: Client, body: bytes, pri: int = 0, delay: int = 0, ttr: int = 60) -> int:
    line = await c.put(body, pri, delay, ttr)
    assert line.startswith(b"INSERTED "), line
    return int(line.split()[1])


@dataclass
class World:
    """The jobs of ``IDS``; ``holder`` keeps ``a_taken`` and ``b_taken`` reserved."""

    port: int
    holder: Client
    observer: Client
    real: dict[str, str] = field(default_factory=dict)  # the server's unredacted stats

    async def snapshot(self) -> Snapshot:
        """Server, tube and job stats as seen directly. The observer's own commands are
        ``stats`` first, then len(TUBES) ``stats-tube``, len(JOBS) ``stats-job``, one
        ``list-tubes``; ``delta`` nets them out."""
        o = self.observer
        snap: Snapshot = {"server": await o.stats(), "tubes": {}, "jobs": {}}
        for t in TUBES:
            line, body = await o.call(b"stats-tube " + t.encode())
            snap["tubes"][t] = parse_yaml_map(body) if body is not None else None
            assert body is not None or line == b"NOT_FOUND"
        for j in JOBS:
            line, body = await o.call(b"stats-job %d" % j)
            snap["jobs"][j] = parse_yaml_map(body) if body is not None else None
            assert body is not None or line == b"NOT_FOUND"
        _, body = await o.call(b"list-tubes")
        assert body is not None
        snap["list"] = sorted(x[2:] for x in body.decode().splitlines() if x.startswith("- "))
        return snap

    async def close(self) -> None:
        await self.holder.close()
        await self.observer.close()


OBSERVER_CMDS = {
    "cmd-stats": 1,
    "cmd-stats-tube": len(TUBES),
    "cmd-stats-job": len(JOBS),
    "cmd-list-tubes": 1,
}


def delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Every change between two snapshots, net of the observer's own commands.

    Keys: ``cmd-X`` -> counter increase; ``server.K`` / ``tube.T.K`` / ``job.N.K`` -> (old, new);
    ``tube.T`` / ``job.N`` -> (old, new) when it appeared or vanished; ``list`` -> (old, new).
    """
    out: dict[str, Any] = {}
    sb, sa = before["server"], after["server"]
    for k in sorted(set(sb) | set(sa)):
        if k in VOLATILE:
            continue
        if k.startswith("cmd-"):
            d = int(sa[k]) - int(sb[k]) - OBSERVER_CMDS.get(k, 0)
            if d:
                out[k] = d
        elif sb.get(k) != sa.get(k):
            out[f"server.{k}"] = (sb.get(k), sa.get(k))
    for kind in ("tubes", "jobs"):
        prefix = kind[:-1]
        for name, old in before[kind].items():
            new = after[kind][name]
            if (old is None) != (new is None):
                out[f"{prefix}.{name}"] = (old and "exists", new and "exists")
                continue
            if old is None:
                continue
            for k in sorted(set(old) | set(new)):
                if k not in VOLATILE and old.get(k) != new.get(k):
                    out[f"{prefix}.{name}.{k}"] = (old.get(k), new.get(k))
    if before["list"] != after["list"]:
        out["list"] = (before["list"], after["list"])
    return out


async def seed_tube(d: Client, tube: bytes, previous: bytes) -> None:
    """``tube``'s jobs of ``IDS`` (key prefix: its first letter), put over ``d``, which
    watches only ``tube`` afterwards (``previous`` was the one it watched) and keeps the
    ``taken`` one reserved."""
    k = tube[:1].decode()
    await expect(d, b"use " + tube, b"USING " + tube)
    await expect(d, b"watch " + tube, b"WATCHING 2")
    await expect(d, b"ignore " + previous, b"WATCHING 1")
    buried = IDS[f"{k}_buried"]
    assert await put_direct(d, b"SECRET %s buried" % tube) == buried
    assert (await d.line(b"reserve-with-timeout 0")).startswith(b"RESERVED %d " % buried)
    await expect(d, b"bury %d 0" % buried, b"BURIED")
    taken = IDS[f"{k}_taken"]
    assert await put_direct(d, b"SECRET %s taken" % tube, ttr=3600) == taken
    assert (await d.line(b"reserve-with-timeout 0")).startswith(b"RESERVED %d " % taken)
    assert await put_direct(d, b"SECRET %s ready" % tube, pri=100) == IDS[f"{k}_ready"]
    assert await put_direct(d, b"SECRET %s delayed" % tube, delay=3600) == IDS[f"{k}_delayed"]


async def build_world(port: int) -> World:
    d = await direct(port)
    await seed_tube(d, b"alpha", b"default")
    await seed_tube(d, b"beta", b"alpha")
    await expect(d, b"use default", b"USING default")
    assert await put_direct(d, b"SECRET default ready", pri=100) == IDS["d_ready"]
    observer = await direct(port)
    world = World(port, d, observer)
    world.real = await observer.stats()
    return world


@pytest.fixture
async def world(beanstalkd: Beanstalkd) -> AsyncIterator[World]:
    w = await build_world(beanstalkd.port)
    try:
        yield w
    finally:
        await w.close()


def fingerprint(pki: PKI, cert: str) -> str:
    with open(pki.dir / f"{cert}.pem") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return identity_from_der(der).fingerprint


def audit_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(r.fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "beanstalk_proxy.audit" and r.getMessage() == "denied"
    ]


def assert_no_body_logged(caplog: pytest.LogCaptureFixture) -> None:
    for r in caplog.records:
        assert SECRET.decode() not in r.getMessage(), r.getMessage()
        assert SECRET.decode() not in json.dumps(getattr(r, "fields", None), default=str)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

ALLOWED, DEFAULT, EXPLICIT = "allowed", "denied-by-default", "denied-explicitly"

#: Preludes: (command line, expected reply line) pairs the tenant sends before the command.
USE_ALPHA = ((b"use alpha", b"USING alpha"),)
RESERVE_A_READY = (
    (b"watch alpha", b"WATCHING 2"),
    (b"ignore default", b"WATCHING 1"),
    (b"reserve-with-timeout 0", b"RESERVED 3 18"),
)

Effect = Callable[[dict[str, Any], World], None]


@dataclass
class Case:
    command: str  # the beanstalkd command name this row is about
    kind: str  # ALLOWED / DEFAULT / EXPLICIT
    rules: tuple[dict[str, Any], ...]
    line: bytes
    reply: bytes  # exact reply line expected
    prelude: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None  # put body
    effect: Effect | None = None  # for rows that are not denials: checks the delta
    lookups: int = 0  # stats-job commands the proxy may send upstream for the decision
    audit: bool | None = None  # default: True for NOT_PERMITTED / NOT_FOUND replies
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.command}-{self.kind}{'-' + self.note if self.note else ''}"

    @property
    def denied(self) -> bool:
        return self.reply in (b"NOT_PERMITTED", b"NOT_FOUND")


def state(n: str, value: str) -> Effect:
    def check(d: dict[str, Any], _w: World) -> None:
        key = f"job.{IDS[n]}.state"
        assert key in d and d[key][1] == value, d

    return check


def cmd_count(name: str, n: int = 1) -> Effect:
    def check(d: dict[str, Any], _w: World) -> None:
        assert d.get(f"cmd-{name}") == n, d

    return check


def both(*checks: Effect) -> Effect:
    def check(d: dict[str, Any], w: World) -> None:
        for c in checks:
            c(d, w)

    return check


def only_counter(name: str) -> Effect:
    """The command was forwarded and changed nothing but its own counter."""

    def check(d: dict[str, Any], _w: World) -> None:
        assert d == {f"cmd-{name}": 1}, d

    return check


def gone(n: str) -> Effect:
    def check(d: dict[str, Any], _w: World) -> None:
        assert d.get(f"job.{IDS[n]}") == ("exists", None), d

    return check


def nothing(d: dict[str, Any], _w: World) -> None:
    assert d == {}, d


def tube_field(tube: str, key: str, new: str) -> Effect:
    def check(d: dict[str, Any], _w: World) -> None:
        assert d.get(f"tube.{tube}.{key}", (None, None))[1] == new, d

    return check


ALL_ALPHA = allow(["all"], ALPHA)
ALL_EVERYWHERE = allow(["all"], "*")

# fmt: off
CASES: list[Case] = [
    # --- put (produce, used tube) ------------------------------------------------------------
    Case("put", ALLOWED, (allow(["produce"], ALPHA),), b"put 0 0 60 11", b"INSERTED 10",
         USE_ALPHA, b"SECRET new!", both(cmd_count("put"), tube_field(ALPHA, "total-jobs", "5"))),
    Case("put", DEFAULT, (allow(["consume"], ALPHA),), b"put 0 0 60 11", b"NOT_PERMITTED",
         USE_ALPHA, b"SECRET new!"),
    Case("put", DEFAULT, (allow(["produce"], ALPHA),), b"put 0 0 60 11", b"NOT_PERMITTED",
         (), b"SECRET new!", note="default-tube"),
    Case("put", EXPLICIT, (ALL_ALPHA, deny(["put"], ALPHA)), b"put 0 0 60 11",
         b"NOT_PERMITTED", USE_ALPHA, b"SECRET new!"),
    Case("put", EXPLICIT, (ALL_EVERYWHERE, {"principal": "*", "tubes": ["al*"],
                                            "deny": ["produce"]}),
         b"put 0 0 60 11", b"NOT_PERMITTED", USE_ALPHA, b"SECRET new!", note="star-principal"),
    # --- use (any right on the tube) ---------------------------------------------------------
    Case("use", ALLOWED, (allow(["inspect"], ALPHA),), b"use alpha", b"USING alpha",
         effect=both(cmd_count("use"), tube_field(ALPHA, "current-using", "1"))),
    Case("use", DEFAULT, (ALL_ALPHA,), b"use gamma", b"NOT_PERMITTED"),
    Case("use", EXPLICIT, (ALL_EVERYWHERE, deny(["all"], GAMMA)), b"use gamma",
         b"NOT_PERMITTED"),
    # --- reserve / reserve-with-timeout (consume on every watched tube) ----------------------
    *(
        c
        for name, line in (("reserve", b"reserve"),
                           ("reserve-with-timeout", b"reserve-with-timeout 0"))
        for c in (
            Case(name, ALLOWED, (allow(["consume"], ALPHA),), line, b"RESERVED 3 18",
                 RESERVE_A_READY[:2], effect=state("a_ready", "reserved")),
            Case(name, DEFAULT, (allow(["consume"], ALPHA),), line, b"NOT_PERMITTED",
                 ((b"watch alpha", b"WATCHING 2"),), note="default-still-watched"),
            Case(name, EXPLICIT, (ALL_EVERYWHERE, deny(["consume"], "default")), line,
                 b"NOT_PERMITTED", ((b"watch alpha", b"WATCHING 2"),)),
        )
    ),
    # --- reserve-job (manage on the job's tube) ----------------------------------------------
    Case("reserve-job", ALLOWED, (allow(["manage"], ALPHA),), b"reserve-job 4",
         b"RESERVED 4 20", effect=state("a_delayed", "reserved"), lookups=1),
    Case("reserve-job", DEFAULT, (allow(["consume", "inspect"], ALPHA),), b"reserve-job 4",
         b"NOT_PERMITTED", lookups=1),
    Case("reserve-job", EXPLICIT, (ALL_ALPHA, deny(["reserve-job"], ALPHA)), b"reserve-job 3",
         b"NOT_PERMITTED", lookups=1),
    # --- delete (consume for own reservation, manage otherwise) ------------------------------
    Case("delete", ALLOWED, (allow(["consume"], ALPHA),), b"delete 3", b"DELETED",
         RESERVE_A_READY, effect=both(cmd_count("delete"), gone("a_ready"))),
    Case("delete", ALLOWED, (allow(["manage"], ALPHA),), b"delete 1", b"DELETED",
         effect=both(cmd_count("delete"), gone("a_buried")), lookups=1, note="not-reserved"),
    Case("delete", DEFAULT, (allow(["consume"], ALPHA),), b"delete 3", b"NOT_PERMITTED",
         lookups=1, note="not-reserved"),
    Case("delete", EXPLICIT, (ALL_ALPHA, deny(["delete"], ALPHA)), b"delete 3",
         b"NOT_PERMITTED", RESERVE_A_READY),
    # --- release / bury / touch (consume; only this connection's reservations) --------------
    *(
        c
        for name, line, ok, eff in (
            ("release", b"release 3 5 0", b"RELEASED", state("a_ready", "ready")),
            ("bury", b"bury 3 5", b"BURIED", state("a_ready", "buried")),
            ("touch", b"touch 3", b"TOUCHED", cmd_count("touch")),
        )
        for c in (
            Case(name, ALLOWED, (allow(["consume"], ALPHA),), line, ok, RESERVE_A_READY,
                 effect=eff),
            Case(name, DEFAULT, (allow(["watch", "reserve-with-timeout"], ALPHA),), line,
                 b"NOT_PERMITTED", RESERVE_A_READY),
            Case(name, EXPLICIT, (allow(["consume"], ALPHA), deny([name], ALPHA)), line,
                 b"NOT_PERMITTED", RESERVE_A_READY),
        )
    ),
    # --- watch (consume on the named tube) ---------------------------------------------------
    Case("watch", ALLOWED, (allow(["consume"], ALPHA),), b"watch alpha", b"WATCHING 2",
         effect=both(cmd_count("watch"), tube_field(ALPHA, "current-watching", "1"))),
    Case("watch", DEFAULT, (allow(["inspect"], ALPHA),), b"watch alpha", b"NOT_PERMITTED"),
    Case("watch", EXPLICIT, (ALL_EVERYWHERE, deny(["consume"], GAMMA)), b"watch gamma",
         b"NOT_PERMITTED"),
    # --- ignore (always allowed) -------------------------------------------------------------
    Case("ignore", ALLOWED, (allow(["consume"], ALPHA),), b"ignore default", b"WATCHING 1",
         ((b"watch alpha", b"WATCHING 2"),), effect=cmd_count("ignore")),
    Case("ignore", DEFAULT, (), b"ignore default", b"NOT_IGNORED", effect=only_counter("ignore")),
    Case("ignore", EXPLICIT, (deny(["all"], "*"),), b"ignore alpha", b"WATCHING 1",
         effect=only_counter("ignore")),
    # --- peek <id> (inspect on the job's tube) -----------------------------------------------
    Case("peek", ALLOWED, (allow(["inspect"], ALPHA),), b"peek 4", b"FOUND 4 20",
         effect=only_counter("peek"), lookups=1),
    Case("peek", DEFAULT, (allow(["consume"], ALPHA),), b"peek 4", b"NOT_PERMITTED", lookups=1),
    Case("peek", DEFAULT, (allow(["all"], GAMMA),), b"peek 4", b"NOT_FOUND", lookups=1,
         note="invisible-tube"),
    Case("peek", EXPLICIT, (ALL_ALPHA, deny(["peek"], ALPHA)), b"peek 4", b"NOT_PERMITTED",
         lookups=1),
    Case("peek", EXPLICIT, (ALL_EVERYWHERE, deny(["all"], ALPHA)), b"peek 4", b"NOT_FOUND",
         lookups=1, note="invisible-tube"),
    # --- peek-ready / peek-delayed / peek-buried (inspect on the used tube) ------------------
    *(
        c
        for name, ok in (
            ("peek-ready", b"FOUND 3 18"),
            ("peek-delayed", b"FOUND 4 20"),
            ("peek-buried", b"FOUND 1 19"),
        )
        for c in (
            Case(name, ALLOWED, (allow(["inspect"], ALPHA),), name.encode(), ok, USE_ALPHA,
                 effect=only_counter(name)),
            Case(name, DEFAULT, (allow(["produce"], ALPHA),), name.encode(), b"NOT_PERMITTED",
                 USE_ALPHA),
            Case(name, DEFAULT, (allow(["inspect"], ALPHA),), name.encode(), b"NOT_PERMITTED",
                 note="default-tube"),
            Case(name, EXPLICIT, (ALL_ALPHA, deny(["inspect"], ALPHA)), name.encode(),
                 b"NOT_PERMITTED", USE_ALPHA),
        )
    ),
    # --- kick (manage on the used tube) ------------------------------------------------------
    Case("kick", ALLOWED, (allow(["manage"], ALPHA),), b"kick 10", b"KICKED 1", USE_ALPHA,
         effect=both(cmd_count("kick"), state("a_buried", "ready"))),
    Case("kick", DEFAULT, (allow(["inspect"], ALPHA),), b"kick 10", b"NOT_PERMITTED",
         USE_ALPHA),
    Case("kick", EXPLICIT, (ALL_ALPHA, deny(["kick"], ALPHA)), b"kick 10", b"NOT_PERMITTED",
         USE_ALPHA),
    # --- kick-job (manage on the job's tube) -------------------------------------------------
    Case("kick-job", ALLOWED, (allow(["manage"], ALPHA),), b"kick-job 1", b"KICKED",
         effect=state("a_buried", "ready"), lookups=1),
    Case("kick-job", DEFAULT, (allow(["inspect"], ALPHA),), b"kick-job 1", b"NOT_PERMITTED",
         lookups=1),
    Case("kick-job", EXPLICIT, (ALL_ALPHA, deny(["manage"], ALPHA)), b"kick-job 4",
         b"NOT_PERMITTED", lookups=1),
    # --- stats-job (inspect on the job's tube) -----------------------------------------------
    Case("stats-job", ALLOWED, (allow(["inspect"], ALPHA),), b"stats-job 4", b"OK",
         effect=nothing, lookups=1),
    Case("stats-job", DEFAULT, (allow(["consume"], ALPHA),), b"stats-job 4", b"NOT_PERMITTED",
         lookups=1),
    Case("stats-job", EXPLICIT, (ALL_ALPHA, deny(["stats-job"], ALPHA)), b"stats-job 4",
         b"NOT_PERMITTED", lookups=1),
    # --- stats-tube (inspect on the named tube) ----------------------------------------------
    Case("stats-tube", ALLOWED, (allow(["inspect"], ALPHA),), b"stats-tube alpha", b"OK",
         effect=only_counter("stats-tube")),
    Case("stats-tube", DEFAULT, (allow(["consume"], ALPHA),), b"stats-tube alpha",
         b"NOT_PERMITTED"),
    Case("stats-tube", EXPLICIT, (ALL_EVERYWHERE, deny(["inspect"], BETA)), b"stats-tube beta",
         b"NOT_PERMITTED"),
    # --- stats (server: unredacted, otherwise host-identifying fields redacted) --------------
    Case("stats", ALLOWED, (allow(["server"], "*"),), b"stats", b"OK",
         effect=only_counter("stats")),
    Case("stats", DEFAULT, (ALL_ALPHA,), b"stats", b"OK", effect=only_counter("stats")),
    Case("stats", EXPLICIT, (ALL_EVERYWHERE, deny(["stats"], "*")), b"stats", b"OK",
         effect=only_counter("stats")),
    # --- list-tubes (inspect; filtered to tubes with any right) ------------------------------
    Case("list-tubes", ALLOWED, (allow(["inspect"], "*"),), b"list-tubes", b"OK",
         effect=only_counter("list-tubes")),
    Case("list-tubes", DEFAULT, (allow(["consume"], ALPHA),), b"list-tubes", b"OK",
         effect=only_counter("list-tubes")),
    Case("list-tubes", EXPLICIT, (ALL_EVERYWHERE, deny(["all"], BETA)), b"list-tubes", b"OK",
         effect=only_counter("list-tubes")),
    # --- list-tube-used / list-tubes-watched (always allowed) --------------------------------
    *(
        Case(name, kind, rules, name.encode(), ok, effect=only_counter(name))
        for name, ok in (("list-tube-used", b"USING default"), ("list-tubes-watched", b"OK"))
        for kind, rules in (
            (ALLOWED, (ALL_ALPHA,)),
            (DEFAULT, ()),
            (EXPLICIT, (deny(["all"], "*"),)),
        )
    ),
    # --- pause-tube (manage on the named tube) -----------------------------------------------
    Case("pause-tube", ALLOWED, (allow(["manage"], ALPHA),), b"pause-tube alpha 3600",
         b"PAUSED", effect=both(cmd_count("pause-tube"), tube_field(ALPHA, "pause", "3600"))),
    Case("pause-tube", DEFAULT, (allow(["inspect", "consume"], ALPHA),),
         b"pause-tube alpha 3600", b"NOT_PERMITTED"),
    Case("pause-tube", EXPLICIT, (ALL_ALPHA, deny(["pause-tube"], ALPHA)),
         b"pause-tube alpha 3600", b"NOT_PERMITTED"),
    # --- quit (always allowed): checked separately, the connection ends ----------------------
]
# fmt: on

COMMANDS_1_12 = {
    "put",
    "use",
    "reserve",
    "reserve-with-timeout",
    "reserve-job",
    "delete",
    "release",
    "bury",
    "touch",
    "watch",
    "ignore",
    "peek",
    "peek-ready",
    "peek-delayed",
    "peek-buried",
    "kick",
    "kick-job",
    "stats-job",
    "stats-tube",
    "stats",
    "list-tubes",
    "list-tube-used",
    "list-tubes-watched",
    "pause-tube",
    "quit",
}


def test_table_covers_every_command_three_ways() -> None:
    seen = {(c.command, c.kind) for c in CASES} | {
        ("quit", k) for k in (ALLOWED, DEFAULT, EXPLICIT)
    }
    assert {c for c, _ in seen} == COMMANDS_1_12
    for name in COMMANDS_1_12:
        for kind in (ALLOWED, DEFAULT, EXPLICIT):
            assert (name, kind) in seen, (name, kind)


def check_reply_body(case: Case, body: bytes | None, world: World) -> None:
    """Bodies of the OK rows, which differ per variant (redaction, filtering)."""
    if case.command == "stats":
        got = parse_yaml_map(body or b"")
        real = world.real
        assert got["version"] == real["version"]
        if case.kind == ALLOWED:
            for k in ("pid", "hostname", "id", "platform"):
                assert got[k] == real[k], k
        else:
            for k in ("pid", "hostname", "id", "os", "platform"):
                assert k in got  # the key stays (clients parse it), the value does not
                assert got[k] != real[k], (k, got[k])
    elif case.command == "list-tubes":
        names = sorted(x[2:] for x in (body or b"").decode().splitlines() if x.startswith("- "))
        expected = {
            ALLOWED: ["alpha", "beta", "default"],
            DEFAULT: ["alpha"],
            EXPLICIT: ["alpha", "default"],
        }[case.kind]
        assert names == expected
    elif case.command == "stats-job":
        assert parse_yaml_map(body or b"")["tube"] == ALPHA
    elif case.command == "stats-tube":
        assert parse_yaml_map(body or b"")["name"] == ALPHA
    elif case.command in (
        "peek",
        "peek-ready",
        "peek-delayed",
        "peek-buried",
        "reserve",
        "reserve-with-timeout",
        "reserve-job",
    ):
        assert body is not None and body.startswith(SECRET + b" alpha")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_command_table(
    case: Case, pki: PKI, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(pki, world.port, acl(*case.rules)) as proxy:
        c = await proxy.connect(CERT["tenant"])
        for line, reply in case.prelude:
            assert await c.line(line) == reply, line
        before = await world.snapshot()
        caplog.clear()
        line, body = await c.call(case.line, case.body)
        assert line.split(b" ")[0] == case.reply.split(b" ")[0] and (
            line == case.reply or case.reply == b"OK"
        ), line
        if line.startswith(b"OK") or body is not None:
            check_reply_body(case, body, world)
        # the connection is still usable, and still in the state the prelude left
        used = b"USING alpha" if USE_ALPHA[0] in case.prelude else b"USING default"
        if case.command == "use" and not case.denied:
            used = b"USING alpha"
        assert await c.line(b"list-tube-used") == used
        records = audit_records(caplog)
        after = await world.snapshot()
        d = delta(before, after)
        d["cmd-list-tube-used"] -= 1  # the usability check above
        if not d["cmd-list-tube-used"]:
            del d["cmd-list-tube-used"]
        lookups = d.pop("cmd-stats-job", 0)
        assert lookups == case.lookups, (lookups, d)
        if case.denied:
            assert d == {}, f"a denied command changed the server: {d}"
            assert len(records) == 1, records
            rec = records[0]
            assert rec["principal"] == "tenant"
            assert rec["command"] == case.command
            assert rec["reply"] == case.reply.decode()
            assert rec["fingerprint"] == fingerprint(pki, CERT["tenant"])
            assert rec["peer"].startswith("127.0.0.1:")
            if case.kind == DEFAULT:
                assert rec["rule"].startswith("default deny"), rec
            else:
                assert rec["rule"].startswith("rules["), rec
                assert "deny" in rec["rule"], rec
            if case.command in (
                "reserve-job",
                "delete",
                "release",
                "bury",
                "touch",
                "peek",
                "kick-job",
                "stats-job",
            ):
                assert rec["job"] == int(case.line.split()[1])
        else:
            assert case.effect is not None
            case.effect(d, world)
            assert records == [], records
        assert_no_body_logged(caplog)
        await c.close()


@pytest.mark.parametrize(
    "rules", [(ALL_ALPHA,), (), (deny(["all"], "*"),)], ids=[ALLOWED, DEFAULT, EXPLICIT]
)
async def test_quit_always_allowed(
    rules: tuple[dict[str, Any], ...], pki: PKI, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(pki, world.port, acl(*rules)) as proxy:
        c = await proxy.connect(CERT["tenant"])
        await c.send(b"list-tube-used\r\nquit\r\nlist-tube-used\r\n")
        assert await c.closed() == b"USING default\r\n"
        assert audit_records(caplog) == []


# --------------------------------------------------------------------------------------------
# Cross-tenant job ids: NOT_FOUND, exactly as for a job that does not exist
# --------------------------------------------------------------------------------------------

CROSS = [
    (b"delete %d", "b_ready"),
    (b"delete %d", "b_taken"),
    (b"delete %d", "b_buried"),
    (b"delete %d", "d_ready"),
    (b"peek %d", "b_ready"),
    (b"peek %d", "b_delayed"),
    (b"peek %d", "b_buried"),
    (b"kick-job %d", "b_buried"),
    (b"kick-job %d", "b_delayed"),
    (b"stats-job %d", "b_ready"),
    (b"stats-job %d", "b_taken"),
    (b"reserve-job %d", "b_ready"),
    (b"reserve-job %d", "b_delayed"),
    (b"reserve-job %d", "b_buried"),
    (b"reserve-job %d", "d_ready"),
    (b"release %d 0 0", "b_taken"),
    (b"bury %d 0", "b_taken"),
    (b"touch %d", "b_taken"),
    (b"release %d 0 0", "a_taken"),  # own tube, but reserved by another connection
    (b"touch %d", "a_taken"),
]


@pytest.mark.parametrize(
    "template,job", CROSS, ids=[f"{t.split()[0].decode()}-{j}" for t, j in CROSS]
)
async def test_cross_tenant_job_ids_not_found(
    template: bytes, job: str, pki: PKI, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(pki, world.port, acl(ALL_ALPHA)) as proxy:
        c = await proxy.connect(CERT["tenant"])
        # the tenant is a full consumer of its own tube, with a reservation of its own
        for line, reply in RESERVE_A_READY:
            assert await c.line(line) == reply
        before = await world.snapshot()
        caplog.clear()
        line = template % IDS[job]
        assert await c.line(line) == b"NOT_FOUND", line
        # indistinguishable from a job that does not exist
        assert await c.line(template % IDS["missing"]) == b"NOT_FOUND"
        assert await c.line(b"list-tube-used") == b"USING default"
        after = await world.snapshot()
        d = delta(before, after)
        d.pop("cmd-list-tube-used")
        lookups = d.pop("cmd-stats-job", 0)
        assert lookups <= 2, lookups  # the foreign id and the missing id, at most
        assert d == {}, f"cross-tenant {line!r} changed the server: {d}"
        records = audit_records(caplog)
        if template.split()[0] in (b"release", b"bury", b"touch"):
            # beanstalkd itself would say NOT_FOUND: not a reservation of this connection
            assert lookups == 0
        else:
            assert [r["job"] for r in records if r["reply"] == "NOT_FOUND"] == [IDS[job]]
            assert all(r["principal"] == "tenant" for r in records)
        assert_no_body_logged(caplog)
        # the tenant's own reservation is unaffected
        assert await c.line(b"touch 3") == b"TOUCHED"
        await c.close()


async def test_rival_cannot_touch_a_job_the_tenant_just_put(pki: PKI, world: World) -> None:
    doc = acl(ALL_ALPHA)
    async with serving(pki, world.port, doc) as proxy:
        tenant = await proxy.connect(CERT["tenant"])
        rival = await proxy.connect(CERT["rival"])
        assert await tenant.line(b"use alpha") == b"USING alpha"
        assert await tenant.put(b"SECRET tenant data") == b"INSERTED 10"
        before = await world.snapshot()
        for cmd in (
            b"peek 10",
            b"stats-job 10",
            b"delete 10",
            b"kick-job 10",
            b"reserve-job 10",
            b"release 10 0 0",
            b"bury 10 0",
            b"touch 10",
        ):
            assert await rival.line(cmd) == b"NOT_FOUND", cmd
        # the rival's own tube works as usual
        assert await rival.line(b"peek 7") == b"FOUND 7 17"
        after = await world.snapshot()
        d = delta(before, after)
        d.pop("cmd-stats-job", None)
        assert d == {"cmd-peek": 1}, d
        assert after["jobs"][10]["state"] == "ready"
        await tenant.close()
        await rival.close()


async def start_partial_put(world: World) -> Client:
    """A direct connection that starts a put into ``alpha`` and never finishes it: job 10
    exists, in state ``invalid``, and ``peek 10`` would return uninitialised server memory."""
    uploader = await direct(world.port)
    assert await uploader.line(b"use alpha") == b"USING alpha"
    await uploader.send(b"put 0 0 60 200\r\nPARTIAL")
    # wait, round trip by round trip, until beanstalkd has read the put line
    for _ in range(1000):
        line, body = await world.observer.call(b"stats-job 10")
        if line != b"NOT_FOUND":
            break
    assert line.startswith(b"OK") and parse_yaml_map(body or b"")["state"] == "invalid"
    return uploader


@pytest.mark.parametrize(
    "first",
    [None, b"stats-job 10", b"kick-job 10", b"delete 10", b"reserve-job 10"],
    ids=["peek-only", "after-stats-job", "after-kick-job", "after-delete", "after-reserve-job"],
)
async def test_peek_of_a_job_still_uploading_is_never_shown(
    first: bytes | None, pki: PKI, world: World
) -> None:
    """A job whose body is still arriving (state ``invalid``) is not shown, not even to a
    principal allowed to inspect its tube, and not even once an earlier command on the same
    connection (which looked the job up) taught the proxy the job's tube."""
    doc = acl(allow(["inspect", "manage"], ALPHA))
    async with serving(pki, world.port, doc) as proxy:
        uploader = await start_partial_put(world)
        c = await proxy.connect(CERT["tenant"])
        if first is not None:
            line, body = await c.call(first)
            if first.startswith(b"stats-job"):
                assert line.startswith(b"OK")
                assert parse_yaml_map(body or b"")["state"] == "invalid"
            else:
                assert line == b"NOT_FOUND", line  # beanstalkd's own answer for an invalid job
        assert await c.line(b"peek 10") == b"NOT_FOUND"
        assert await c.line(b"peek 4") == b"FOUND 4 20"  # finished jobs still are
        await c.close()
        await uploader.close()


# --------------------------------------------------------------------------------------------
# list-tubes, stats, the default tube, producer constraints
# --------------------------------------------------------------------------------------------


async def test_list_tubes_filtered_per_principal(pki: PKI, world: World) -> None:
    doc = acl(allow(["consume"], ALPHA), allow(["put"], "gam*"))
    async with serving(pki, world.port, doc) as proxy:
        o = world.observer
        assert await o.line(b"watch gamma") == b"WATCHING 2"  # now gamma exists
        expected = {
            "tenant": ["alpha", "gamma"],  # a single-command rule is a right too
            "rival": ["beta"],
            "ops": ["alpha", "beta", "default", "gamma"],
            "auditor": ["alpha", "beta", "default", "gamma"],
        }
        for principal, names in expected.items():
            c = await proxy.connect(CERT[principal])
            _, body = await c.call(b"list-tubes")
            got = sorted(x[2:] for x in (body or b"").decode().splitlines() if x.startswith("- "))
            assert got == names, principal
            assert (body or b"").startswith(b"---\n")
            await c.close()


async def test_stats_redaction(pki: PKI, world: World) -> None:
    async with serving(pki, world.port, acl(ALL_ALPHA)) as proxy:
        real = world.real
        for principal, redacted in (("tenant", True), ("rival", True), ("ops", False)):
            c = await proxy.connect(CERT[principal])
            line, body = await c.call(b"stats")
            assert line == b"OK %d" % len(body or b"")
            got = parse_yaml_map(body or b"")
            if redacted:
                assert got["pid"] != real["pid"] and got["hostname"] != real["hostname"]
                assert got["id"] != real["id"]
                assert b"pid: " + real["pid"].encode() + b"\n" not in (body or b"")
                assert b"hostname: " + real["hostname"].encode() not in (body or b"")
            else:
                for k in ("pid", "hostname", "id", "platform", "os"):
                    assert got[k] == real[k], k
            # the same keys (client libraries read them); other tenants' work is not shown
            assert set(got) == set(real)
            for k in ("version", "max-job-size", "draining"):
                assert got[k] == real[k], k
            if redacted:
                assert real["current-jobs-ready"] != "0"
                for k in ("current-jobs-ready", "total-jobs", "cmd-put", "current-tubes",
                          "current-connections", "total-connections", "pid"):  # fmt: skip
                    assert got[k] == "0", k
            else:
                assert got["current-jobs-ready"] == real["current-jobs-ready"]
            await c.close()


async def test_default_tube_gets_no_free_pass(pki: PKI, world: World) -> None:
    async with serving(pki, world.port, acl(ALL_ALPHA)) as proxy:
        c = await proxy.connect(CERT["tenant"])
        before = await world.snapshot()
        assert await c.put(b"SECRET into default") == b"NOT_PERMITTED"
        assert await c.line(b"peek-ready") == b"NOT_PERMITTED"
        assert await c.line(b"reserve") == b"NOT_PERMITTED"
        assert await c.line(b"reserve-with-timeout 0") == b"NOT_PERMITTED"
        assert await c.line(b"kick 5") == b"NOT_PERMITTED"
        assert await c.line(b"stats-tube default") == b"NOT_PERMITTED"
        assert await c.line(b"peek 9") == b"NOT_FOUND"
        assert await c.line(b"use default") == b"NOT_PERMITTED"
        assert await c.line(b"watch default") == b"NOT_PERMITTED"
        after = await world.snapshot()
        d = delta(before, after)
        d.pop("cmd-stats-job", None)
        assert d == {}, d
        # the common client pattern works unchanged
        assert await c.line(b"watch alpha") == b"WATCHING 2"
        assert await c.line(b"ignore default") == b"WATCHING 1"
        line, body = await c.call(b"reserve")
        assert (line, body) == (b"RESERVED 3 18", b"SECRET alpha ready")
        assert await c.line(b"delete 3") == b"DELETED"
        # and once default is ignored it stays ignored: the last tube cannot be ignored
        assert await c.line(b"ignore alpha") == b"NOT_IGNORED"
        await c.close()


async def test_producer_constraints(
    pki: PKI, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    limits = {"max_body": 16, "priority": [100, 200], "delay": [0, 10], "ttr": [10, 120]}
    doc = acl(allow(["produce"], ALPHA, put=limits), allow(["inspect"], ALPHA))
    async with serving(pki, world.port, doc) as proxy:
        c = await proxy.connect(CERT["tenant"])
        assert await c.line(b"use alpha") == b"USING alpha"
        assert await c.put(b"SECRET fits", pri=100, delay=0, ttr=10) == b"INSERTED 10"
        assert await c.put(b"SECRET fits too!", pri=200, delay=10, ttr=120) == b"INSERTED 11"
        before = await world.snapshot()
        bad = [
            (b"SECRET 17 bytes!!", 150, 0, 60, "max_body"),
            (b"SECRET", 99, 0, 60, "priority"),
            (b"SECRET", 201, 0, 60, "priority"),
            (b"SECRET", 150, 11, 60, "delay"),
            (b"SECRET", 150, 0, 9, "ttr"),
            (b"SECRET", 150, 0, 121, "ttr"),
        ]
        for body, pri, delay, ttr, what in bad:
            caplog.clear()
            assert await c.put(body, pri, delay, ttr) == b"NOT_PERMITTED", (pri, delay, ttr)
            (rec,) = audit_records(caplog)
            # the refusal names the broken constraint
            assert what in rec["rule"] and rec["command"] == "put", rec
            assert rec["tube"] == ALPHA
            assert_no_body_logged(caplog)
        assert await c.line(b"list-tube-used") == b"USING alpha"
        after = await world.snapshot()
        assert delta(before, after) == {"cmd-list-tube-used": 1}
        await c.close()


async def test_consumer_never_gets_a_foreign_job_whatever_the_order(pki: PKI, world: World) -> None:
    """Random pipelined orders of watch/ignore/reserve: every RESERVED is from ``alpha``."""
    async with serving(pki, world.port, acl(allow(["consume"], ALPHA))) as proxy:
        # plenty of ready jobs everywhere
        d = world.holder
        for tube in ("alpha", "beta", "default"):
            assert await d.line(b"use " + tube.encode()) == b"USING " + tube.encode()
            for _ in range(3):
                await put_direct(d, SECRET + b" more " + tube.encode(), ttr=3600)
        alpha_ids = {3}
        o = world.observer
        for j in range(10, 19):
            _, body = await o.call(b"stats-job %d" % j)
            if parse_yaml_map(body or b"")["tube"] == ALPHA:
                alpha_ids.add(j)
        pool = [
            b"watch alpha",
            b"watch beta",
            b"watch default",
            b"watch gamma",
            b"ignore default",
            b"ignore alpha",
            b"ignore beta",
            b"reserve-with-timeout 0",
            b"reserve-with-timeout 0",
            b"reserve-with-timeout 0",
        ]
        rng = random.Random(20240501)
        got = 0
        for _ in range(40):
            # the three commands of the common pattern, plus extras, in a random order
            seq = [b"watch alpha", b"ignore default", b"reserve-with-timeout 0"]
            seq += [rng.choice(pool) for _ in range(rng.randint(0, 5))]
            rng.shuffle(seq)
            c = await proxy.connect(CERT["tenant"])
            await c.send(b"".join(s + b"\r\n" for s in seq))
            mine = []
            for s in seq:
                line, body = await c.reply()
                if line.startswith(b"RESERVED"):
                    got += 1
                    assert int(line.split()[1]) in alpha_ids, (seq, line)
                    assert body is not None and b"alpha" in body
                    mine.append(int(line.split()[1]))
                elif s.startswith(b"reserve"):
                    assert line in (b"NOT_PERMITTED", b"TIMED_OUT"), (seq, line)
            for job in mine:  # give them back so later sequences find jobs again
                assert await c.line(b"release %d 0 0" % job) == b"RELEASED"
            await c.close()
        assert got > 0  # the sequences did exercise the allowed path
        for j in range(1, 19):
            _, body = await o.call(b"stats-job %d" % j)
            info = parse_yaml_map(body or b"")
            if info["tube"] != ALPHA:
                assert info["reserves"] == ("1" if j in (5, 6) else "0"), info


# --------------------------------------------------------------------------------------------
# Denials inside pipelines: replies stay in order, denied bodies are consumed
# --------------------------------------------------------------------------------------------


async def test_denied_put_body_is_consumed_not_executed(pki: PKI, world: World) -> None:
    """The body of a denied put is skipped by count, even when it looks like commands."""
    async with serving(pki, world.port, acl(allow(["inspect"], ALPHA))) as proxy:
        c = await proxy.connect(CERT["tenant"])
        assert await c.line(b"use alpha") == b"USING alpha"
        before = await world.snapshot()
        body = b"SECRET\r\ndelete 3\r\nuse beta\r\nput 0 0 60 1\r\nx\r\nquit\r\n"
        assert await c.put(body) == b"NOT_PERMITTED"
        assert await c.line(b"list-tube-used") == b"USING alpha"
        after = await world.snapshot()
        assert delta(before, after) == {"cmd-list-tube-used": 1}
        await c.close()


async def test_pipelined_denials_keep_reply_order(pki: PKI, world: World) -> None:
    """Local replies (denials, NOT_FOUND) wait their turn behind forwarded commands and
    lookups; the pipelined answers equal the one-by-one answers."""
    doc = acl(allow(["consume", "inspect"], ALPHA), allow(["produce"], GAMMA))
    script = [
        b"peek 4",  # lookup, allowed
        b"use beta",  # denied
        b"peek 7",  # lookup, foreign: NOT_FOUND
        b"use alpha",
        b"peek-ready",
        b"put 0 0 60 6\r\nSECRET",  # denied: no produce on alpha
        b"stats-job 3",
        b"release 2 0 0",  # not ours: local NOT_FOUND
        b"kick 1",  # denied
        b"watch alpha",
        b"ignore default",
        b"reserve-with-timeout 0",
        b"stats-tube beta",  # denied
        b"peek 3",  # (a client learns a reserved id from RESERVED, so it cannot pipeline
        # commands on it; "delete <guessed id>" sent before RESERVED came would need manage)
        b"list-tube-used",
    ]
    async with serving(pki, world.port, doc) as proxy:
        one_by_one = await proxy.connect(CERT["tenant"])
        expected = []
        for line in script:
            got, _ = await one_by_one.call(line)
            expected.append(got)
        assert expected[11] == b"RESERVED 3 18" and expected[13] == b"FOUND 3 18"
        # put job 3 back the way it was
        assert await one_by_one.line(b"release 3 100 0") == b"RELEASED"
        await one_by_one.close()
        expected = [b"OK" if e.startswith(b"OK") else e for e in expected]
        piped = await proxy.connect(CERT["tenant"])
        await piped.send(b"".join(s + b"\r\n" for s in script))
        got = [(await piped.reply())[0] for _ in script]
        got = [b"OK" if g.startswith(b"OK") else g for g in got]
        assert got == expected
        await piped.close()


async def test_denial_after_a_blocking_reserve_waits_for_it(pki: PKI, world: World) -> None:
    async with serving(pki, world.port, acl(allow(["consume"], ALPHA))) as proxy:
        c = await proxy.connect(CERT["tenant"])
        assert await c.line(b"watch alpha") == b"WATCHING 2"
        assert await c.line(b"ignore default") == b"WATCHING 1"
        assert await c.line(b"reserve") == b"RESERVED 3 18"  # alpha has no ready job left
        await c.send(b"reserve\r\nuse beta\r\nlist-tube-used\r\n")
        # the blocking reserve is answered first, once a job arrives
        assert await world.holder.line(b"use alpha") == b"USING alpha"
        new = await put_direct(world.holder, b"SECRET late")
        assert await c.reply() == (b"RESERVED %d 11" % new, b"SECRET late")
        assert (await c.reply())[0] == b"NOT_PERMITTED"
        assert (await c.reply())[0] == b"USING default"
        await c.close()


async def test_quit_after_a_lookup_answers_first(pki: PKI, world: World) -> None:
    async with serving(pki, world.port, acl(allow(["inspect"], ALPHA))) as proxy:
        c = await proxy.connect(CERT["tenant"])
        await c.send(b"peek 4\r\npeek 7\r\nuse beta\r\nquit\r\nlist-tube-used\r\n")
        data = await c.closed()
        assert data == b"FOUND 4 20\r\nSECRET alpha delayed\r\nNOT_FOUND\r\nNOT_PERMITTED\r\n"

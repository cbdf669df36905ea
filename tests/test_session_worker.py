"""Issue 8 in the pure session: a worker may delete the job it buried with consume alone (after
a ``stats-job`` on its own connection confirms the job is still buried), a denied ``use`` never
lets later commands land in the tube used before, and the two denial-reply modes."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from conftest import make_session, take

from proxy.protocol import JOB_ID_OPS, NAMES
from proxy.session import (
    MAX_KNOWN_JOBS,
    MAX_OWN_BURIED,
    MAX_RESERVED,
    NO_COUNTS,
    NO_ENTRIES,
    Session,
    denial_replies,
)

ACL = {
    "principals": [
        {"name": "worker", "match": {"cn": "worker"}},
        {"name": "ops", "match": {"cn": "ops"}},
        {"name": "producer", "match": {"cn": "producer"}},
        {"name": "limited", "match": {"cn": "limited"}},
    ],
    "rules": [
        {"principal": "worker", "tubes": ["jobs"], "allow": ["consume"]},
        {"principal": "ops", "allow": ["all"]},
        {"principal": "producer", "tubes": ["jobs"], "allow": ["produce"]},
        {"principal": "limited", "tubes": ["jobs"], "allow": ["all"]},
    ],
}


def session(principal: str, denial_reply: str = "compatible") -> Session:
    return make_session(ACL, principal, denial_reply)


def stats_job(job: int, tube: str, state: str) -> bytes:
    body = f'---\nid: {job}\ntube: "{tube}"\nstate: {state}\npri: 0\n'.encode()
    return b"OK %d\r\n%s\r\n" % (len(body), body)


def reserve_and_bury(s: Session, job: int = 1) -> None:
    """The worker's workflow up to the bury: watch jobs, ignore default, reserve, bury."""
    s.feed_client(b"watch jobs\r\nignore default\r\nreserve-with-timeout 1\r\n")
    assert take(s.to_upstream) == b"watch jobs\r\nignore default\r\nreserve-with-timeout 1\r\n"
    s.feed_upstream(b"WATCHING 2\r\nWATCHING 1\r\nRESERVED %d 3\r\nabc\r\n" % job)
    assert take(s.to_client) == b"WATCHING 2\r\nWATCHING 1\r\nRESERVED %d 3\r\nabc\r\n" % job
    s.feed_client(b"bury %d 0\r\n" % job)
    assert take(s.to_upstream) == b"bury %d 0\r\n" % job
    s.feed_upstream(b"BURIED\r\n")
    assert take(s.to_client) == b"BURIED\r\n"


def test_sessions_share_only_empty_job_tables_never_an_entry() -> None:
    """A session starts with the shared empty ``jobs``/``reserved``/``buried`` (NO_ENTRIES)
    and ``denied_counts`` (NO_COUNTS); its first entry gives it its own, which no other
    session sees: another connection's buried job still needs a lookup and manage."""
    a, b = session("worker", "explicit"), session("worker", "explicit")
    for s in (a, b):
        assert s.jobs is NO_ENTRIES and s.reserved is NO_ENTRIES and s.buried is NO_ENTRIES
        assert s.denied_counts is NO_COUNTS
    reserve_and_bury(a, 7)
    assert dict(a.buried) == {7: ("jobs",)} and a.buried is not NO_ENTRIES
    assert a.reserved is not NO_ENTRIES and not a.reserved  # its own, emptied by the bury
    assert b.buried is NO_ENTRIES and b.reserved is NO_ENTRIES and not NO_ENTRIES
    with pytest.raises(TypeError):
        NO_ENTRIES[7] = ("jobs",)
    with pytest.raises(TypeError):
        NO_ENTRIES.setdefault(7, ("jobs",))
    with pytest.raises(TypeError):
        NO_ENTRIES.update({7: ("jobs",)})
    assert not NO_ENTRIES
    b.feed_client(b"delete 7\r\n")  # not b's job: the tube decides
    assert take(b.to_upstream) == b"stats-job 7\r\n"
    b.feed_upstream(stats_job(7, "jobs", "buried"))
    assert take(b.to_client) == b"NOT_PERMITTED\r\n"
    assert b.denied_counts is not NO_COUNTS and sum(b.denied_counts) == 1
    assert a.denied_counts is NO_COUNTS and not any(NO_COUNTS)
    a.feed_client(b"delete 7\r\n")  # a's own buried job: consume is enough
    assert take(a.to_upstream) == b"stats-job 7\r\n"
    a.feed_upstream(stats_job(7, "jobs", "buried"))
    assert take(a.to_upstream) == b"delete 7\r\n"


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_worker_deletes_the_job_it_buried_with_consume_only(chunk: int) -> None:
    s = session("worker")
    reserve_and_bury(s, 1)
    wire = b"delete 1\r\n"
    for i in range(0, len(wire), chunk):
        s.feed_client(wire[i : i + chunk])
    # consume alone does not allow delete of a buried job: the proxy confirms it is still
    # buried (not kicked since) on the worker's own connection, holding the client meanwhile
    assert take(s.to_upstream) == b"stats-job 1\r\n"
    assert s.blocked
    s.feed_client(b"list-tube-used\r\n")  # held behind the lookup, in order
    assert take(s.to_upstream) == b""
    s.feed_upstream(stats_job(1, "jobs", "buried"))
    assert take(s.to_upstream) == b"delete 1\r\nlist-tube-used\r\n"
    assert take(s.to_client) == b""
    s.feed_upstream(b"DELETED\r\nUSING default\r\n")
    assert take(s.to_client) == b"DELETED\r\nUSING default\r\n"
    assert not s.buried and not s.denials


@pytest.mark.parametrize(
    ("mode", "reply"), [("compatible", b"NOT_FOUND"), ("explicit", b"NOT_PERMITTED")]
)
def test_a_buried_job_kicked_since_is_no_longer_the_workers(mode: str, reply: bytes) -> None:
    s = session("worker", mode)
    reserve_and_bury(s, 5)
    s.feed_client(b"delete 5\r\n")
    assert take(s.to_upstream) == b"stats-job 5\r\n"
    s.feed_upstream(stats_job(5, "jobs", "ready"))  # an operator kicked it
    assert take(s.to_upstream) == b""  # decided as delete of another's job: manage
    assert take(s.to_client) == reply + b"\r\n"
    assert 5 not in s.buried
    assert s.denials and s.denials[0]["command"] == "delete"
    # the next delete is the ordinary rule straight away (no second lookup: the tube is known)
    s.feed_client(b"delete 5\r\n")
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == reply + b"\r\n"


def test_a_job_another_connection_buried_needs_manage() -> None:
    s = session("worker", "explicit")
    s.feed_client(b"delete 9\r\n")  # never reserved here: delete of another's job
    assert take(s.to_upstream) == b"stats-job 9\r\n"
    s.feed_upstream(stats_job(9, "jobs", "buried"))
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"


def test_manage_deletes_its_buried_job_without_a_lookup() -> None:
    s = session("ops")
    reserve_and_bury(s, 2)
    s.feed_client(b"delete 2\r\n")
    assert take(s.to_upstream) == b"delete 2\r\n"  # allowed everything: no extra command
    s.feed_upstream(b"DELETED\r\n")
    assert take(s.to_client) == b"DELETED\r\n"
    assert not s.buried


def test_a_delete_that_finds_no_job_forgets_it() -> None:
    s = session("worker")
    reserve_and_bury(s, 3)
    s.feed_client(b"delete 3\r\n")
    s.feed_upstream(b"NOT_FOUND\r\n")  # deleted by someone else meanwhile
    assert take(s.to_client) == b"NOT_FOUND\r\n"
    assert 3 not in s.buried


def test_forgotten_buried_jobs_fall_back_to_the_ordinary_rule() -> None:
    s = session("worker", "explicit")
    s.reserved = OrderedDict()  # its own: every session starts with the shared NO_ENTRIES
    for job in range(1, MAX_OWN_BURIED + 2):
        s.reserved[job] = ("jobs",)
        s.feed_client(b"bury %d 0\r\n" % job)
        s.feed_upstream(b"BURIED\r\n")
    take(s.to_upstream)
    take(s.to_client)
    assert len(s.buried) == MAX_OWN_BURIED and 1 not in s.buried
    s.feed_client(b"delete 1\r\n")  # forgotten: manage is needed, as for any job
    assert take(s.to_upstream) == b"stats-job 1\r\n"
    s.feed_upstream(stats_job(1, "jobs", "buried"))
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"
    s.feed_client(b"delete %d\r\n" % (MAX_OWN_BURIED + 1))  # remembered: still its own
    assert take(s.to_upstream) == b"stats-job %d\r\n" % (MAX_OWN_BURIED + 1)


@pytest.mark.parametrize(
    ("mode", "reply"), [("compatible", b"UNKNOWN_COMMAND"), ("explicit", b"NOT_PERMITTED")]
)
def test_denied_use_refuses_pipelined_puts_until_a_use_is_allowed(mode: str, reply: bytes) -> None:
    s = session("producer", mode)
    put = b"put 0 0 10 2\r\nhi\r\n"
    s.feed_client(b"use secret\r\n" + put * 3 + b"list-tube-used\r\n")
    # nothing lands in "default" (the tube the connection really uses)
    assert take(s.to_upstream) == b"list-tube-used\r\n"
    s.feed_upstream(b"USING default\r\n")
    assert take(s.to_client) == (reply + b"\r\n") * 4 + b"USING default\r\n"
    assert [d["command"] for d in s.denials] == ["use", "put", "put", "put"]
    assert all(d["tube"] == "secret" for d in s.denials)
    s.denials.clear()
    s.feed_client(b"use jobs\r\n" + put)
    assert take(s.to_upstream) == b"use jobs\r\n" + put
    s.feed_upstream(b"USING jobs\r\nINSERTED 4\r\n")
    assert take(s.to_client) == b"USING jobs\r\nINSERTED 4\r\n"
    assert not s.denials


def test_denied_use_also_refuses_peek_and_kick_on_the_used_tube() -> None:
    s = session("ops")
    s.use_denied = ("secret", b"UNKNOWN_COMMAND\r\n")  # as after a denied use
    s.feed_client(b"peek-ready\r\nkick 5\r\nwatch jobs\r\n")
    assert take(s.to_upstream) == b"watch jobs\r\n"  # other tubes are unaffected
    s.feed_upstream(b"WATCHING 2\r\n")
    assert take(s.to_client) == b"UNKNOWN_COMMAND\r\n" * 2 + b"WATCHING 2\r\n"


def test_compatible_replies_per_command_class() -> None:
    table, rate = denial_replies("compatible")
    for op, name in enumerate(NAMES):
        named_tube = name in ("stats-tube", "pause-tube")
        expected = b"NOT_FOUND\r\n" if op in JOB_ID_OPS or named_tube else b"UNKNOWN_COMMAND\r\n"
        assert table[op] == expected, name
    assert rate == b"OUT_OF_MEMORY\r\n"
    table, rate = denial_replies("explicit")
    assert set(table) == {b"NOT_PERMITTED\r\n"} and rate == b"RATE_LIMITED\r\n"
    with pytest.raises(ValueError, match="unknown denial mode"):
        denial_replies("silent")


def test_compatible_mode_on_the_wire() -> None:
    s = session("producer")
    s.feed_client(b"watch jobs\r\nreserve\r\nkick 1\r\nstats-tube secret\r\n")
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == b"UNKNOWN_COMMAND\r\n" * 3 + b"NOT_FOUND\r\n"
    s.feed_client(b"peek 7\r\n")  # a job-id command: looked up, then NOT_FOUND
    assert take(s.to_upstream) == b"stats-job 7\r\n"
    s.feed_upstream(stats_job(7, "jobs", "ready"))
    assert take(s.to_client) == b"NOT_FOUND\r\n"
    assert [d["reply"] for d in s.denials][-1] == "NOT_FOUND"


def test_rate_limited_reply_follows_the_mode() -> None:
    for mode, reply in (("compatible", b"OUT_OF_MEMORY\r\n"), ("explicit", b"RATE_LIMITED\r\n")):
        s = session("limited", mode)
        s.limiter = lambda: False
        s.feed_client(b"use jobs\r\n")
        assert take(s.to_client) == reply
        assert s.rate_limited == 1


# --- issue 10: producer constraints also bind release and bury ---------------------------------

LIMITED_ACL = {
    "principals": [{"name": "w", "match": {"cn": "w"}}, {"name": "free", "match": {"cn": "f"}}],
    "rules": [
        {
            "principal": "w",
            "tubes": ["jobs"],
            "allow": ["produce"],
            "put": {"priority": [100, 200], "delay": [0, 10]},
        },
        {"principal": "w", "tubes": ["jobs", "other"], "allow": ["consume"]},
        {"principal": "free", "tubes": ["jobs"], "allow": ["consume"]},
    ],
}


def limited(principal: str = "w") -> Session:
    return make_session(LIMITED_ACL, principal, "explicit")


def reserve(s: Session, job: int, watch: bytes = b"watch jobs\r\nignore default\r\n") -> None:
    s.feed_client(watch + b"reserve\r\n")
    s.feed_upstream(b"WATCHING 1\r\n" * watch.count(b"\r\n"))
    s.feed_upstream(b"RESERVED %d 1\r\nx\r\n" % job)
    take(s.to_upstream)
    take(s.to_client)


@pytest.mark.parametrize(
    ("line", "allowed"),
    [
        (b"release 1 5 0", False),  # priority below the produce rule's range
        (b"release 1 150 60", False),  # delay above it
        (b"release 1 150 5", True),
        (b"bury 1 7", False),
        (b"bury 1 200", True),
    ],
)
def test_release_and_bury_obey_the_put_constraints(line: bytes, allowed: bool) -> None:
    s = limited()
    reserve(s, 1)
    s.feed_client(line + b"\r\n")
    if allowed:
        assert take(s.to_upstream) == line + b"\r\n"
        assert not s.denials
    else:
        assert take(s.to_upstream) == b""
        assert take(s.to_client) == b"NOT_PERMITTED\r\n"
        assert "outside" in s.denials[0]["rule"] and s.denials[0]["rule"].startswith("rules[0]")


def test_constraints_of_an_unknown_tube_are_looked_up() -> None:
    s = limited()
    reserve(s, 3, b"watch jobs\r\nwatch other\r\nignore default\r\n")  # one of two tubes
    s.feed_client(b"release 3 1 0\r\n")
    assert take(s.to_upstream) == b"stats-job 3\r\n"
    s.feed_upstream(stats_job(3, "jobs", "reserved"))
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"
    s.feed_client(b"release 3 150 0\r\n")  # now known: no second lookup
    assert take(s.to_upstream) == b"release 3 150 0\r\n"


def test_no_produce_rule_means_no_constraints() -> None:
    s = limited("free")
    reserve(s, 4)
    s.feed_client(b"release 4 1 3600\r\n")
    assert take(s.to_upstream) == b"release 4 1 3600\r\n"
    s = limited()
    reserve(s, 5, b"watch other\r\nignore default\r\n")  # "other": w may not produce there
    s.feed_client(b"bury 5 1\r\n")
    assert take(s.to_upstream) == b"bury 5 1\r\n"


# --- issue 9: per-connection memory caps; what lies beyond them stays correct ------------------


def many_reserved(n: int) -> Session:
    s = session("worker", "explicit")
    s.feed_client(b"watch jobs\r\nignore default\r\n")
    s.feed_upstream(b"WATCHING 2\r\nWATCHING 1\r\n")
    for job in range(1, n + 1):
        s.feed_client(b"reserve-with-timeout 0\r\n")
        s.feed_upstream(b"RESERVED %d 1\r\nx\r\n" % job)
    take(s.to_upstream)
    take(s.to_client)
    return s


def test_reservations_are_capped_and_a_forgotten_one_costs_a_lookup() -> None:
    s = many_reserved(MAX_RESERVED + 10)
    assert len(s.reserved) == MAX_RESERVED and s.forgot_reserved
    assert len(s.jobs) <= MAX_KNOWN_JOBS
    done = (
        (b"release 1 0 0", b"RELEASED"),
        (b"bury 2 0", b"BURIED"),
        (b"touch 3", b"TOUCHED"),
        (b"delete 4", b"DELETED"),
    )
    for line, reply in done:
        s.feed_client(line + b"\r\n")
        job = int(line.split()[1])
        assert take(s.to_upstream) == b"stats-job %d\r\n" % job
        s.feed_upstream(stats_job(job, "jobs", "reserved"))
        assert take(s.to_upstream) == line + b"\r\n", line  # consume suffices: its own job
        s.feed_upstream(reply + b"\r\n")
        assert take(s.to_client) == reply + b"\r\n"
    assert not s.denials


def test_after_forgetting_a_job_not_reserved_still_answers_as_beanstalkd() -> None:
    s = many_reserved(MAX_RESERVED + 1)
    s.feed_client(b"release 99999 0 0\r\n")
    assert take(s.to_upstream) == b"stats-job 99999\r\n"
    s.feed_upstream(stats_job(99999, "jobs", "ready"))
    assert take(s.to_client) == b"NOT_FOUND\r\n"  # what beanstalkd says: not reserved here
    s.feed_client(b"delete 99999\r\n")  # may be ours: looked up, a ready job needs manage
    assert take(s.to_upstream) == b"stats-job 99999\r\n"
    s.feed_upstream(stats_job(99999, "jobs", "ready"))
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"


def test_without_forgetting_no_lookup_is_needed() -> None:
    s = many_reserved(3)
    assert not s.forgot_reserved
    s.feed_client(b"release 77 0 0\r\n")  # never reserved here
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == b"NOT_FOUND\r\n"


def test_stats_job_of_a_job_the_connection_holds_needs_only_consume() -> None:
    """beaneater sends stats-job before every release and bury."""
    s = session("worker", "explicit")
    reserve_and_bury(s, 6)
    s.feed_client(b"stats-job 6\r\n")
    assert take(s.to_upstream) == b"stats-job 6\r\n"  # buried by this connection: its job
    s.feed_upstream(stats_job(6, "jobs", "buried"))
    assert take(s.to_client).startswith(b"OK ")
    s.feed_client(b"stats-job 8\r\n")  # not held here: inspect is needed, the worker has none
    assert take(s.to_upstream) == b"stats-job 8\r\n"
    s.feed_upstream(stats_job(8, "jobs", "ready"))
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"

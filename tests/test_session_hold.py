"""Issue 10, item 1, in the pure session: commands behind a blocking reserve are held, not
forwarded, and decided under the policy in force when the reserve returns; a client EOF runs
them (as beanstalkd does after answering a half-closed client's reserve TIMED_OUT)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.acl import Policy, parse_acl
from proxy.session import MAX_HELD_BYTES, Session


def acl(produce: bool = True, consume: bool = True) -> Policy:
    rules = []
    if consume:
        rules.append({"principal": "t", "tubes": ["alpha"], "allow": ["consume"]})
    if produce:
        rules.append({"principal": "t", "tubes": ["a.*"], "allow": ["produce"]})
    return parse_acl(
        {"principals": [{"name": "t", "match": {"cn": "t"}}], "rules": rules or [
            {"principal": "t", "tubes": ["zzz"], "allow": ["inspect"]}]}, "<t>"
    )  # fmt: skip


@dataclass
class Holder:
    current: Policy


def take(buf: bytearray) -> bytes:
    data = bytes(buf)
    buf.clear()
    return data


def waiting_session(reserve: bytes = b"reserve") -> tuple[Session, Holder]:
    holder = Holder(acl())
    s = Session(holder, "t", 100, denial_reply="explicit")
    s.feed_client(b"watch alpha\r\nignore default\r\n")
    s.feed_upstream(b"WATCHING 2\r\nWATCHING 1\r\n")
    take(s.to_upstream)
    take(s.to_client)
    s.feed_client(reserve + b"\r\nuse a.loot\r\nput 0 0 60 1\r\nx\r\nput 0 0 60 1\r\ny\r\n")
    return s, holder


@pytest.mark.parametrize("reserve", [b"reserve", b"reserve-with-timeout 6"])
def test_commands_behind_a_blocking_reserve_are_held(reserve: bytes) -> None:
    s, _ = waiting_session(reserve)
    assert take(s.to_upstream) == reserve + b"\r\n"  # nothing else reaches beanstalkd yet
    assert s.waiting
    s.feed_upstream(b"RESERVED 1 1\r\nj\r\n")
    assert not s.waiting
    assert take(s.to_upstream) == b"use a.loot\r\nput 0 0 60 1\r\nx\r\nput 0 0 60 1\r\ny\r\n"
    s.feed_upstream(b"USING a.loot\r\nINSERTED 2\r\nINSERTED 3\r\n")
    assert take(s.to_client) == b"RESERVED 1 1\r\nj\r\nUSING a.loot\r\nINSERTED 2\r\nINSERTED 3\r\n"


def test_a_revocation_while_waiting_governs_the_held_commands() -> None:
    s, holder = waiting_session(b"reserve-with-timeout 6")
    take(s.to_upstream)
    holder.current = acl(produce=False)  # a reload revokes produce
    s.feed_upstream(b"TIMED_OUT\r\n")
    assert take(s.to_upstream) == b""  # decided now: use and both puts denied
    assert take(s.to_client) == b"TIMED_OUT\r\n" + b"NOT_PERMITTED\r\n" * 3
    assert [d["command"] for d in s.denials] == ["use", "put", "put"]


def test_a_grant_while_waiting_governs_the_held_commands() -> None:
    holder = Holder(acl(produce=False))
    s = Session(holder, "t", 100, denial_reply="explicit")
    s.feed_client(b"watch alpha\r\nignore default\r\nreserve\r\nuse a.x\r\n")
    assert take(s.to_upstream) == b"watch alpha\r\nignore default\r\nreserve\r\n"
    holder.current = acl()
    s.feed_upstream(b"WATCHING 2\r\nWATCHING 1\r\nRESERVED 4 1\r\nj\r\n")
    assert take(s.to_upstream) == b"use a.x\r\n"


def test_non_blocking_reserves_keep_pipelining() -> None:
    s, _ = waiting_session(b"reserve-with-timeout 0")
    assert take(s.to_upstream).count(b"\r\n") == 6  # everything forwarded at once
    assert not s.waiting


def test_eof_behind_a_blocking_reserve_runs_the_held_commands_then_drains() -> None:
    s, _ = waiting_session()
    take(s.to_upstream)
    s.feed_client(b"put 0 0 60 5\r\nunfin")  # an incomplete command is dropped at EOF
    assert s.reads_client()  # below the bound: read on, to notice the EOF
    s.client_eof()
    assert take(s.to_upstream) == b"use a.loot\r\nput 0 0 60 1\r\nx\r\nput 0 0 60 1\r\ny\r\n"
    assert s.draining  # the relay now half-closes upstream: the reserve answers TIMED_OUT
    s.feed_upstream(b"TIMED_OUT\r\nUSING a.loot\r\nINSERTED 2\r\nINSERTED 3\r\n")
    assert take(s.to_client).startswith(b"TIMED_OUT\r\nUSING a.loot\r\n")


def test_eof_during_a_lookup_still_runs_what_follows() -> None:
    holder = Holder(acl())
    s = Session(holder, "t", 100, denial_reply="explicit")
    s.feed_client(b"use a.x\r\ndelete 9\r\nput 0 0 60 1\r\nz\r\n")
    assert take(s.to_upstream) == b"use a.x\r\nstats-job 9\r\n"
    s.client_eof()
    assert not s.draining  # the lookup is outstanding
    body = b"---\nid: 9\ntube: alpha\nstate: ready\n"
    s.feed_upstream(b"USING a.x\r\nOK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_upstream) == b"put 0 0 60 1\r\nz\r\n"
    assert s.draining


def test_may_keep_waiting_follows_the_policy() -> None:
    s, holder = waiting_session()
    assert s.may_keep_waiting()
    holder.current = acl(consume=False)
    assert not s.may_keep_waiting()
    s.feed_upstream(b"DEADLINE_SOON\r\n")  # a reply that ends the wait
    assert s.may_keep_waiting()


def test_held_input_is_bounded_by_the_relay_bound() -> None:
    s, _ = waiting_session()
    s.feed_client(b"list-tube-used\r\n" * (MAX_HELD_BYTES // 16 + 1))
    assert s.parser.buffered > MAX_HELD_BYTES
    assert not s.reads_client()  # the relay stops reading at this point
    assert s.waiting and take(s.to_upstream) == b"reserve\r\n"

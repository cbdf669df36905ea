"""Issue 9, item 5: the proxy-wide budget of put bodies in flight (``limits.max_buffered_bytes``),
sans-I/O: the ``Budget`` rules (fits or empty, FIFO, cancel), the parser holding a put's body
until it is admitted, and sessions sharing one budget, fed byte at a time and in random
chunkings (hypothesis), with the relay's part played by a small driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from conftest import parse_in_chunks
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.acl import Policy, parse_acl
from proxy.budget import Budget
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.protocol import OP_LIST_TUBE_USED, OP_PUT, ClientParser
from proxy.session import Session

# --- Budget -----------------------------------------------------------------------------------


def test_grants_what_fits_and_queues_the_rest_in_order() -> None:
    b = Budget(100)
    assert b.acquire("a", 60)
    assert not b.acquire("b", 50)  # does not fit
    assert not b.acquire("c", 10)  # fits, but b is waiting before it: no overtaking
    assert (b.used, b.waiting, b.pauses) == (60, 2, 2)
    assert b.release(60) == ["b", "c"]  # both granted, in arrival order, already charged
    assert (b.used, b.waiting) == (60, 0)
    assert b.release(50) == [] and b.release(10) == []
    assert b.used == 0 and b.peak == 60


def test_a_put_larger_than_the_whole_budget_runs_alone() -> None:
    b = Budget(100)
    assert b.acquire("big", 500)  # nothing reserved: admitted, so it can progress
    assert not b.acquire("small", 1)
    assert b.release(500) == ["small"]
    assert not b.acquire("big2", 500)
    assert b.release(1) == ["big2"]  # empty again: the big one goes, alone
    assert b.used == 500


def test_a_large_waiter_is_not_starved_by_small_ones() -> None:
    b = Budget(100)
    assert b.acquire("a", 90)
    assert not b.acquire("large", 100)
    for i in range(5):
        assert not b.acquire(f"s{i}", 1)  # would fit, but wait behind "large"
    assert b.release(90) == ["large"]
    assert b.release(100) == [f"s{i}" for i in range(5)]


def test_cancel_withdraws_and_grants_those_behind() -> None:
    b = Budget(100)
    assert b.acquire("a", 50)
    assert not b.acquire("head", 80)
    assert not b.acquire("next", 40)
    assert b.cancel("head") == ["next"]  # the head was what blocked "next"
    assert b.cancel("head") == []  # twice: nothing
    assert b.cancel("never") == []
    assert b.used == 90 and b.waiting == 0


def test_a_key_queues_once() -> None:
    b = Budget(10)
    assert b.acquire("a", 10)
    assert not b.acquire("b", 5)
    assert not b.acquire("b", 5)
    assert b.waiting == 1 and b.pauses == 1
    assert b.is_waiting("b") and not b.is_waiting("a")


def test_releasing_more_than_reserved_is_a_bug() -> None:
    b = Budget(10)
    b.acquire("a", 3)
    with pytest.raises(ValueError, match="only 3 reserved"):
        b.release(4)
    with pytest.raises(ValueError):
        Budget(0)


class BudgetMachine(RuleBasedStateMachine):
    """Random acquire/release/cancel against a model of who holds what."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = 100
        self.b = Budget(self.limit)
        self.held: dict[int, int] = {}  # key -> granted size
        self.queue: list[tuple[int, int]] = []  # model FIFO
        self.next_key = 0

    def _granted(self, keys: list[Any]) -> None:
        expected = [k for k, _ in self.queue[: len(keys)]]
        assert keys == expected  # arrival order, a prefix of the queue
        for k, n in self.queue[: len(keys)]:
            self.held[k] = n
        del self.queue[: len(keys)]

    @rule(n=st.integers(0, 250))
    def acquire(self, n: int) -> None:
        k = self.next_key
        self.next_key += 1
        if self.b.acquire(k, n):
            assert not self.queue
            self.held[k] = n
        else:
            self.queue.append((k, n))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(self.held)))
        self._granted(self.b.release(self.held.pop(k)))

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.queue) - 1))
        k, _ = self.queue.pop(i)
        granted = self.b.cancel(k)
        self._granted(granted)

    @invariant()
    def conserved(self) -> None:
        assert self.b.used == sum(self.held.values())
        assert self.b.waiting == len(self.queue)

    @invariant()
    def bounded(self) -> None:
        # within the limit, or one reservation alone (a put larger than the budget)
        assert self.b.used <= self.limit or len([n for n in self.held.values() if n]) <= 1
        assert self.b.peak >= self.b.used

    @invariant()
    def no_waiter_left_behind(self) -> None:
        if self.queue:
            head = self.queue[0][1]
            assert self.b.used and self.b.used + head > self.limit


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


# --- the parser holds a put's body until admitted -----------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_parser_holds_the_body_until_admitted(chunk: int) -> None:
    p = ClientParser(100)
    verdicts: list[bool | None] = [None]
    p.on_put = lambda *_: verdicts.pop(0) if verdicts else True
    wire = b"put 1 2 3 5\r\nhello\r\nlist-tube-used\r\n"
    got = parse_in_chunks(p, wire, chunk)
    assert got == [] and p.held  # nothing parsed past the held put, its bytes kept
    assert p.buffered == len(wire) - len(b"put 1 2 3 5\r\n")
    p.admit()
    assert p.next_command() == (OP_PUT, 1, 2, 3, b"hello")
    assert p.next_command() == (OP_LIST_TUBE_USED,)
    assert not p.held


# --- sessions sharing one budget ----------------------------------------------------------------

ACL = {
    "principals": [{"name": "p", "match": {"cn": "p"}}, {"name": "all", "match": {"cn": "a"}}],
    "rules": [
        {"principal": "p", "tubes": ["jobs"], "allow": ["produce"]},
        {"principal": "all", "tubes": ["*"], "allow": ["produce", "consume"]},
    ],
}


@dataclass
class Holder:
    current: Policy


def _session(budget: Budget, principal: str = "p", holder: Holder | None = None) -> Session:
    holder = holder or Holder(parse_acl(ACL, "<t>"))
    return Session(holder, principal, 1000, denial_reply="explicit", budget=budget)


def _flush(s: Session, b: Budget) -> list[Any]:
    """The relay's part after each call: hand ``to_upstream`` over, release ``queued``."""
    if not s.queued:
        return []
    n, s.queued = s.queued, 0
    return b.release(n)


def test_a_put_reserves_its_size_while_its_body_arrives_byte_at_a_time() -> None:
    b = Budget(1000)
    s = _session(b)
    for byte in b"use jobs\r\nput 0 0 60 4\r\n":
        s.feed_client(bytes([byte]))
    assert (s.receiving, b.used) == (4, 4)
    for byte in b"abcd\r":
        s.feed_client(bytes([byte]))
        assert (s.receiving, s.queued, b.used) == (4, 0, 4)
    s.feed_client(b"\n")
    assert (s.receiving, s.queued, b.used) == (0, 4, 4)  # complete, in to_upstream
    assert bytes(s.to_upstream) == b"use jobs\r\nput 0 0 60 4\r\nabcd\r\n"
    assert _flush(s, b) == [] and b.used == 0


@pytest.mark.parametrize("principal", ["p", "all"])  # "all": puts are free, no ACL decision
def test_a_put_that_does_not_fit_stalls_its_session_until_granted(principal: str) -> None:
    b = Budget(10)
    first, second = _session(b, principal), _session(b, principal)
    first.feed_client(b"use jobs\r\nput 0 0 60 8\r\n12345")
    second.feed_client(b"use jobs\r\nput 0 0 60 5\r\nabcde\r\nlist-tube-used\r\n")
    assert second.stalled == 5 and second.parser.held
    assert bytes(second.to_upstream) == b"use jobs\r\n"  # nothing past the stalled put
    second.client_eof()  # an EOF now must not drop the held put
    assert not second.draining
    first.feed_client(b"678\r\n")
    granted = _flush(first, b)
    assert granted == [second] and b.used == 5
    second.budget_granted()
    assert second.backlog and not second.stalled and second.receiving == 5
    second.resume()
    assert bytes(second.to_upstream) == (
        b"use jobs\r\nput 0 0 60 5\r\nabcde\r\nlist-tube-used\r\n"
    )
    assert second.draining  # the EOF is honoured once everything was run
    assert _flush(second, b) == [] and b.used == 0


def test_refused_too_big_and_empty_puts_reserve_nothing() -> None:
    b = Budget(10)
    s = _session(b)
    s.feed_client(b"put 0 0 60 5\r\nabcde\r\n")  # default tube: refused at its line
    s.feed_client(b"use jobs\r\nput 0 0 60 2000\r\n" + b"x" * 2002)  # over max_job_size
    s.feed_client(b"put 0 0 60 0\r\n\r\n")
    assert b.used == 0 and b.pauses == 0 and not s.receiving and not s.queued


def test_dropped_bodies_are_released_too() -> None:
    holder = Holder(parse_acl(ACL, "<t>"))
    b = Budget(100)
    s = _session(b, holder=holder)
    s.feed_client(b"use jobs\r\nput 0 0 60 3\r\nab")
    holder.current = parse_acl({**ACL, "rules": []}, "<t>")  # revoked mid-upload
    s.feed_client(b"c\r\n")
    assert s.queued == 3 and b"put" not in bytes(s.to_upstream)
    assert _flush(s, b) == [] and b.used == 0
    holder.current = parse_acl(ACL, "<t>")
    s.feed_client(b"put 0 0 60 3\r\nabcXY")  # EXPECTED_CRLF
    assert s.queued == 3
    _flush(s, b)
    s.limiter = lambda: False
    s.feed_client(b"\r\nput 0 0 60 3\r\nabc\r\n")  # rate limited: not run
    assert s.queued == 3 and s.rate_limited
    _flush(s, b)
    assert b.used == 0


PUTS = st.lists(
    st.tuples(st.sampled_from(["jobs", "other"]), st.integers(0, 40)), min_size=1, max_size=6
)


@settings(max_examples=150, deadline=None)
@given(
    clients=st.lists(PUTS, min_size=1, max_size=4),
    limit=st.integers(1, 60),
    chunk=st.integers(1, 50),
    order=st.randoms(use_true_random=False),
)
def test_sessions_sharing_a_budget_deliver_every_allowed_put(
    clients: list[list[tuple[str, int]]], limit: int, chunk: int, order: Any
) -> None:
    """Several sessions upload in random chunks and interleavings through a small budget; the
    driver releases after each step and resumes granted sessions. Every allowed body arrives
    whole and in order, the budget never holds more than the bound (or one put alone), and
    it is back to zero at the end."""
    b = Budget(limit)
    sessions = [_session(b) for _ in clients]
    wires = []
    expected = []
    for puts in clients:
        wire = bytearray()
        out = bytearray()
        for i, (tube, n) in enumerate(puts):
            body = bytes([65 + i]) * n
            wire += b"use %s\r\nput 0 0 60 %d\r\n%s\r\n" % (tube.encode(), n, body)
            if tube == "jobs":  # "other" is not visible to p: use and put denied locally
                out += b"use jobs\r\nput 0 0 60 %d\r\n%s\r\n" % (n, body)
        wires.append(bytes(wire))
        expected.append(bytes(out))
    offsets = [0] * len(sessions)
    granted_to: set[int] = set()
    for _ in range(10_000):
        ready = [
            i for i, s in enumerate(sessions) if offsets[i] < len(wires[i]) and not s.stalled
        ] + sorted(granted_to)
        if not ready:
            break
        i = order.choice(ready)
        s = sessions[i]
        if i in granted_to:
            granted_to.discard(i)
            s.budget_granted()
            s.resume()
        else:
            s.feed_client(wires[i][offsets[i] : offsets[i] + chunk])
            offsets[i] += chunk
        for key in _flush(s, b):
            granted_to.add(sessions.index(key))
        # (a granted session's reservation is charged before it runs budget_granted)
        pending = sum(sessions[j].stalled for j in granted_to)
        assert sum(x.receiving + x.queued for x in sessions) + pending == b.used
        assert b.used <= max(limit, 40)
    assert not granted_to and all(not s.stalled for s in sessions)
    for s, want in zip(sessions, expected, strict=True):
        assert bytes(s.to_upstream) == want
    assert b.used == 0 and b.waiting == 0


# --- config -------------------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "upstream": "127.0.0.1:11300",
    "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"},
    "acl": "acl.yaml",
}


def test_config_key() -> None:
    assert parse_config(BASE, "p.yaml").limits.max_buffered_bytes == 64 * 1024 * 1024
    cfg = parse_config({**BASE, "limits": {"max_buffered_bytes": 4096}}, "p.yaml")
    assert cfg.limits.max_buffered_bytes == 4096


@pytest.mark.parametrize("value", [0, -1, "64MiB", 1.5, True])
def test_config_key_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"limits\.max_buffered_bytes"):
        parse_config({**BASE, "limits": {"max_buffered_bytes": value}}, "p.yaml")


def test_a_reload_revoking_a_free_producer_refuses_at_the_next_put_line() -> None:
    """A principal allowed every put skips the early decision, until the policy changes."""
    holder = Holder(parse_acl(ACL, "<t>"))
    b = Budget(1000)
    s = _session(b, "all", holder)
    s.feed_client(b"put 0 0 60 3\r\nabc\r\n")
    assert b"abc" in bytes(s.to_upstream) and s.queued == 3
    _flush(s, b)
    holder.current = parse_acl({**ACL, "rules": []}, "<t>")
    s.feed_client(b"put 0 0 60 3\r\nab")
    assert s.parser.buffered == 0 and b.used == 0  # refused at its line, body discarded

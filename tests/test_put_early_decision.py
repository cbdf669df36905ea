"""Issue 9, item 5: a ``put`` is decided from its command line before its body is buffered; a
refused body is discarded as it streams in (never held), and an allowed one is decided again
when complete (a reload may land during the upload)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import parse_in_chunks

from proxy.acl import Policy, parse_acl
from proxy.protocol import (
    EXPECTED_CRLF,
    NEED_DATA,
    OP_ERROR,
    OP_LIST_TUBE_USED,
    OP_PUT,
    ClientParser,
)
from proxy.session import Session


def test_parser_discards_a_refused_body_without_buffering_it() -> None:
    p = ClientParser(100_000)
    seen = []
    p.on_put = lambda pri, delay, ttr, n: seen.append((pri, delay, ttr, n)) or False
    p.feed(b"put 1 2 3 60000\r\n")
    assert p.next_command() is NEED_DATA
    for _ in range(60):
        p.feed(b"x" * 1000)
        assert p.next_command() is NEED_DATA
        assert p.buffered == 0  # streamed away, never held
    p.feed(b"\r\nlist-tube-used\r\n")
    assert p.next_command() == (OP_PUT, 1, 2, 3, None)  # answered in its turn by the session
    assert p.next_command() == (OP_LIST_TUBE_USED,)
    assert seen == [(1, 2, 3, 60000)]


def test_a_refused_put_without_its_crlf_is_expected_crlf_as_in_beanstalkd() -> None:
    p = ClientParser(100)
    p.on_put = lambda *_: False
    p.feed(b"put 0 0 60 3\r\nabcXYlist-tube-used\r\n")
    assert p.next_command() == (OP_ERROR, EXPECTED_CRLF)
    assert p.next_command() == (OP_LIST_TUBE_USED,)


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_parser_refused_and_allowed_puts_in_any_chunking(chunk: int) -> None:
    p = ClientParser(100)
    p.on_put = lambda pri, delay, ttr, n: pri != 9
    wire = b"put 9 0 1 3\r\nabc\r\nput 1 0 1 2\r\nhi\r\nput 9 0 1 0\r\n\r\nlist-tube-used\r\n"
    got = parse_in_chunks(p, wire, chunk)
    assert got == [
        (OP_PUT, 9, 0, 1, None),
        (OP_PUT, 1, 0, 1, b"hi"),
        (OP_PUT, 9, 0, 1, None),
        (OP_LIST_TUBE_USED,),
    ]


def test_many_refused_puts_in_one_buffer() -> None:
    p = ClientParser(100)
    p.on_put = lambda *_: False
    p.feed(b"put 0 0 1 1\r\nx\r\n" * 50_000 + b"list-tube-used\r\n")
    for _ in range(50_000):
        assert p.next_command() == (OP_PUT, 0, 0, 1, None)
    assert p.next_command() == (OP_LIST_TUBE_USED,)


ACL = {
    "principals": [{"name": "p", "match": {"cn": "p"}}, {"name": "none", "match": {"cn": "n"}}],
    "rules": [{"principal": "p", "tubes": ["jobs"], "allow": ["produce"]}],
}


@dataclass
class Holder:
    current: Policy


def test_a_principal_without_produce_cannot_park_bodies() -> None:
    s = Session(Holder(parse_acl(ACL, "<t>")), "none", 65535, denial_reply="explicit")
    s.feed_client(b"put 0 0 60 65000\r\n" + b"z" * 64_000)
    assert s.parser.buffered == 0  # nothing of the body is held
    s.feed_client(b"z" * 1000 + b"\r\nlist-tube-used\r\n")
    assert bytes(s.to_client) == b"NOT_PERMITTED\r\n"  # answered in its turn
    assert s.denials[0]["command"] == "put"
    assert bytes(s.to_upstream) == b"list-tube-used\r\n"
    assert s.op_counts[OP_PUT] == 1 and s.denied_counts[OP_PUT] == 1


def test_a_reload_during_the_upload_decides_again() -> None:
    holder = Holder(parse_acl(ACL, "<t>"))
    s = Session(holder, "p", 1000, denial_reply="explicit")
    s.feed_client(b"use jobs\r\nput 0 0 60 10\r\n12345")
    assert bytes(s.to_upstream) == b"use jobs\r\n"
    holder.current = parse_acl({**ACL, "rules": []}, "<t>")  # produce revoked mid-upload
    s.feed_client(b"67890\r\n")
    assert bytes(s.to_upstream) == b"use jobs\r\n"  # the put never reaches beanstalkd
    s.feed_upstream(b"USING jobs\r\n")
    assert bytes(s.to_client) == b"USING jobs\r\nNOT_PERMITTED\r\n"


def test_early_refusal_respects_the_rate_limit_and_denied_use() -> None:
    s = Session(Holder(parse_acl(ACL, "<t>")), "p", 1000, denial_reply="compatible")
    s.limiter = lambda: False
    s.feed_client(b"put 0 0 60 3\r\nabc\r\n")  # default tube: denied; over the rate first
    assert bytes(s.to_client) == b"OUT_OF_MEMORY\r\n" and s.rate_limited == 1
    s.to_client.clear()
    s.limiter = None
    s.feed_client(b"use secret\r\nput 0 0 60 3\r\nabc\r\n")
    assert bytes(s.to_client) == b"UNKNOWN_COMMAND\r\n" * 2
    assert s.denials[-1]["tube"] == "secret"

"""The pure session state machine, driven without sockets: commands in, canonical bytes out,
replies in command order, local replies waiting their turn, lookups holding the client."""

from __future__ import annotations

import pytest
from conftest import make_session, take

from proxy.acl import parse_acl
from proxy.budget import Budget
from proxy.relay import PolicyHolder
from proxy.session import MAX_HELD_BYTES, MAX_PENDING, TURN_BUDGET, DrainCause, Output, Session

ACL = {
    "principals": [
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "producer", "match": {"cn": "producer"}},
        {"name": "keeper", "match": {"cn": "keeper"}},
    ],
    "rules": [
        {"principal": "admin", "allow": ["all"]},
        {"principal": "producer", "tubes": ["jobs"], "allow": ["produce", "inspect"]},
        {"principal": "keeper", "tubes": ["jobs"], "allow": ["manage"]},
    ],
}


def session(principal: str = "admin", denial_reply: str = "explicit") -> Session:
    return make_session(ACL, principal, denial_reply)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_canonical_forwarding_in_any_chunking(chunk: int) -> None:
    s = session()
    wire = b"use  jobs\r\nput 00 0 010 5\r\nhello\r\ndelete    000007\r\n"
    for i in range(0, len(wire), chunk):
        s.feed_client(wire[i : i + chunk])
    # "use  jobs" (two spaces) is BAD_FORMAT, answered locally; the rest is canonicalized
    assert take(s.to_upstream) == b"put 0 0 10 5\r\nhello\r\ndelete 7\r\n"
    assert take(s.to_client) == b"BAD_FORMAT\r\n"
    s.feed_upstream(b"INSERTED 1\r\nNOT_FOUND\r\n")
    assert take(s.to_client) == b"INSERTED 1\r\nNOT_FOUND\r\n"


def test_local_reply_waits_behind_pending_replies() -> None:
    s = session("producer")
    s.feed_client(b"use jobs\r\nput 0 0 1 1\r\nx\r\nwatch jobs\r\nlist-tube-used\r\n")
    assert take(s.to_upstream) == b"use jobs\r\nput 0 0 1 1\r\nx\r\nlist-tube-used\r\n"
    assert take(s.to_client) == b""  # NOT_PERMITTED for watch must wait for USING/INSERTED
    s.feed_upstream(b"USING jobs\r\n")
    assert take(s.to_client) == b"USING jobs\r\n"
    s.feed_upstream(b"INSERTED 9\r\nUSING jobs\r\n")
    assert take(s.to_client) == b"INSERTED 9\r\nNOT_PERMITTED\r\nUSING jobs\r\n"
    assert [d["command"] for d in s.denials] == ["watch"]


def test_denied_put_body_is_consumed_and_never_forwarded() -> None:
    s = session("producer")
    s.feed_client(b"put 0 0 1 12\r\nuse victim\r\n\r\nlist-tube-used\r\n")
    assert take(s.to_upstream) == b"list-tube-used\r\n"
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"
    assert "use victim" not in repr(s.denials)


def test_lookup_holds_the_client_until_stats_job_answers() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\nlist-tube-used\r\n")
    assert take(s.to_upstream) == b"stats-job 42\r\n"
    assert s.blocked
    body = b"---\nid: 42\ntube: other\nstate: ready\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert not s.blocked
    # a job in a tube the principal cannot see does not exist for it
    assert take(s.to_client) == b"NOT_FOUND\r\n"
    assert take(s.to_upstream) == b"list-tube-used\r\n"


def test_peek_of_a_job_still_uploading_is_not_found() -> None:
    s = session("producer")
    s.feed_client(b"peek 5\r\n")
    body = b"---\nid: 5\ntube: jobs\nstate: invalid\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_client) == b"NOT_FOUND\r\n"
    assert take(s.to_upstream) == b"stats-job 5\r\n"  # the peek itself never went out


def test_full_access_principal_needs_no_lookups_and_remembers_nothing() -> None:
    s = session("admin")
    s.feed_client(b"put 0 0 1 1\r\nx\r\npeek 3\r\ndelete 3\r\nkick-job 3\r\n")
    assert take(s.to_upstream) == b"put 0 0 1 1\r\nx\r\npeek 3\r\ndelete 3\r\nkick-job 3\r\n"
    s.feed_upstream(b"INSERTED 3\r\n")
    assert not s.jobs  # nothing depends on a job's tube for admin


def test_protocol_error_replies_then_drains() -> None:
    s = session()
    s.feed_client(b"put 0 0 1 +1\r\nuse victim\r\n")
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == b"BAD_FORMAT\r\n"
    assert s.draining and "malformed put" in s.close_reason
    assert s.drain_cause is DrainCause.PROTOCOL_ERROR


def test_unsolicited_upstream_reply_fails_the_session() -> None:
    s = session()
    s.feed_upstream(b"USING default\r\n")
    assert s.failed and "no command pending" in s.failed


def test_a_job_taken_with_reserve_job_can_be_released_with_manage_alone() -> None:
    """reserve-job is a manage command; its job must not be stuck until the TTR runs out."""
    s = session("keeper")
    s.feed_client(b"reserve-job 5\r\n")
    assert take(s.to_upstream) == b"stats-job 5\r\n"  # the job's tube decides
    body = b"---\nid: 5\ntube: jobs\nstate: delayed\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_upstream) == b"reserve-job 5\r\n"
    s.feed_upstream(b"RESERVED 5 1\r\nx\r\n")
    assert take(s.to_client) == b"RESERVED 5 1\r\nx\r\n"
    s.feed_client(b"touch 5\r\nrelease 5 0 0\r\n")
    assert take(s.to_upstream) == b"touch 5\r\nrelease 5 0 0\r\n"
    assert not s.denials


def test_own_job_operations_still_need_consume_or_manage() -> None:
    s = session("producer")  # produce + inspect on jobs: neither consume nor manage
    s.feed_client(b"reserve-job 5\r\n")
    body = b"---\nid: 5\ntube: jobs\nstate: ready\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_client) == b"NOT_PERMITTED\r\n"


def test_drain_cause_follows_the_logged_reason() -> None:
    s = session()
    s.feed_client(b"quit\r\n")
    assert (s.drain_cause, s.close_reason) == (DrainCause.QUIT, "quit")
    s.stop("idle timeout")  # a drain under way keeps its cause
    assert (s.drain_cause, s.close_reason) == (DrainCause.QUIT, "quit")
    eof = session()
    assert eof.drain_cause is None and not eof.draining
    eof.client_eof()
    assert (eof.drain_cause, eof.close_reason) == (DrainCause.CLIENT_EOF, "client closed")
    assert eof.draining
    relay = session()
    relay.stop("proxy shutting down")
    assert relay.draining
    assert (relay.drain_cause, relay.close_reason) == (DrainCause.PROXY, "proxy shutting down")
    relay.client_eof()  # the client's EOF does not change why it drains
    assert relay.drain_cause is DrainCause.PROXY


# --- the contract with the relay: one Output per step, the exact values, step by step ---------
#
# After every step the relay calls ``output()`` once and does only what it says. ``Output()``
# is "nothing to do, the client may be read"; each expectation names what differs from it.

LIST_OK = b"OK 4\r\n---\n\r\n"


def stats_job(job: int, tube: str, state: str = "ready") -> bytes:
    body = b"---\nid: %d\ntube: %s\nstate: %s\n" % (job, tube.encode(), state.encode())
    return b"OK %d\r\n%s\r\n" % (len(body), body)


def budget_session(principal: str, budget: Budget) -> Session:
    policy = PolicyHolder(parse_acl(ACL, "<t>"))
    return Session(policy, principal, 100, denial_reply="explicit", budget=budget)


def test_quit_waits_for_the_client_eof_before_half_closing() -> None:
    s = session()
    s.feed_client(b"list-tubes\r\nquit\r\n")
    # beanstalkd closes by itself after answering what came before the quit: no half-close;
    # the client is still read, only to notice its EOF
    assert s.output() == Output(to_upstream=b"list-tubes\r\nquit\r\n", pending=True)
    s.feed_client(b"put 0 0 1 1\r\nx\r\n")  # after quit: ignored
    assert s.output() == Output(pending=True)
    s.client_eof()
    assert s.output() == Output(half_close=True, read=False, pending=True)
    s.feed_upstream(LIST_OK)
    assert s.output() == Output(to_client=LIST_OK, half_close=True, read=False)
    assert s.upstream_closed("upstream closed") == ("quit", "client")


def test_quit_then_upstream_closes_before_the_client_eof() -> None:
    s = session()
    s.feed_client(b"quit\r\n")
    assert s.output() == Output(to_upstream=b"quit\r\n")  # beanstalkd does not answer it
    # beanstalkd closed: that ends the drain the quit began, logged as the client's
    assert s.upstream_closed("upstream closed") == ("quit", "client")
    assert s.output() == Output()  # nothing happened in between: read on, no half-close


def test_client_eof_runs_what_it_sent_then_half_closes() -> None:
    s = session()
    s.feed_client(b"use jobs\r\nput 0 0 1 1\r\nx\r\nput 0 0 1 9\r\npart")
    assert s.output() == Output(
        to_upstream=b"use jobs\r\nput 0 0 1 1\r\nx\r\n", pending=True
    )
    s.client_eof()  # the partial put is dropped
    assert s.output() == Output(half_close=True, read=False, pending=True)
    s.feed_upstream(b"USING jobs\r\nINSERTED 1\r\n")
    assert s.output() == Output(
        to_client=b"USING jobs\r\nINSERTED 1\r\n", half_close=True, read=False
    )
    assert s.upstream_closed("upstream closed") == ("client closed", "client")


def test_client_eof_with_nothing_sent_half_closes_at_once() -> None:
    s = session()
    assert s.output() == Output()
    s.client_eof()
    assert s.output() == Output(half_close=True, read=False)
    s.client_eof()  # a second EOF changes nothing
    assert s.output() == Output(half_close=True, read=False)


def test_eof_with_unrun_commands_finishes_the_backlog_first() -> None:
    s = session()
    s.feed_client(b"list-tube-used\r\n" * 150)  # more than two turns
    assert s.output() == Output(
        to_upstream=b"list-tube-used\r\n" * TURN_BUDGET, backlog=True, pending=True
    )
    s.client_eof()  # runs a turn, as the relay's next turn would
    assert s.has_unrun_commands()
    assert s.output() == Output(
        to_upstream=b"list-tube-used\r\n" * TURN_BUDGET, backlog=True, pending=True
    )
    s.resume()  # the last 22, then the EOF drains
    assert not s.has_unrun_commands()
    assert s.output() == Output(
        to_upstream=b"list-tube-used\r\n" * 22, half_close=True, read=False, pending=True
    )


def test_eof_behind_a_put_waiting_for_the_budget_waits_for_its_grant() -> None:
    budget = Budget(10)
    first = budget_session("admin", budget)
    second = budget_session("admin", budget)
    first.feed_client(b"put 0 0 60 8\r\n1234")
    assert first.output() == Output()  # reading the body: 8 bytes of the budget reserved
    second.feed_client(b"put 0 0 60 5\r\nabcde\r\nlist-tube-used\r\n")
    # does not fit: the body is not read, nor anything after it
    assert second.output() == Output(read=False)
    second.client_eof()
    assert second.has_unrun_commands()
    assert second.output() == Output(read=False)  # no half-close: the put must still run
    first.feed_client(b"5678\r\n")
    assert first.output() == Output(
        to_upstream=b"put 0 0 60 8\r\n12345678\r\n", release=8, pending=True
    )
    assert budget.release(8) == [second]  # what the relay does with ``release``
    second.budget_granted()
    assert second.output() == Output(backlog=True)  # the relay runs a turn next
    second.resume()
    assert second.output() == Output(
        to_upstream=b"put 0 0 60 5\r\nabcde\r\nlist-tube-used\r\n",
        release=5,
        half_close=True,
        read=False,
        pending=True,
    )


def test_a_put_after_a_denied_use_is_refused_at_its_line_and_reserves_nothing() -> None:
    budget = Budget(100)
    s = budget_session("producer", budget)
    s.feed_client(b"use jobs\r\nput 0 0 60 3\r\nabc\r\nuse other\r\n")
    out = s.output()
    assert (out.to_client, out.to_upstream, out.release, out.read, out.pending) == (
        b"", b"use jobs\r\nput 0 0 60 3\r\nabc\r\n", 3, True, True
    )  # fmt: skip
    assert [(d["command"], d["tube"], d["reply"]) for d in out.denials] == [
        ("use", "other", "NOT_PERMITTED")
    ]
    # the used tube is in doubt until a use is allowed: the put must not land in "jobs"
    s.feed_client(b"put 0 0 60 2\r\nxy\r\n")
    out = s.output()
    assert (out.to_client, out.to_upstream, out.release, out.read, out.pending) == (
        b"", b"", 0, True, True
    )  # fmt: skip
    assert [(d["command"], d["tube"]) for d in out.denials] == [("put", "other")]
    assert budget.used == 3  # the first body only, until the relay releases it
    s.feed_upstream(b"USING jobs\r\nINSERTED 1\r\n")
    assert s.output() == Output(
        to_client=b"USING jobs\r\nINSERTED 1\r\nNOT_PERMITTED\r\nNOT_PERMITTED\r\n"
    )
    assert s.take_budget() == (0, 0)


def test_keeper_put_is_refused_and_its_budget_released_with_it() -> None:
    budget = Budget(100)
    s = budget_session("keeper", budget)
    s.feed_client(b"put 0 0 60 4\r\nabcd\r\n")  # keeper may not produce: body dropped
    out = s.output()
    assert (out.to_client, out.to_upstream, out.release) == (b"NOT_PERMITTED\r\n", b"", 0)
    assert [d["command"] for d in out.denials] == ["put"]
    assert budget.used == 0  # a put refused at its line reserves nothing


def test_relay_drain_half_closes_at_once_and_is_logged_as_the_proxy() -> None:
    s = session()
    s.feed_client(b"list-tubes\r\n")
    assert s.output() == Output(to_upstream=b"list-tubes\r\n", pending=True)
    assert s.upstream_closed("upstream closed") is None
    s.stop("idle timeout")
    assert s.output() == Output(half_close=True, read=False, pending=True)
    s.feed_client(b"use jobs\r\n")  # nothing more is read or run
    assert s.output() == Output(half_close=True, read=False, pending=True)
    s.feed_upstream(LIST_OK)
    assert s.output() == Output(to_client=LIST_OK, half_close=True, read=False)
    assert s.upstream_closed("upstream closed") == ("idle timeout", "proxy")


def test_relay_drain_keeps_a_quit_and_its_wait_for_the_eof() -> None:
    s = session()
    s.feed_client(b"quit\r\n")
    s.output()
    s.stop("proxy shutting down")  # a drain under way keeps its cause
    assert s.output() == Output()
    assert s.upstream_closed("upstream closed") == ("quit", "client")


def test_relay_drain_during_a_lookup_half_closes_after_its_reply() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\n")
    assert s.output() == Output(to_upstream=b"stats-job 42\r\n", read=False, pending=True)
    s.stop("proxy shutting down")
    assert s.output() == Output(read=False, pending=True)  # not yet: the lookup is out
    s.feed_upstream(stats_job(42, "jobs"))
    # the peek came before the drain: it runs, then upstream is half-closed
    assert s.output() == Output(
        to_upstream=b"peek 42\r\n", half_close=True, read=False, pending=True
    )
    assert s.upstream_closed("upstream closed") == ("proxy shutting down", "proxy")


def test_client_eof_during_a_lookup_half_closes_after_its_reply() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\n")
    assert s.output() == Output(to_upstream=b"stats-job 42\r\n", read=False, pending=True)
    s.client_eof()
    assert s.output() == Output(read=False, pending=True)  # the lookup's reply must come
    assert s.upstream_closed("connection reset") is None  # lost, not the end of a drain
    s.feed_upstream(stats_job(42, "jobs"))
    assert s.output() == Output(
        to_upstream=b"peek 42\r\n", half_close=True, read=False, pending=True
    )


def test_quit_during_a_lookup_is_run_after_it() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\nquit\r\n")
    assert s.output() == Output(to_upstream=b"stats-job 42\r\n", read=False, pending=True)
    s.client_eof()
    assert s.output() == Output(read=False, pending=True)
    s.feed_upstream(stats_job(42, "jobs"))
    # the EOF came before the quit ran: upstream is half-closed at once
    assert s.output() == Output(
        to_upstream=b"peek 42\r\nquit\r\n", half_close=True, read=False, pending=True
    )
    assert s.drain_cause is DrainCause.QUIT
    assert s.upstream_closed("upstream closed") == ("quit", "client")


def test_a_lookup_of_a_hidden_job_answers_not_found_and_reads_on() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\nlist-tube-used\r\n")
    assert s.output() == Output(to_upstream=b"stats-job 42\r\n", read=False, pending=True)
    s.feed_upstream(stats_job(42, "other"))  # a tube the principal cannot see
    denial = {
        "principal": "producer",
        "command": "peek",
        "tube": "other",
        "job": 42,
        "rule": "default deny (no rule allows inspect on 'other' for producer)",
        "reply": "NOT_FOUND",
    }
    assert s.output() == Output(
        to_client=b"NOT_FOUND\r\n",
        to_upstream=b"list-tube-used\r\n",
        denials=[denial],
        pending=True,
    )
    assert s.output() == Output(pending=True)  # each record is handed over once


def test_a_blocking_reserve_holds_what_follows_until_its_reply() -> None:
    s = session()
    s.feed_client(b"reserve\r\nuse jobs\r\n")
    assert s.output() == Output(to_upstream=b"reserve\r\n", pending=True)  # read on
    s.feed_client(b"list-tube-used\r\n" * (MAX_HELD_BYTES // 16 + 1))
    assert s.output() == Output(read=False, pending=True)  # past the held-input bound
    s.feed_upstream(b"RESERVED 7 1\r\nj\r\n")
    out = s.output()
    assert (out.to_client, out.read, out.backlog, out.pending) == (
        b"RESERVED 7 1\r\nj\r\n", True, True, True
    )  # fmt: skip
    assert out.to_upstream == b"use jobs\r\n" + b"list-tube-used\r\n" * (TURN_BUDGET - 1)


def test_eof_behind_a_blocking_reserve_runs_the_held_commands_and_half_closes() -> None:
    s = session()
    s.feed_client(b"reserve\r\nuse jobs\r\n")
    assert s.output() == Output(to_upstream=b"reserve\r\n", pending=True)
    s.client_eof()
    # beanstalkd answers a half-closed client's reserve TIMED_OUT, then runs what follows
    assert s.output() == Output(
        to_upstream=b"use jobs\r\n", half_close=True, read=False, pending=True
    )
    s.feed_upstream(b"TIMED_OUT\r\nUSING jobs\r\n")
    assert s.output() == Output(
        to_client=b"TIMED_OUT\r\nUSING jobs\r\n", half_close=True, read=False
    )


def test_protocol_error_half_closes_without_waiting_for_the_client() -> None:
    s = session()
    s.feed_client(b"put 0 0 1 +1\r\nuse victim\r\n")
    assert s.output() == Output(to_client=b"BAD_FORMAT\r\n", half_close=True, read=False)
    s.client_eof()
    assert s.output() == Output(half_close=True, read=False)
    reason, by = s.upstream_closed("upstream closed") or ("", "")
    assert "malformed put" in reason and by == "proxy"


def test_protocol_error_behind_pending_replies_answers_in_its_turn() -> None:
    s = session()
    s.feed_client(b"list-tube-used\r\n" + b"x" * 300)  # a line longer than beanstalkd's
    assert s.output() == Output(
        to_upstream=b"list-tube-used\r\n", half_close=True, read=False, pending=True
    )
    s.feed_upstream(b"USING default\r\n")
    assert s.output() == Output(
        to_client=b"USING default\r\nBAD_FORMAT\r\n", half_close=True, read=False
    )


def test_an_unsolicited_reply_closes_both_sides_with_its_reason() -> None:
    s = session()
    s.feed_upstream(b"USING default\r\n")
    out = s.output()
    assert out.close == "upstream protocol error: reply from upstream with no command pending"
    s.feed_client(b"list-tubes\r\n")  # a failed session runs nothing more
    assert s.output().to_upstream == b""


def test_a_malformed_reply_closes_after_the_replies_before_it() -> None:
    s = session()
    s.feed_client(b"list-tube-used\r\nreserve-with-timeout 0\r\n")
    assert s.output() == Output(
        to_upstream=b"list-tube-used\r\nreserve-with-timeout 0\r\n", pending=True
    )
    s.feed_upstream(b"USING default\r\nRESERVED x 1\r\n")
    out = s.output()
    assert out.to_client == b"USING default\r\n"  # delivered before the close
    assert out.close is not None and out.close.startswith("upstream protocol error")


def test_an_upstream_close_while_relaying_is_a_loss() -> None:
    s = session()
    s.feed_client(b"reserve\r\n")
    s.output()
    assert s.upstream_closed("upstream lost: reset") is None  # logged as the relay sees it


def test_a_rate_limited_command_is_answered_in_its_turn_and_reads_on() -> None:
    allowed = iter([True, False, True])
    s = make_session(ACL, "admin", "explicit")
    s.limiter = lambda: next(allowed)
    s.feed_client(b"list-tube-used\r\nlist-tubes\r\nlist-tube-used\r\n")
    assert s.output() == Output(to_upstream=b"list-tube-used\r\n" * 2, pending=True)
    s.feed_upstream(b"USING default\r\nUSING default\r\n")
    assert s.output() == Output(
        to_client=b"USING default\r\nRATE_LIMITED\r\nUSING default\r\n"
    )
    assert s.rate_limited == 1


def test_bytes_for_an_upstream_not_yet_open_stay_buffered() -> None:
    budget = Budget(100)
    s = budget_session("admin", budget)
    s.feed_client(b"put 0 0 60 2\r\nab\r\nput 0 0 1 +1\r\n")
    # connecting: the client's own replies go out, nothing for upstream, no half-close yet
    assert s.output(upstream_open=False) == Output(read=False, pending=True)
    s.client_eof()
    assert s.output(upstream_open=False) == Output(read=False, pending=True)
    assert s.output() == Output(
        to_upstream=b"put 0 0 60 2\r\nab\r\n", release=2, half_close=True, read=False,
        pending=True,
    )  # fmt: skip
    s.feed_upstream(b"INSERTED 1\r\n")
    assert s.output() == Output(
        to_client=b"INSERTED 1\r\nBAD_FORMAT\r\n", half_close=True, read=False
    )


def test_too_many_pending_replies_stop_reading() -> None:
    s = session()
    s.feed_client(b"list-tubes\r\n" * MAX_PENDING)
    while s.backlog:  # the relay's later turns
        s.resume()
    assert len(s.pending) == MAX_PENDING and s.reads_client()  # exactly the bound
    s.feed_client(b"list-tubes\r\n")
    assert not s.reads_client()
    s.feed_upstream(b"OK 4\r\n---\n\r\n")
    assert s.reads_client()


def test_the_relay_takes_each_output_once() -> None:
    s = session("producer")
    s.feed_client(b"use jobs\r\nwatch other\r\n")
    out = s.output()
    assert out.to_upstream == b"use jobs\r\n"
    assert [d["command"] for d in out.denials] == ["watch"]  # recorded when decided
    assert s.output().to_upstream == b"" and s.output().denials == ()
    s.feed_upstream(b"USING jobs\r\n")
    assert s.output().to_client == b"USING jobs\r\nNOT_PERMITTED\r\n"
    assert s.output().to_client == b""
    s.feed_client(b"use jobs\r\n")
    assert s.take_client() == b"" and s.take_client() == b""
    assert s.take_budget() == (0, 0)  # no budget: nothing reserved


def test_a_backlog_is_unrun_commands_the_session_finishes_after_eof() -> None:
    s = session()
    assert not s.has_unrun_commands()
    s.feed_client(b"list-tubes\r\n" * 100)  # more than one turn
    assert s.backlog and s.has_unrun_commands()
    s.client_eof()
    while s.backlog:  # the relay's later turns
        assert s.has_unrun_commands() and not s.half_close_due()
        s.resume()
    assert not s.has_unrun_commands()
    assert take(s.to_upstream) == b"list-tubes\r\n" * 100
    assert s.drain_cause is DrainCause.CLIENT_EOF and s.half_close_due()


def test_a_closing_output_hands_over_no_bytes_and_no_budget() -> None:
    """``close`` set: ``to_upstream`` and the budget of complete bodies stay with the session,
    so the relay's close releases that budget (``take_budget``) instead of losing it."""
    budget = Budget(100)
    s = budget_session("admin", budget)
    s.feed_client(b"put 0 0 60 2\r\nab\r\n")
    assert s.output(upstream_open=False) == Output(pending=True)
    s.feed_upstream(b"INSERTED 1\r\nINSERTED 2\r\n")  # one reply too many: misbehaving
    out = s.output()
    assert out.close is not None and "upstream protocol error" in out.close
    assert (out.to_upstream, out.release, out.half_close) == (b"", 0, False)
    assert s.take_budget() == (0, 2)

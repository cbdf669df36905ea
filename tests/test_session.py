"""The pure session state machine, driven without sockets: commands in, canonical bytes out,
replies in command order, local replies waiting their turn, lookups holding the client."""

from __future__ import annotations

import pytest
from conftest import make_session, take

from proxy.session import MAX_PENDING, DrainCause, Session

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


# --- the relay's decisions: read the client, half-close upstream, how the close is logged ----


def decisions(s: Session) -> tuple[bool, bool]:
    """(read the client?, half-close upstream now?) as the relay carries them out."""
    return s.reads_client(), s.half_close_due()


def test_quit_waits_for_the_client_eof_before_half_closing() -> None:
    s = session()
    s.feed_client(b"list-tubes\r\nquit\r\n")
    assert take(s.to_upstream) == b"list-tubes\r\nquit\r\n"
    # beanstalkd closes by itself after answering what came before the quit: no half-close;
    # the client is still read, only to notice its EOF
    assert decisions(s) == (True, False)
    s.feed_client(b"put 0 0 1 1\r\nx\r\n")  # after quit: ignored
    assert take(s.to_upstream) == b""
    s.client_eof()
    assert decisions(s) == (False, True)
    s.feed_upstream(b"OK 4\r\n---\n\r\n")
    assert take(s.to_client) == b"OK 4\r\n---\n\r\n"
    assert s.upstream_closed("upstream closed") == ("quit", "client")


def test_client_eof_runs_what_it_sent_then_half_closes() -> None:
    s = session()
    s.feed_client(b"use jobs\r\nput 0 0 1 1\r\nx\r\nput 0 0 1 9\r\npart")
    assert decisions(s) == (True, False)
    s.client_eof()
    assert take(s.to_upstream) == b"use jobs\r\nput 0 0 1 1\r\nx\r\n"  # the partial put dropped
    assert decisions(s) == (False, True)
    assert s.upstream_closed("upstream closed") == ("client closed", "client")


def test_client_eof_during_a_lookup_half_closes_after_its_reply() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\n")
    assert take(s.to_upstream) == b"stats-job 42\r\n"
    assert decisions(s) == (False, False)  # held: the lookup decides what follows
    s.client_eof()
    assert decisions(s) == (False, False)  # not yet: the lookup's reply must still come
    assert s.upstream_closed("connection reset") is None  # lost, not the end of a drain
    body = b"---\nid: 42\ntube: jobs\nstate: ready\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_upstream) == b"peek 42\r\n"
    assert decisions(s) == (False, True)


def test_quit_during_a_lookup_is_run_after_it() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\nquit\r\n")
    assert take(s.to_upstream) == b"stats-job 42\r\n"
    s.client_eof()
    body = b"---\nid: 42\ntube: jobs\nstate: ready\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_upstream) == b"peek 42\r\nquit\r\n"
    # the EOF came before the quit ran: upstream is half-closed at once
    assert (s.drain_cause, decisions(s)) == (DrainCause.QUIT, (False, True))
    assert s.upstream_closed("upstream closed") == ("quit", "client")


def test_protocol_error_half_closes_without_waiting_for_the_client() -> None:
    s = session()
    s.feed_client(b"put 0 0 1 +1\r\n")
    assert decisions(s) == (False, True)
    reason, by = s.upstream_closed("upstream closed") or ("", "")
    assert "malformed put" in reason and by == "proxy"


def test_relay_drain_half_closes_at_once_and_is_logged_as_the_proxy() -> None:
    s = session()
    s.feed_client(b"list-tubes\r\n")
    assert decisions(s) == (True, False)
    assert s.upstream_closed("upstream closed") is None
    s.stop("idle timeout")
    assert decisions(s) == (False, True)
    s.feed_client(b"use jobs\r\n")  # nothing more is read or run
    assert take(s.to_upstream) == b"list-tubes\r\n"
    assert s.upstream_closed("upstream closed") == ("idle timeout", "proxy")


def test_relay_drain_during_a_lookup_half_closes_after_its_reply() -> None:
    s = session("producer")
    s.feed_client(b"peek 42\r\n")
    s.stop("proxy shutting down")
    assert decisions(s) == (False, False)
    body = b"---\nid: 42\ntube: jobs\nstate: ready\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert decisions(s) == (False, True)


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

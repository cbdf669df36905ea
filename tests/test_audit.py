"""Unit tests for the session's turn budget and the log formatters' no-duplicate rule (the
denial audit's window counter is tested in test_logsummary.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from proxy.acl import parse_acl
from proxy.logs import AUDIT_LOGGER, setup_logging
from proxy.relay import PolicyHolder
from proxy.session import TURN_BUDGET, Session

# --------------------------------------------------------------------------------------------
# The session's turn budget
# --------------------------------------------------------------------------------------------

NOBODY = {"principals": [{"name": "p", "match": {"cn": "p"}}], "rules": []}


def test_session_runs_at_most_a_budget_per_turn() -> None:
    session = Session(PolicyHolder(parse_acl(NOBODY, "<t>")), "p")
    n = TURN_BUDGET * 3 + 7
    session.feed_client(b"".join(b"use z%07d\r\n" % i for i in range(n)))
    counts = [sum(session.op_counts)]
    while session.backlog:
        session.resume()
        counts.append(sum(session.op_counts))
    assert counts == [TURN_BUDGET, 2 * TURN_BUDGET, 3 * TURN_BUDGET, n]
    assert session.yields == 3
    assert session.to_client == b"UNKNOWN_COMMAND\r\n" * n  # acl_denial_reply: compatible
    assert len(session.denials) == n


def test_session_exact_budget_leaves_no_backlog_and_partial_input_waits() -> None:
    session = Session(PolicyHolder(parse_acl(NOBODY, "<t>")), "p")
    session.feed_client(b"list-tube-used\r\n" * TURN_BUDGET)
    assert not session.backlog and session.yields == 0
    session.feed_client(b"list-tube-used\r\n" * TURN_BUDGET + b"list-tu")
    assert session.backlog  # something is buffered: the next turn finds only half a line
    session.resume()
    assert not session.backlog
    session.feed_client(b"be-used\r\n")
    assert sum(session.op_counts) == 2 * TURN_BUDGET + 1


# --------------------------------------------------------------------------------------------
# Log lines say each thing once
# --------------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def test_text_line_does_not_repeat_a_pair_the_message_shows(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("text", "info", stream=out)
    logging.getLogger(AUDIT_LOGGER).info(
        "close peer=1.2.3.4:5 in=3",
        extra={"fields": {"peer": "1.2.3.4:5", "principal": "p", "bytes_in": 3, "in": 4}},
    )
    line = out.getvalue().rstrip("\n")
    assert line.count("peer=1.2.3.4:5") == 1
    assert line.endswith("close peer=1.2.3.4:5 in=3 principal=p bytes_in=3 in=4")


def test_json_audit_record_is_written_once(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    record = {"principal": "p", "command": "use", "tube": "z1", "rule": "default deny"}
    logging.getLogger(AUDIT_LOGGER).info("denied", extra={"fields": record})
    obj = json.loads(out.getvalue())
    assert obj["message"] == "denied"
    assert {k: obj[k] for k in record} == record
    assert not any(k.startswith("field_") for k in obj)

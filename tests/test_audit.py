"""Unit tests for proxy.audit.WindowCounter (a fake clock), the session's turn budget, and
the log formatters' no-duplicate rule."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from proxy.acl import parse_acl
from proxy.audit import AUDIT_BURST, AUDIT_WINDOW, OVERFLOW, WindowCounter
from proxy.logs import AUDIT_LOGGER, setup_logging
from proxy.relay import PolicyHolder
from proxy.session import TURN_BUDGET, Session


def test_burst_then_suppressed_then_summary_at_window_end() -> None:
    c = WindowCounter(burst=3, window=1.0)
    passed = [c.hit("conn", "use" if i % 2 else "put", 10.0 + i * 0.01) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert c.suppressed("conn") == 7
    assert c.deadline() == pytest.approx(11.0)
    assert c.expired(10.99) == []  # window not over yet
    (summary,) = c.expired(11.0)
    assert summary.key == "conn" and summary.total == 7
    assert summary.by_kind == {"put": 3, "use": 4}  # i = 4,6,8 put; 3,5,7,9 use
    assert summary.start == 10.0 and summary.end == 11.0
    assert len(c) == 0 and c.deadline() is None
    # a new window lets a new burst through
    assert [c.hit("conn", "use", 11.5) for _ in range(4)] == [True, True, True, False]


def test_window_without_suppression_reports_nothing() -> None:
    c = WindowCounter(burst=5, window=1.0)
    assert all(c.hit("a", "use", 0.0) for _ in range(5))
    assert c.deadline() is None
    assert c.expired(5.0) == []
    assert len(c) == 0  # forgotten all the same


def test_pop_flushes_an_open_window() -> None:
    c = WindowCounter(burst=1, window=1.0)
    assert c.hit("a", "use", 0.0)
    assert not c.hit("a", "watch", 0.2)
    summary = c.pop("a", 0.5)
    assert summary is not None and summary.total == 1 and summary.by_kind == {"watch": 1}
    assert summary.end == 0.5
    assert c.pop("a", 0.6) is None
    assert c.expired(10.0) == []  # reported once only


def test_late_hit_keeps_the_ended_windows_summary() -> None:
    c = WindowCounter(burst=1, window=1.0)
    c.hit("a", "use", 0.0)
    c.hit("a", "use", 0.5)
    assert c.hit("a", "use", 3.0)  # a new window: logged; the old one's summary waits
    assert c.deadline() == pytest.approx(1.0)
    (summary,) = c.expired(3.0)
    assert summary.total == 1 and summary.end == 1.0


def test_keys_are_independent_and_bounded() -> None:
    c = WindowCounter(burst=1, window=1.0, max_keys=2)
    assert c.hit("a", "x", 0.0) and c.hit("b", "x", 0.0)
    assert c.hit("c", "x", 0.0)  # a third key: counted under OVERFLOW
    assert not c.hit("d", "x", 0.0)
    assert c.suppressed(OVERFLOW) == 1 and len(c) == 3
    assert not c.hit("a", "x", 0.1)
    keys = {s.key for s in c.expired(1.0)}
    assert keys == {"a", OVERFLOW}


def test_zero_burst_and_bad_arguments() -> None:
    c = WindowCounter(burst=0)
    assert not c.hit("a", "x", 0.0)
    for bad in ({"burst": -1}, {"window": 0.0}, {"max_keys": 0}):
        with pytest.raises(ValueError):
            WindowCounter(**bad)  # type: ignore[arg-type]


def test_defaults_are_documented_values() -> None:
    c = WindowCounter()
    assert (c.burst, c.window) == (AUDIT_BURST, AUDIT_WINDOW) == (20, 1.0)


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

"""Unit tests for proxy.logsummary.WindowCounter (a fake clock): the keyed window counter behind
the summarised denial audit (per connection) and refusal/handshake-failure lines (per source)."""

from __future__ import annotations

import pytest

from proxy.logsummary import AUDIT_BURST, AUDIT_WINDOW, OVERFLOW, WindowCounter


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
    assert c.expired(20.0) == []  # reported once
    # a new window lets a new burst through
    assert [c.hit("conn", "use", 11.5) for _ in range(4)] == [True, True, True, False]


def test_window_without_suppression_reports_nothing() -> None:
    c = WindowCounter(burst=5, window=1.0)
    for i in range(5):
        assert c.hit("a", "use", i * 0.1)
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


def test_a_new_window_lets_events_through_again_and_keeps_the_old_summary() -> None:
    c = WindowCounter(burst=1, window=10.0)
    assert c.hit("a", "x", 0.0)
    assert not c.hit("a", "x", 5.0)
    assert c.hit("a", "x", 12.0)  # new window: the old one ended with one suppressed
    assert c.deadline() == pytest.approx(10.0)  # the old one's summary waits
    assert not c.hit("a", "y", 13.0)
    (first,) = c.expired(14.0)
    assert (first.start, first.end, first.total, first.by_kind) == (0.0, 10.0, 1, {"x": 1})
    (second,) = c.expired(22.0)
    assert (second.start, second.total, second.by_kind) == (12.0, 1, {"y": 1})


def test_keys_are_independent() -> None:
    c = WindowCounter(burst=1, window=10.0)
    assert c.hit("a", "x", 0.0)
    assert not c.hit("a", "x", 0.0)
    assert c.hit("b", "x", 0.0)  # another source is not affected by a's burst
    assert [s.key for s in c.expired(10.0)] == ["a"]


def test_the_key_table_is_bounded() -> None:
    c = WindowCounter(burst=1, window=10.0, max_keys=3)
    for key in ("a", "b", "c"):
        assert c.hit(key, "x", 0.0)
    # full: a fourth key is counted under the overflow key (one slot is kept for it)
    assert c.hit("d", "x", 1.0)
    assert not c.hit("e", "x", 1.0)
    assert c.suppressed(OVERFLOW) == 1 and len(c) == 4
    assert not c.hit("a", "x", 1.5)  # a key already tracked keeps its own window
    summaries = c.expired(11.0)
    assert [(s.key, s.total) for s in summaries] == [("a", 1), (OVERFLOW, 1)]
    # ended windows make room again
    assert c.hit("f", "x", 11.0)
    assert len(c) == 1


def test_zero_burst_suppresses_everything() -> None:
    c = WindowCounter(burst=0, window=1.0)
    assert not c.hit("a", "x", 0.0)
    (s,) = c.expired(1.0)
    assert s.total == 1


@pytest.mark.parametrize(("burst", "window", "max_keys"), [(-1, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)])
def test_rejects_bad_parameters(burst: int, window: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        WindowCounter(burst, window, max_keys)


def test_defaults_are_documented_values() -> None:
    c = WindowCounter()
    assert (c.burst, c.window) == (AUDIT_BURST, AUDIT_WINDOW) == (20, 1.0)

"""Unit tests for proxy.logsummary: the keyed window counter behind summarised log lines."""

from __future__ import annotations

import pytest

from proxy.logsummary import OVERFLOW_KEY, KeyedWindowCounter


def test_lets_limit_events_through_then_counts_the_rest_by_label() -> None:
    c = KeyedWindowCounter(limit=3, window=10.0)
    assert [c.admit("10.0.0.1", "timeout", 0.0) for _ in range(3)] == [True] * 3
    assert not c.admit("10.0.0.1", "timeout", 1.0)
    assert not c.admit("10.0.0.1", "no_principal", 2.0)
    assert not c.admit("10.0.0.1", "timeout", 3.0)
    assert c.pending()
    assert c.due(9.9) == []  # the window has not ended yet
    (s,) = c.due(10.0)
    assert (s.key, s.start, s.count) == ("10.0.0.1", 0.0, 3)
    assert s.by_label == {"timeout": 2, "no_principal": 1}
    assert c.due(20.0) == []  # reported once
    assert not c.pending()


def test_keys_are_independent() -> None:
    c = KeyedWindowCounter(limit=1, window=10.0)
    assert c.admit("a", "x", 0.0)
    assert not c.admit("a", "x", 0.0)
    assert c.admit("b", "x", 0.0)  # another source is not affected by a's burst
    assert [s.key for s in c.due(10.0)] == ["a"]


def test_a_new_window_lets_events_through_again_and_keeps_the_old_summary() -> None:
    c = KeyedWindowCounter(limit=1, window=10.0)
    assert c.admit("a", "x", 0.0)
    assert not c.admit("a", "x", 5.0)
    assert c.admit("a", "x", 12.0)  # new window: the old one ended with one suppressed
    assert not c.admit("a", "y", 13.0)
    (first,) = c.due(14.0)
    assert (first.start, first.count, first.by_label) == (0.0, 1, {"x": 1})
    (second,) = c.due(22.0)
    assert (second.start, second.count, second.by_label) == (12.0, 1, {"y": 1})


def test_windows_without_suppressed_events_report_nothing() -> None:
    c = KeyedWindowCounter(limit=5, window=1.0)
    for i in range(5):
        assert c.admit("a", "x", i * 0.1)
    assert not c.pending()
    assert c.due(100.0) == []
    assert len(c) == 0  # ended windows are forgotten


def test_the_key_table_is_bounded() -> None:
    c = KeyedWindowCounter(limit=1, window=10.0, max_keys=3)
    for key in ("a", "b", "c"):
        assert c.admit(key, "x", 0.0)
    # full: a fourth source is counted under the overflow key (one slot is kept for it)
    assert c.admit("d", "x", 1.0)
    assert not c.admit("e", "x", 1.0)
    assert len(c) <= 4
    summaries = c.due(11.0)
    assert [(s.key, s.count) for s in summaries] == [(OVERFLOW_KEY, 1)]
    # ended windows make room again
    assert c.admit("f", "x", 11.0)
    assert len(c) == 1


def test_limit_zero_suppresses_everything() -> None:
    c = KeyedWindowCounter(limit=0, window=1.0)
    assert not c.admit("a", "x", 0.0)
    (s,) = c.due(1.0)
    assert s.count == 1


@pytest.mark.parametrize(("limit", "window", "max_keys"), [(-1, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)])
def test_rejects_bad_parameters(limit: int, window: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        KeyedWindowCounter(limit, window, max_keys)

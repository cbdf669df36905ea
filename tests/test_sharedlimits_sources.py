"""``proxy.sharedlimits``: the per-source handshake counts the workers of ``serve --workers N``
share. A source is capped over all workers' columns, a slot whose total is 0 is taken over by
another address, a dead worker's column is reclaimed, a key is never counted in two slots, and
when no slot near its key is free an address is capped per worker (never counted in another
address's slot: a crowded table must not get other addresses refused). Workers are simulated in
one process by attaching to different columns, and two forked processes admit at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from forked import admitted_at_once
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sharedlimits import (
    MIN_SOURCE_SLOTS,
    SOURCE_PROBE,
    SharedCounts,
    source_slots_for,
)


def _counts(tmp: Path, workers: int = 2, source_slots: int = 64) -> SharedCounts:
    counts = SharedCounts(str(tmp / "counts"), workers, slots=8, source_slots=source_slots)
    counts.attach(0)
    return counts


def _home(c: SharedCounts, source: str) -> int:
    """The slot ``source``'s key points at."""
    return c._source_key(source) % c.source_slots


def _addresses_at(c: SharedCounts, slot: int, n: int) -> list[str]:
    """``n`` IPv6 addresses whose key points at ``slot``."""
    found = []
    for i in range(1, 1 << 20):
        address = f"2001:db8::{i:x}"
        if _home(c, address) == slot:
            found.append(address)
            if len(found) == n:
                return found
    raise AssertionError("no such addresses")


def test_a_source_is_capped_over_every_workers_column(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    assert c.try_add_source("192.0.2.1", 3)
    assert c.try_add_source("192.0.2.1", 3)
    c.attach(1)
    assert c.try_add_source("192.0.2.1", 3)
    assert not c.try_add_source("192.0.2.1", 3)  # 2 in worker 0, 1 here
    c.attach(0)
    assert not c.try_add_source("192.0.2.1", 3)
    assert c.try_add_source("192.0.2.2", 3)  # another address has its own count
    assert c.try_add_source("2001:db8::1", 3)
    assert (c.source_total("192.0.2.1"), c.source_total("192.0.2.2")) == (3, 1)
    assert c.source_total("192.0.2.9") == 0


def test_a_release_decrements_only_its_own_workers_cell(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    assert c.try_add_source("192.0.2.1", 2)
    c.attach(1)
    assert c.try_add_source("192.0.2.1", 2)
    c.remove_source("192.0.2.1")
    c.remove_source("192.0.2.1")  # worker 1 counted it once: the second does nothing
    c.remove_source("192.0.2.7")  # never counted: nothing to release
    assert c.source_total("192.0.2.1") == 1
    assert c.try_add_source("192.0.2.1", 2)
    assert not c.try_add_source("192.0.2.1", 2)


def test_no_cap_still_counts_so_that_a_later_cap_sees_them(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    for _ in range(5):
        assert c.try_add_source("192.0.2.1", None)
    c.attach(1)
    assert not c.try_add_source("192.0.2.1", 5)
    assert c.source_total("192.0.2.1") == 5


def test_a_lingering_socket_keeps_counting_past_the_cap(tmp_path: Path) -> None:
    # A pending handshake fails and its socket lingers: counted once more, then the pending
    # one is released; the source stays at its count, and the cap still holds.
    c = _counts(tmp_path)
    assert c.try_add_source("192.0.2.1", 1)
    c.add_source("192.0.2.1")
    c.remove_source("192.0.2.1")
    assert c.source_total("192.0.2.1") == 1
    c.attach(1)
    assert not c.try_add_source("192.0.2.1", 1)
    c.add_source("192.0.2.2")  # not counted by this worker yet: counted all the same
    assert c.source_total("192.0.2.2") == 1
    c.attach(0)
    c.remove_source("192.0.2.1")  # the lingering socket closes
    assert c.source_total("192.0.2.1") == 0


def test_a_slot_whose_total_is_zero_is_taken_over(tmp_path: Path) -> None:
    c = _counts(tmp_path, source_slots=1)  # one slot: every address points at it
    assert c.try_add_source("192.0.2.1", 5)
    c.attach(1)
    assert c.try_add_source("192.0.2.1", 5)
    c.remove_source("192.0.2.1")
    c.attach(0)
    c.remove_source("192.0.2.1")  # total 0: the slot is free
    assert c.try_add_source("192.0.2.2", 1)
    assert c.source_total("192.0.2.2") == 1
    assert c.source_total("192.0.2.1") == 0  # its key is gone from the table
    assert not c.try_add_source("192.0.2.2", 1)  # counted in the slot, not by itself


def test_a_key_is_never_counted_in_two_slots(tmp_path: Path) -> None:
    c = _counts(tmp_path, source_slots=4)
    first, second = _addresses_at(c, 0, 2)
    assert c.try_add_source(first, 2)  # slot 0
    assert c.try_add_source(second, 2)  # slot 0 is held: slot 1
    c.remove_source(first)  # slot 0 is free now
    c.attach(1)  # a worker that never counted `second` finds its slot, not the free one
    assert c.try_add_source(second, 2)
    assert not c.try_add_source(second, 2)
    assert c.source_total(second) == 2


def test_reclaim_frees_the_dead_workers_sources(tmp_path: Path) -> None:
    c = _counts(tmp_path, source_slots=1)
    c.attach(1)
    for _ in range(3):
        assert c.try_add_source("192.0.2.1", 3)
    c.attach(0)
    assert not c.try_add_source("192.0.2.1", 3)
    assert c.try_add_source("192.0.2.2", 3)  # no free slot: counted by worker 0 alone
    c.remove_source("192.0.2.2")
    c.reclaim(1)
    assert c.source_total("192.0.2.1") == 0
    assert c.try_add_source("192.0.2.2", 1)  # the reclaimed slot is taken over
    assert c.source_total("192.0.2.2") == 1
    c.attach(1)  # the replacement starts from zero
    assert not c.try_add_source("192.0.2.2", 1)
    assert c.try_add_source("192.0.2.1", 3)  # counted by worker 1 alone, its slot taken


def test_a_crowded_table_caps_an_address_per_worker_never_in_anothers_slot(
    tmp_path: Path,
) -> None:
    c = _counts(tmp_path, source_slots=SOURCE_PROBE * 2)
    crowd = _addresses_at(c, 0, SOURCE_PROBE)
    for address in crowd:  # slots 0 to SOURCE_PROBE - 1, each held by one handshake
        assert c.try_add_source(address, 2)
    victim = _addresses_at(c, 0, SOURCE_PROBE + 1)[-1]
    # Every slot it may use is held: worker 0 counts it alone, up to the cap ...
    assert c.try_add_source(victim, 2)
    assert c.try_add_source(victim, 2)
    assert not c.try_add_source(victim, 2)
    # ... and so may worker 1 (the per-worker rule: up to N x cap over the proxy).
    c.attach(1)
    assert c.try_add_source(victim, 2)
    assert c.try_add_source(victim, 2)
    assert not c.try_add_source(victim, 2)
    # Nobody's slot counted it: the crowd keeps its own counts, and is not refused for it.
    assert [c.source_total(a) for a in crowd] == [1] * SOURCE_PROBE
    assert c.source_total(victim) == 0
    assert all(c.try_add_source(a, 2) for a in crowd)
    # Once worker 1's own count of it is 0 and a slot is free, it is counted there again.
    c.remove_source(victim)
    c.remove_source(victim)
    c.attach(0)
    for address in crowd[:2]:
        c.remove_source(address)
    c.attach(1)
    for address in crowd[:2]:
        c.remove_source(address)
    assert c.try_add_source(victim, 3)
    assert c.source_total(victim) == 1


def test_an_address_looks_at_the_probe_slots_from_its_keys_only(tmp_path: Path) -> None:
    c = _counts(tmp_path, source_slots=SOURCE_PROBE * 2)
    for address in _addresses_at(c, 0, SOURCE_PROBE):  # slots 0 .. SOURCE_PROBE - 1
        assert c.try_add_source(address, 1)
    late = _addresses_at(c, 1, 1)[0]  # its slots are 1 .. SOURCE_PROBE: the last is free
    assert c.try_add_source(late, 1)
    assert c.source_total(late) == 1
    later = _addresses_at(c, 1, 2)[1]  # 1 .. SOURCE_PROBE all held now
    assert c.try_add_source(later, 1)
    assert c.source_total(later) == 0  # counted by worker 0 alone
    # The slots past them are still free for an address that points there.
    beyond = _addresses_at(c, SOURCE_PROBE + 1, 1)[0]
    assert c.try_add_source(beyond, 1)
    assert c.source_total(beyond) == 1


def test_the_table_is_sized_from_the_handshake_budget(tmp_path: Path) -> None:
    assert source_slots_for(1) == MIN_SOURCE_SLOTS
    assert source_slots_for(1024) == 4096
    assert source_slots_for(5000) == 20000
    with pytest.raises(ValueError):
        SharedCounts(str(tmp_path / "a"), 2, source_slots=0)


def test_two_processes_admitting_one_source_at_once_never_overshoot(tmp_path: Path) -> None:
    c = SharedCounts(str(tmp_path / "counts"), 2)
    cap, tries = 300, 1000

    def admit(counts: SharedCounts) -> int:
        admitted = 0
        for i in range(tries):
            admitted += counts.try_add_source("198.51.100.7", cap)
            if counts.try_add_source(f"198.51.100.{i % 50 + 100}", None):  # churn other slots
                counts.remove_source(f"198.51.100.{i % 50 + 100}")
        return admitted

    admitted = admitted_at_once(c, admit)
    assert sum(admitted) == cap == c.source_total("198.51.100.7")
    c.close()


_SOURCES = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "2001:db8::2"]
_OP = st.tuples(
    st.integers(0, 2),  # worker
    st.sampled_from(["add", "add", "linger", "remove", "reclaim"]),
    st.sampled_from(_SOURCES),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(_OP, max_size=80), st.integers(1, 3), st.integers(1, 3))
def test_matches_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list, cap: int, slots: int
) -> None:
    workers = 3
    c = SharedCounts(
        str(tmp_path_factory.mktemp("m") / "counts"), workers, slots=2, source_slots=slots
    )
    held: list[dict[str, int]] = [{} for _ in range(workers)]  # worker -> source -> count

    def in_slot(k: int, source: str) -> bool:
        return c._mines.get(k, {}).get(source, [-1])[0] >= 0

    for worker, op, source in ops:
        c.attach(worker)
        mine = held[worker].get(source, 0)
        if op == "add":
            everywhere = sum(h.get(source, 0) for h in held)
            ok = c.try_add_source(source, cap)
            # Never stricter: refused only when the address itself has the cap somewhere.
            assert ok or everywhere >= cap
            if ok:
                held[worker][source] = mine + 1
        elif op == "linger" and mine:  # pending -> lingering: counted, then released
            c.add_source(source)
            c.remove_source(source)
        elif op == "remove" and mine:
            c.remove_source(source)
            held[worker][source] = mine - 1
        elif op == "reclaim":
            c.reclaim(worker)
            held[worker] = {}
        for s in _SOURCES:
            counted = [held[k].get(s, 0) for k in range(workers)]
            slotted = sum(n for k, n in enumerate(counted) if in_slot(k, s))
            # The slot holds exactly what the workers counting it there hold, at most the cap;
            # a worker counting it alone holds at most the cap.
            assert c.source_total(s) == slotted <= cap
            assert all(n <= cap for n in counted)
            # A worker's own record matches what it holds.
            assert all(c._mines.get(k, {}).get(s, [0, 0])[1] == counted[k] for k in range(workers))
    c.close()

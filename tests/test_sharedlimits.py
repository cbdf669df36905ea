"""``proxy.sharedlimits``: the counts the workers of ``serve --workers N`` share. Totals add
up every worker's column, admission refuses at the limit, principals are kept apart (and
share a counter only when the table is full: stricter, never looser), a dead worker's column
is reclaimed, two processes admitting at once never overshoot, and the admission lock does not
outlive a worker killed while holding it."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from forked import admitted_at_once, in_child
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sharedlimits import SharedCounts


def _counts(tmp: Path, workers: int = 2, slots: int = 64) -> SharedCounts:
    counts = SharedCounts(str(tmp / "counts"), workers, slots)
    counts.attach(0)
    return counts


def test_totals_add_up_every_workers_column(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    assert c.add_connection() == 1
    c.attach(1)
    assert c.add_connection() == 2
    assert c.add_connection() == 3
    assert c.connections() == 3
    c.remove_connection()
    assert c.connections() == 2
    c.attach(0)
    c.remove_connection()
    assert c.connections() == 1


def test_handshakes_are_refused_at_the_whole_proxy_limit(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    assert c.try_add_handshake(2)
    c.attach(1)
    assert c.try_add_handshake(2)
    assert not c.try_add_handshake(2)
    c.attach(0)
    assert not c.try_add_handshake(2)
    c.remove_handshake()
    assert c.handshakes() == 1
    assert c.try_add_handshake(2)
    assert not c.try_add_handshake(2)


def test_principals_are_counted_apart(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    assert c.try_add_principal("billing", 1)
    c.attach(1)
    assert not c.try_add_principal("billing", 1)
    assert c.try_add_principal("reports", 1)
    assert (c.principal_total("billing"), c.principal_total("reports")) == (1, 1)
    assert c.principal_total("nobody") == 0
    c.attach(0)
    c.remove_principal("billing")
    c.attach(1)
    assert c.try_add_principal("billing", 1)
    c.remove_principal("never-added")  # nothing counted, nothing to release
    assert c.principal_total("billing") == 1


def test_a_full_table_shares_counters_stricter_never_looser(tmp_path: Path) -> None:
    c = _counts(tmp_path, slots=2)
    assert c.try_add_principal("a", 5)
    assert c.try_add_principal("b", 5)
    # No slot left: "c" counts in the slot its hash points at, together with "a" or "b".
    for _ in range(4):
        assert c.try_add_principal("c", 5)
    assert not c.try_add_principal("c", 5)  # 4 of its own, 1 of its slot's owner
    assert c.principal_total("a") + c.principal_total("b") == 1 + 1 + 4


def test_reclaim_zeroes_only_the_dead_workers_column(tmp_path: Path) -> None:
    c = _counts(tmp_path)
    c.add_connection()
    assert c.try_add_handshake(10)
    assert c.try_add_principal("billing", 10)
    c.attach(1)
    for _ in range(3):
        c.add_connection()
        assert c.try_add_handshake(10)
        assert c.try_add_principal("billing", 10)
    c.reclaim(1)
    assert (c.connections(), c.handshakes(), c.principal_total("billing")) == (1, 1, 1)
    c.attach(1)  # its replacement starts from zero and finds the principal's slot again
    assert c.try_add_principal("billing", 2)
    assert not c.try_add_principal("billing", 2)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SharedCounts(str(tmp_path / "a"), 0)
    c = SharedCounts(str(tmp_path / "b"), 2)
    with pytest.raises(ValueError):
        c.attach(2)
    with pytest.raises(FileExistsError):  # never reuses (or follows) an existing file
        SharedCounts(str(tmp_path / "b"), 2)
    c.close()


def test_two_processes_admitting_at_once_never_overshoot(tmp_path: Path) -> None:
    c = SharedCounts(str(tmp_path / "counts"), 2)
    cap, tries = 500, 2000

    def admit(counts: SharedCounts) -> int:
        return sum(counts.try_add_principal("billing", cap) for _ in range(tries))

    admitted = admitted_at_once(c, admit)
    assert sum(admitted) == cap == c.principal_total("billing")


def test_the_lock_dies_with_a_worker_killed_while_holding_it(tmp_path: Path) -> None:
    c = SharedCounts(str(tmp_path / "counts"), 2)
    r, w = os.pipe()

    def hold() -> None:
        c.attach(1)
        c._lock()
        os.write(w, b"held")
        signal.pause()

    pid = in_child(hold)
    assert os.read(r, 4) == b"held"
    c.attach(0)
    blocked = threading.Thread(target=c.add_connection, daemon=True)
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the child holds the lock: admission waits
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    blocked.join(10)
    assert not blocked.is_alive()
    assert c.connections() == 1
    os.close(r)
    os.close(w)


_OP = st.tuples(
    st.integers(0, 2),  # worker
    st.sampled_from(["conn+", "conn-", "hs+", "hs-", "p+", "p-", "reclaim"]),
    st.sampled_from(["a", "b", "c"]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_OP, max_size=60), st.integers(1, 4))
def test_matches_a_model(tmp_path_factory: pytest.TempPathFactory, ops: list, cap: int) -> None:
    c = SharedCounts(str(tmp_path_factory.mktemp("m") / "counts"), 3, slots=2)
    conns = [0, 0, 0]
    hs = [0, 0, 0]
    prin: list[dict[str, int]] = [{}, {}, {}]
    slot_of: dict[str, str] = {}  # a name that shares a slot: which name's counter it uses
    for worker, op, name in ops:
        c.attach(worker)
        if op == "conn+":
            conns[worker] += 1
            assert c.add_connection() == sum(conns)
        elif op == "conn-" and conns[worker]:
            conns[worker] -= 1
            c.remove_connection()
        elif op == "hs+":
            ok = sum(hs) < cap
            assert c.try_add_handshake(cap) == ok
            hs[worker] += ok
        elif op == "hs-" and hs[worker]:
            hs[worker] -= 1
            c.remove_handshake()
        elif op == "p+":
            c.attach(worker)
            if c.try_add_principal(name, cap):
                prin[worker][name] = prin[worker].get(name, 0) + 1
            # Never looser: no name ever has more than cap across the workers.
            assert sum(p.get(name, 0) for p in prin) <= cap
        elif op == "p-" and prin[worker].get(name):
            prin[worker][name] -= 1
            c.remove_principal(name)
        elif op == "reclaim":
            c.reclaim(worker)
            conns[worker] = hs[worker] = 0
            prin[worker] = {}
        assert c.connections() == sum(conns)
        assert c.handshakes() == sum(hs)
    del slot_of
    c.close()

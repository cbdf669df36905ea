"""``proxy.deadlines.Deadlines``: one timer for many deadlines (the relay's certificate-expiry
closes). Items fire in deadline order, on asyncio and uvloop; discarded entries never fire,
drop their item at once, and the heap is compacted once they outnumber the live ones; a
``fire`` that raises does not cost the other due items their turn; ``cancel`` forgets
everything."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from conftest import LOOPS as LOOP_NAMES
from conftest import run_on

from proxy.deadlines import SLACK, Deadlines

LOOPS = pytest.mark.parametrize("loop", list(LOOP_NAMES))


class Item:
    def __init__(self, name: str) -> None:
        self.name = name


@LOOPS
def test_items_fire_in_deadline_order_and_discarded_ones_never(loop: str) -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        done = asyncio.Event()

        def fire(item: Item) -> None:
            fired.append(item.name)
            if item.name == "last":
                done.set()

        d: Deadlines[Item] = Deadlines(fire)
        d.add(Item("last"), 0.08)
        d.add(Item("second"), 0.04)
        gone = d.add(Item("gone"), 0.02)
        d.add(Item("first"), 0.01)  # earlier than the scheduled timer: rescheduled
        d.add(Item("past"), -5)  # a deadline already passed: at once
        d.discard(gone)
        d.discard(gone)  # twice: counted once
        async with asyncio.timeout(10):
            await done.wait()
        assert len(d) == 0
        return fired

    assert run_on(loop, main()) == ["past", "first", "second", "last"]


@LOOPS
def test_an_item_added_while_none_is_pending_is_scheduled(loop: str) -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        done = {name: asyncio.Event() for name in ("one", "two")}

        def fire(item: Item) -> None:
            fired.append(item.name)
            done[item.name].set()

        d: Deadlines[Item] = Deadlines(fire)
        for name in ("one", "two"):  # the second after the first fired: no timer pending
            d.add(Item(name), 0.01)
            async with asyncio.timeout(10):
                await done[name].wait()
        return fired

    assert run_on(loop, main()) == ["one", "two"]


def test_discarded_items_are_compacted_away() -> None:
    async def main() -> None:
        fired: list[Item] = []
        d: Deadlines[Item] = Deadlines(fired.append)
        entries = [d.add(Item(str(i)), 3600) for i in range(1000)]
        for n, entry in enumerate(entries[:900], 1):
            d.discard(entry)
            assert len(d) <= 2 * (1000 - n) + SLACK + 1
        assert len(d) < 1000  # compacted at least once
        d.cancel()
        assert len(d) == 0 and not fired

    run_on("asyncio", main())


def test_cancel_forgets_every_deadline() -> None:
    async def main() -> list[Item]:
        fired: list[Item] = []
        d: Deadlines[Item] = Deadlines(fired.append)
        d.add(Item("a"), 0.01)
        d.cancel()
        marker = Deadlines[Item](lambda item: done.set())
        done = asyncio.Event()
        marker.add(Item("later"), 0.05)  # fires after "a" would have
        async with asyncio.timeout(10):
            await done.wait()
        return fired

    assert run_on("asyncio", main()) == []


def test_a_discarded_entry_drops_its_item_at_once() -> None:
    """The heap keeps no reference to a discarded item (a closed connection, its transports
    and session) until its deadline or a compaction."""

    async def main() -> None:
        d: Deadlines[Item] = Deadlines(lambda item: None)
        d.add(Item("kept"), 3600)
        item = Item("closed")
        ref = weakref.ref(item)
        entry = d.add(item, 3600)
        del item
        gc.collect()
        assert ref() is not None  # held by the schedule while it matters
        d.discard(entry)
        gc.collect()
        assert ref() is None and len(d) == 2  # dropped, though its entry is still there
        d.cancel()

    run_on("asyncio", main())


@LOOPS
def test_a_fire_that_raises_does_not_cost_the_other_due_items_their_turn(loop: str) -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        done = asyncio.Event()
        errors: list[BaseException] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, ctx: errors.append(ctx["exception"])
        )

        def fire(item: Item) -> None:
            fired.append(item.name)
            if item.name == "bad":
                raise RuntimeError("close failed")
            if item.name == "c":
                done.set()

        d: Deadlines[Item] = Deadlines(fire)
        for name in ("bad", "b", "c"):
            d.add(Item(name), -1)  # all due at the same moment
        async with asyncio.timeout(10):
            await done.wait()
        assert [str(e) for e in errors] == ["close failed"]
        assert len(d) == 0
        return fired

    assert run_on(loop, main()) == ["bad", "b", "c"]

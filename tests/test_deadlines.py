"""``proxy.deadlines.Deadlines``: one timer for many deadlines (the relay's certificate-expiry
closes). Items fire in deadline order, on asyncio and uvloop; discarded items never fire and
the heap is compacted once they outnumber the live ones; ``cancel`` forgets everything."""

from __future__ import annotations

import asyncio

import pytest
from conftest import run_on

from proxy.deadlines import SLACK, Deadlines

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.live = True


@LOOPS
def test_items_fire_in_deadline_order_and_discarded_ones_never(loop: str) -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        done = asyncio.Event()

        def fire(item: Item) -> None:
            fired.append(item.name)
            if item.name == "last":
                done.set()

        d: Deadlines[Item] = Deadlines(fire, lambda item: item.live)
        gone = Item("gone")
        d.add(Item("last"), 0.08)
        d.add(Item("second"), 0.04)
        d.add(gone, 0.02)
        d.add(Item("first"), 0.01)  # earlier than the scheduled timer: rescheduled
        d.add(Item("past"), -5)  # a deadline already passed: at once
        gone.live = False
        d.discard()
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

        d: Deadlines[Item] = Deadlines(fire, lambda item: item.live)
        for name in ("one", "two"):  # the second after the first fired: no timer pending
            d.add(Item(name), 0.01)
            async with asyncio.timeout(10):
                await done[name].wait()
        return fired

    assert run_on(loop, main()) == ["one", "two"]


def test_discarded_items_are_compacted_away() -> None:
    async def main() -> None:
        fired: list[Item] = []
        d: Deadlines[Item] = Deadlines(fired.append, lambda item: item.live)
        items = [Item(str(i)) for i in range(1000)]
        for item in items:
            d.add(item, 3600)
        for item in items[:900]:
            item.live = False
            d.discard()
            live = sum(1 for i in items if i.live)
            assert len(d) <= 2 * live + SLACK + 1
        assert len(d) < 1000  # compacted at least once
        d.cancel()
        assert len(d) == 0 and not fired

    run_on("asyncio", main())


def test_cancel_forgets_every_deadline() -> None:
    async def main() -> list[Item]:
        fired: list[Item] = []
        d: Deadlines[Item] = Deadlines(fired.append, lambda item: item.live)
        d.add(Item("a"), 0.01)
        d.cancel()
        marker = Deadlines[Item](lambda item: done.set(), lambda item: True)
        done = asyncio.Event()
        marker.add(Item("later"), 0.05)  # fires after "a" would have
        async with asyncio.timeout(10):
            await done.wait()
        return fired

    assert run_on("asyncio", main()) == []

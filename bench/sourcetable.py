#!/usr/bin/env python3
"""How often the shared source table of ``serve --workers N`` has no slot for an address.

``proxy.sharedlimits`` counts ``max_handshakes_per_source`` in ``source_slots_for(
max_handshakes)`` slots; an address whose ``SOURCE_PROBE`` slots are all held by other
addresses with handshakes pending is capped per worker instead (see that module). This fills
the real table (``SharedCounts``, one worker) with random IPv6 addresses holding one pending
handshake each, up to a given share of the slots, then admits and releases fresh random
addresses and prints the share of them that found no slot. Pending handshakes are at most
``max_handshakes`` (a quarter of the slots); lingering refused sockets may add more.

Usage: ``python bench/sourcetable.py [--max-handshakes 1024] [--tables 20] [--tries 2000]``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.sharedlimits import SOURCE_PROBE, SharedCounts, source_slots_for


def _address(rng: random.Random) -> str:
    return "2001:db8:" + ":".join(f"{rng.getrandbits(16):x}" for _ in range(6))


def no_slot_share(slots: int, load: float, tables: int, tries: int, rng: random.Random) -> float:
    missed = 0
    for _ in range(tables):
        with tempfile.TemporaryDirectory() as d:
            c = SharedCounts(os.path.join(d, "counts"), 1, slots=1, source_slots=slots)
            c.attach(0)
            for _ in range(int(slots * load)):
                c.try_add_source(_address(rng), None)
            for _ in range(tries):
                address = _address(rng)
                c.try_add_source(address, None)
                missed += c.source_total(address) == 0
                c.remove_source(address)
            c.close()
    return missed / (tables * tries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-handshakes", type=int, default=1024)
    parser.add_argument("--tables", type=int, default=20)
    parser.add_argument("--tries", type=int, default=2000)
    args = parser.parse_args()
    slots = source_slots_for(args.max_handshakes)
    rng = random.Random(1)
    print(f"source slots {slots}, probe {SOURCE_PROBE}, {args.tables} x {args.tries} addresses")
    for load in (0.25, 0.5, 0.75):
        share = no_slot_share(slots, load, args.tables, args.tries, rng)
        print(f"slots held {load:4.0%}: no slot for {share:8.4%} of new addresses")
    return 0


if __name__ == "__main__":
    sys.exit(main())

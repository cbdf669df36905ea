#!/usr/bin/env python3
"""Session-only A/B of the put budget (``limits.max_buffered_bytes``): the pure ``Session``
relaying pipelined puts without and with a shared ``Budget``, no network, no event loop.

Each step feeds a batch of 200 ``put 0 0 60 100`` commands, runs the session's turns, clears
its output and, like the relay after handing ``to_upstream`` over, releases the reserved bytes.
Two principals: one allowed every put (its put lines skip the early decision without a
budget) and a producer restricted to one tube. Kinds alternate; the best time per put over
``--runs`` rounds of 10 x 50 batches is printed.

Usage: ``python bench/put_budget_ab.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.acl import Policy, parse_acl
from proxy.budget import Budget
from proxy.session import Session

PUT = b"put 0 0 60 100\r\n" + b"x" * 100 + b"\r\n"
BATCHES, REPEAT = 50, 10


@dataclass
class Holder:
    current: Policy


def stepper(holder: Holder, batch: bytes, budget: Budget | None) -> Callable[[], None]:
    s = Session(holder, "p", 65535, budget=budget)

    def step() -> None:
        s.feed_client(batch)
        while s.backlog:
            s.resume()
        s.to_upstream.clear()
        if s.queued and budget is not None:
            budget.release(s.queued)
            s.queued = 0
        s.pending.clear()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cases = [
        ("allowed every put", ["*"], PUT * 200),
        ("restricted producer", ["jobs"], b"use jobs\r\n" + PUT * 199),
    ]
    for label, tubes, batch in cases:
        acl = {
            "principals": [{"name": "p", "match": {"cn": "p"}}],
            "rules": [{"principal": "p", "tubes": tubes, "allow": ["produce"]}],
        }
        holder = Holder(parse_acl(acl, "<bench>"))
        best = {"without": float("inf"), "with": float("inf")}
        for _ in range(args.runs):
            for kind, budget in (("without", None), ("with", Budget(64 << 20))):
                step = stepper(holder, batch, budget)
                t = min(timeit.repeat(step, number=BATCHES, repeat=REPEAT))
                best[kind] = min(best[kind], t / (BATCHES * 200) * 1e6)
        print(
            f"{label:20s} without budget {best['without']:.3f} µs/put, "
            f"with {best['with']:.3f} µs/put ({best['with'] - best['without']:+.3f})"
        )


if __name__ == "__main__":
    main()

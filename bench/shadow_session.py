#!/usr/bin/env python3
"""The shadow policy's cost inside the session alone: no sockets, no TLS, no event loop.

A ``Session`` of the bench client under ``bench.BENCH_ACL`` is fed the same bytes with and
without a shadow (``bench.SHADOW_ACL``, which decides every command alike, so this is the
evaluation's cost and no mismatch is reported): ``puts`` feeds 64 pipelined 100-byte puts per
call and their ``INSERTED`` replies; ``cycles`` feeds put, reserve-with-timeout 0 and delete
one at a time with their replies. The two variants alternate ``--repeat`` times; the best
(lowest) time per operation of each is printed, which is the figure least disturbed by other
load on the machine.

Usage: ``python bench/shadow_session.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import BENCH_ACL, CLIENT_CN, SHADOW_ACL
from proxy.acl import parse_acl
from proxy.relay import PolicyHolder
from proxy.session import Session
from proxy.shadow import Mismatch, ShadowView


class _Sink:
    def mismatch(self, record: Mismatch) -> None:
        raise AssertionError(f"the bench shadow must agree: {record}")

    def unknown(self, principal: str, command: str) -> None:
        pass


def _session(shadow: bool) -> Session:
    holder = PolicyHolder(parse_acl(yaml.safe_load(BENCH_ACL), "bench-acl"))
    s = Session(holder, CLIENT_CN)
    if shadow:
        policy = parse_acl(yaml.safe_load(SHADOW_ACL), "bench-shadow")
        s.set_shadow(ShadowView(policy, CLIENT_CN, holder, _Sink()))
    return s


def puts(shadow: bool, batches: int = 200) -> float:
    """Microseconds per pipelined put."""
    s = _session(shadow)
    batch = (b"put 0 0 60 100\r\n" + b"x" * 100 + b"\r\n") * 64
    replies = b"".join(b"INSERTED %d\r\n" % i for i in range(1, 65))
    t = time.perf_counter()
    for _ in range(batches):
        s.feed_client(batch)
        s.feed_upstream(replies)
        s.to_upstream.clear()
        s.to_client.clear()
    return (time.perf_counter() - t) / (batches * 64) * 1e6


def cycles(shadow: bool, n: int = 4000) -> float:
    """Microseconds per put + reserve-with-timeout 0 + delete."""
    s = _session(shadow)
    t = time.perf_counter()
    for i in range(1, n + 1):
        s.feed_client(b"put 0 0 60 5\r\nhello\r\n")
        s.feed_upstream(b"INSERTED %d\r\n" % i)
        s.feed_client(b"reserve-with-timeout 0\r\n")
        s.feed_upstream(b"RESERVED %d 5\r\nhello\r\n" % i)
        s.feed_client(b"delete %d\r\n" % i)
        s.feed_upstream(b"DELETED\r\n")
        s.to_upstream.clear()
        s.to_client.clear()
    return (time.perf_counter() - t) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20, help="alternations (default 20)")
    args = ap.parse_args()
    for name, work in (("puts", puts), ("cycles", cycles)):
        plain, shadowed = [], []
        for _ in range(args.repeat):
            plain.append(work(False))
            shadowed.append(work(True))
        a, b = min(plain), min(shadowed)
        print(f"{name:7} without shadow {a:7.2f} us/op  with shadow {b:7.2f} us/op  (+{b - a:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

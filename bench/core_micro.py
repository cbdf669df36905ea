"""Micro-benchmark of the pure core: ``ClientParser`` and ``Session`` without sockets.

Feeds pipelined ``put``/``reserve-with-timeout 0``/``delete`` lines (16-byte bodies) through
the parser alone and through a ``Session`` with the upstream replies beanstalkd would give,
and prints commands per second of process CPU time for each scenario (the best of
``--repeat`` runs; CPU time, not wall time, so that waiting for a core on a busy shared
machine does not count). ``admin`` may do everything (no job tracking); ``worker``
may produce and consume on one tube only, so every job id is remembered and decided by tube.
Compare two trees by running it from each, interleaved::

    python bench/core_micro.py                      # the tree it sits in
    python bench/core_micro.py --src /tmp/other     # import ``proxy`` from another checkout
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

BATCH = 256  # commands of one kind per phase (below MAX_PENDING, several TURN_BUDGETs)
BODY = b"0123456789abcdef"
CHUNK = 16384  # client bytes per feed_client call

ACL: dict[str, Any] = {
    "principals": [
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "worker", "match": {"cn": "worker"}},
    ],
    "rules": [
        {"principal": "admin", "allow": ["all"]},
        {"principal": "worker", "tubes": ["jobs"], "allow": ["produce", "consume"]},
    ],
}


def phases(first_id: int) -> list[tuple[bytes, bytes]]:
    """(client bytes, upstream replies) for one batch: puts, then reserves, then deletes."""
    ids = range(first_id, first_id + BATCH)
    put = b"put 0 0 60 %d\r\n%s\r\n" % (len(BODY), BODY)
    return [
        (put * BATCH, b"".join(b"INSERTED %d\r\n" % i for i in ids)),
        (
            b"reserve-with-timeout 0\r\n" * BATCH,
            b"".join(b"RESERVED %d %d\r\n%s\r\n" % (i, len(BODY), BODY) for i in ids),
        ),
        (b"".join(b"delete %d\r\n" % i for i in ids), b"DELETED\r\n" * BATCH),
    ]


def bench_parser(batches: int) -> float:
    from proxy.protocol import NEED_DATA, ClientParser

    data = b"".join(c for c, _ in phases(1))
    parser = ClientParser()
    n = 0
    t0 = time.process_time()
    for _ in range(batches):
        for i in range(0, len(data), CHUNK):
            parser.feed(data[i : i + CHUNK])
            while parser.next_command() is not NEED_DATA:
                n += 1
    return n / (time.process_time() - t0)


def bench_session(principal: str, batches: int) -> float:
    from proxy.acl import Policy, parse_acl
    from proxy.session import Session

    class Fixed:  # a PolicySource (the relay's PolicyHolder, without importing the relay)
        def __init__(self, policy: Policy) -> None:
            self.current = policy

    s = Session(Fixed(parse_acl(ACL, "<bench>")), principal)
    s.feed_client(b"use jobs\r\nwatch jobs\r\nignore default\r\n")
    s.feed_upstream(b"USING jobs\r\nWATCHING 2\r\nWATCHING 1\r\n")
    s.to_client.clear()
    s.to_upstream.clear()
    work = [phases(1 + b * BATCH) for b in range(batches)]
    n = 0
    t0 = time.process_time()
    for batch in work:
        for client, upstream in batch:
            for i in range(0, len(client), CHUNK):
                s.feed_client(client[i : i + CHUNK])
                while s.backlog:
                    s.resume()
            s.feed_upstream(upstream)
            s.to_upstream.clear()
            s.to_client.clear()
            n += BATCH
    elapsed = time.process_time() - t0
    if s.failed or s.denials or s.pending:
        raise SystemExit(f"bench went wrong: {s.failed} {s.denials[:1]} {len(s.pending)}")
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="checkout to import proxy from")
    ap.add_argument("--commands", type=int, default=300_000, help="commands per scenario")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (best is shown)")
    args = ap.parse_args()
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    import proxy

    batches = max(1, args.commands // (3 * BATCH))
    results = {
        "parser": max(bench_parser(batches) for _ in range(args.repeat)),
        "session-admin": max(bench_session("admin", batches) for _ in range(args.repeat)),
        "session-worker": max(bench_session("worker", batches) for _ in range(args.repeat)),
    }
    print(f"# proxy from {Path(proxy.__file__).parent}, {batches * 3 * BATCH} commands")
    for name, ops in results.items():
        print(f"{name:16} {ops:12,.0f} ops/s")


if __name__ == "__main__":
    main()

"""The optional per-principal command rate: the pure token bucket (explicit clock values), the
ACL's ``rate`` key and its errors, the session answering ``RATE_LIMITED`` in order without
running the command, and the relay sharing one bucket per principal across connections and
following reloads, against a real beanstalkd over real TLS."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    PKI,
    TEST_ACL,
    Beanstalkd,
    Client,
    RunningProxy,
    server_stats,
    serving,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.acl import Policy, parse_acl
from proxy.errors import ConfigError
from proxy.protocol import NAMES, OP_PUT
from proxy.ratelimit import TokenBucket, worker_share
from proxy.session import Session

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# TokenBucket
# --------------------------------------------------------------------------------------------


def takes(bucket: TokenBucket, now: float, n: int) -> list[bool]:
    return [bucket.take(now) for _ in range(n)]


def test_bucket_starts_full_and_holds_burst_tokens() -> None:
    b = TokenBucket(1.0, 3, now=100.0)
    assert (b.rate, b.burst) == (1.0, 3)
    assert takes(b, 100.0, 4) == [True, True, True, False]


def test_bucket_refills_rate_tokens_per_second() -> None:
    b = TokenBucket(2.0, 2, now=0.0)
    assert takes(b, 0.0, 3) == [True, True, False]
    assert not b.take(0.25)  # half a token
    assert b.take(0.5)  # the other half arrived: one whole token
    assert not b.take(0.5)
    assert takes(b, 1.5, 3) == [True, True, False]  # two tokens in one second


def test_bucket_never_saves_more_than_burst() -> None:
    b = TokenBucket(10.0, 3, now=0.0)
    assert takes(b, 0.0, 3) == [True] * 3
    assert takes(b, 1000.0, 5) == [True, True, True, False, False]


def test_fractional_rate() -> None:
    b = TokenBucket(0.1, 1, now=0.0)  # one command per ten seconds
    assert b.take(0.0)
    assert not b.take(5.0)
    assert not b.take(9.99)
    assert b.take(10.0)
    assert not b.take(10.0)


def test_fractional_rate_in_many_small_steps_gives_the_token_when_due() -> None:
    b = TokenBucket(0.1, 1, now=0.0)
    assert b.take(0.0)
    steps = [round(0.1 * i, 1) for i in range(1, 101)]  # 0.1 .. 10.0; the sum drifts in floats
    got = [b.take(t) for t in steps]
    assert got == [False] * 99 + [True]


def test_clock_going_backwards_refills_nothing() -> None:
    b = TokenBucket(1.0, 1, now=50.0)
    assert b.take(50.0)
    assert not b.take(10.0)
    assert not b.take(50.5)
    assert b.take(51.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)]
)
def test_bucket_rejects_invalid_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)


# --------------------------------------------------------------------------------------------
# The ACL's `rate` key
# --------------------------------------------------------------------------------------------


def acl_with_rate(rate: object) -> dict[str, Any]:
    return {
        "principals": [
            {"name": "free", "match": {"cn": "free"}},
            {"name": "metered", "match": {"cn": "metered"}, "rate": rate},
        ],
        "rules": [{"principal": "*", "allow": ["all"]}],
    }


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        ({"per_second": 5, "burst": 20}, (5.0, 20)),
        ({"per_second": 0.5, "burst": 4}, (0.5, 4)),
        ({"per_second": 10}, (10.0, 10)),  # default burst: ceil(per_second) ...
        ({"per_second": 2.5}, (2.5, 3)),
        ({"per_second": 0.001}, (0.001, 1)),  # ... and at least 1
    ],
)
def test_rate_for(rate: dict[str, Any], expected: tuple[float, int]) -> None:
    policy = parse_acl(acl_with_rate(rate), "acl.yaml")
    assert policy.rate_for("metered") == expected
    assert policy.rate_for("free") is None
    assert policy.rate_for("nobody") is None


@pytest.mark.parametrize(
    ("rate", "key", "reason"),
    [
        (5, "principals[1].rate", "expected a mapping, got an integer"),
        (None, "principals[1].rate", "expected a mapping, got null"),
        ({}, "principals[1].rate.per_second", "missing required key"),
        ({"burst": 3}, "principals[1].rate.per_second", "missing required key"),
        ({"per_second": 0}, "principals[1].rate.per_second", "expected a number > 0"),
        ({"per_second": -2.5}, "principals[1].rate.per_second", "expected a number > 0"),
        ({"per_second": math.inf}, "principals[1].rate.per_second", "expected a number > 0"),
        ({"per_second": math.nan}, "principals[1].rate.per_second", "expected a number > 0"),
        ({"per_second": 1e10}, "principals[1].rate.per_second", "at most 1000000000"),
        ({"per_second": True}, "principals[1].rate.per_second", "got a boolean"),
        ({"per_second": "fast"}, "principals[1].rate.per_second", "got a string"),
        ({"per_second": "1e3"}, "principals[1].rate.per_second", "write 1000 or 1.0e+3"),
        ({"per_second": "1.0e3"}, "principals[1].rate.per_second", "write 1000 or 1.0e+3"),
        ({"per_second": 1, "burst": 0}, "principals[1].rate.burst", "out of range [1, "),
        ({"per_second": 1, "burst": 1.5}, "principals[1].rate.burst", "expected an integer"),
        ({"per_second": 1, "brust": 2}, "principals[1].rate.brust", "did you mean 'burst'?"),
    ],
)
def test_rate_errors_name_the_key_path(rate: object, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_acl(acl_with_rate(rate), "acl.yaml")
    assert info.value.source == "acl.yaml"
    assert info.value.key == key
    assert reason in info.value.reason


def test_unknown_principal_key_lists_rate() -> None:
    doc = acl_with_rate({"per_second": 1})
    doc["principals"][0]["rates"] = {"per_second": 1}
    with pytest.raises(ConfigError) as info:
        parse_acl(doc, "acl.yaml")
    assert info.value.key == "principals[0].rates"
    assert "did you mean 'rate'?" in info.value.reason
    assert "name, match, rate" in info.value.reason


def test_yaml_float_forms_load() -> None:
    doc = yaml.safe_load(
        """
principals:
  - name: a
    match: {cn: a}
    rate: {per_second: 1.0e+3, burst: 50}
  - name: b
    match: {cn: b}
    rate: {per_second: .5}
rules: []
"""
    )
    policy = parse_acl(doc, "acl.yaml")
    assert policy.rate_for("a") == (1000.0, 50)
    assert policy.rate_for("b") == (0.5, 1)


def test_example_acl_uses_rate() -> None:
    path = ROOT / "config" / "acl.example.yaml"
    policy = parse_acl(yaml.safe_load(path.read_text()), str(path))
    assert policy.rate_for("batch-hosts") == (200.0, 500)
    assert policy.rate_for("ops") is None


# --------------------------------------------------------------------------------------------
# Session (pure, no sockets)
# --------------------------------------------------------------------------------------------

SESSION_ACL = {
    "principals": [
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "producer", "match": {"cn": "producer"}},
    ],
    "rules": [
        {"principal": "admin", "allow": ["all"]},
        {"principal": "producer", "tubes": ["jobs"], "allow": ["produce", "inspect"]},
    ],
}


@dataclass
class Holder:
    current: Policy


class FakeLimiter:
    """Answers from a script (then ``default``) and counts the calls."""

    def __init__(self, answers: Iterable[bool] = (), default: bool = False) -> None:
        self.answers = list(answers)
        self.default = default
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.answers.pop(0) if self.answers else self.default


def session(principal: str = "admin", limiter: Callable[[], bool] | None = None) -> Session:
    s = Session(
        Holder(parse_acl(SESSION_ACL, "<test>")),
        principal,
        max_job_size=100,
        denial_reply="explicit",
    )
    s.limiter = limiter
    return s


def take(buf: bytearray) -> bytes:
    data = bytes(buf)
    buf.clear()
    return data


def test_rate_limited_reply_waits_its_turn_and_the_command_never_runs() -> None:
    limiter = FakeLimiter([True, False, True])
    s = session(limiter=limiter)
    s.feed_client(b"use jobs\r\nput 0 0 1 5\r\nhello\r\nlist-tube-used\r\nquit\r\n")
    # the put is not forwarded; quit never asks the limiter and still works
    assert take(s.to_upstream) == b"use jobs\r\nlist-tube-used\r\nquit\r\n"
    assert limiter.calls == 3
    assert take(s.to_client) == b""  # RATE_LIMITED must wait for USING
    s.feed_upstream(b"USING jobs\r\n")
    assert take(s.to_client) == b"USING jobs\r\nRATE_LIMITED\r\n"
    s.feed_upstream(b"USING jobs\r\n")
    assert take(s.to_client) == b"USING jobs\r\n"
    assert s.rate_limited == 1
    assert s.draining and s.close_reason == "quit"
    # counted as rate limited, not as a command the proxy ran, and never audited
    assert s.op_counts[OP_PUT] == 0
    assert s.op_counts[NAMES.index("use")] == 1
    assert s.denials == []


def test_rate_limited_put_body_is_consumed_not_run_as_commands() -> None:
    s = session(limiter=FakeLimiter(default=False))
    s.feed_client(b"put 0 0 1 12\r\nuse victim\r\n\r\n")
    assert take(s.to_upstream) == b""
    assert take(s.to_client) == b"RATE_LIMITED\r\n"
    s.feed_client(b"quit\r\n")
    assert take(s.to_upstream) == b"quit\r\n"
    assert s.draining
    assert s.rate_limited == 1


def test_proxy_error_replies_are_not_rate_limited() -> None:
    limiter = FakeLimiter(default=False)
    s = session(limiter=limiter)
    s.feed_client(b"bogus\r\nuse  two-spaces\r\nput 0 0 1 101\r\n" + b"x" * 101 + b"\r\n")
    assert take(s.to_client) == b"UNKNOWN_COMMAND\r\nBAD_FORMAT\r\nJOB_TOO_BIG\r\n"
    assert limiter.calls == 0
    assert s.rate_limited == 0


def test_rate_limited_behind_a_lookup_is_decided_when_the_command_is_read() -> None:
    limiter = FakeLimiter([True, False])
    s = session("producer", limiter)
    s.feed_client(b"peek 42\r\nlist-tube-used\r\n")
    assert take(s.to_upstream) == b"stats-job 42\r\n"
    assert s.blocked and limiter.calls == 1  # the held command is not read yet
    body = b"---\nid: 42\ntube: other\nstate: ready\n"
    s.feed_upstream(b"OK %d\r\n%s\r\n" % (len(body), body))
    assert take(s.to_client) == b"NOT_FOUND\r\nRATE_LIMITED\r\n"
    assert take(s.to_upstream) == b""
    assert limiter.calls == 2


def test_removing_the_limiter_lets_the_next_command_through() -> None:
    s = session(limiter=FakeLimiter(default=False))
    s.feed_client(b"list-tube-used\r\n")
    assert take(s.to_client) == b"RATE_LIMITED\r\n"
    s.limiter = None
    s.feed_client(b"list-tube-used\r\n")
    assert take(s.to_upstream) == b"list-tube-used\r\n"


def test_session_with_a_real_bucket() -> None:
    clock = [0.0]
    bucket = TokenBucket(1.0, 2, now=clock[0])
    s = session(limiter=lambda: bucket.take(clock[0]))
    s.feed_client(b"list-tube-used\r\n" * 3)
    assert take(s.to_upstream) == b"list-tube-used\r\n" * 2
    clock[0] = 1.0
    s.feed_client(b"list-tube-used\r\n" * 2)
    assert take(s.to_upstream) == b"list-tube-used\r\n"
    s.feed_upstream(b"USING default\r\n" * 3)
    assert take(s.to_client) == (
        b"USING default\r\n" * 2 + b"RATE_LIMITED\r\nUSING default\r\nRATE_LIMITED\r\n"
    )
    assert s.rate_limited == 2


# --------------------------------------------------------------------------------------------
# Relay: real beanstalkd, real TLS
# --------------------------------------------------------------------------------------------

LTU = b"list-tube-used\r\n"


def rated_acl(rate: dict[str, Any] | None, billing_name: str = "billing") -> dict[str, Any]:
    """TEST_ACL with ``rate`` on billing (``None``: no rate), optionally renaming billing."""
    doc = copy.deepcopy(TEST_ACL)
    for p in doc["principals"]:
        if p["name"] == "billing":
            p["name"] = billing_name
            if rate is not None:
                p["rate"] = rate
    for r in doc["rules"]:
        if r["principal"] == "billing":
            r["principal"] = billing_name
    return doc


async def replies(client: Client, n: int) -> list[bytes]:
    return [(await client.reply())[0] for _ in range(n)]


def rate_limited_metric(proxy: RunningProxy) -> dict[str, float]:
    text = generate_latest(proxy.server.metrics.registry).decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "beanstalk_proxy_rate_limited_total":
                out[s.labels["principal"]] = s.value
    return out


async def cmd_count(beanstalkd: Beanstalkd, name: str) -> int:
    return int((await server_stats(beanstalkd.port))[name])


async def test_rate_limit_through_the_relay(pki: PKI, beanstalkd: Beanstalkd) -> None:
    slow = {"per_second": 0.001, "burst": 3}  # a token per 1000 s: no refill during the test
    async with serving(pki, beanstalkd.port, acl=rated_acl(slow)) as proxy:
        billing = await proxy.connect("billing")
        await billing.send(LTU * 5)
        assert await replies(billing, 5) == [b"USING default"] * 3 + [b"RATE_LIMITED"] * 2
        assert await cmd_count(beanstalkd, "cmd-list-tube-used") == 3
        assert rate_limited_metric(proxy) == {"billing": 2}

        # The connection stays open (and limited); a put's body is consumed, never run.
        await billing.send(b"put 0 0 60 12\r\nuse victim\r\n\r\n" + LTU)
        assert await replies(billing, 2) == [b"RATE_LIMITED"] * 2
        assert await cmd_count(beanstalkd, "cmd-put") == 0
        assert await cmd_count(beanstalkd, "cmd-use") == 0

        # Another principal is not affected.
        admin = await proxy.connect("admin")
        await admin.send(LTU * 5)
        assert await replies(admin, 5) == [b"USING default"] * 5
        assert await cmd_count(beanstalkd, "cmd-list-tube-used") == 8

        # Every connection of the principal draws on one bucket; quit is never limited, and
        # a closed connection's count stays in the metric.
        second = await proxy.connect("billing")
        await second.send(LTU + b"quit\r\n")
        assert await second.closed() == b"RATE_LIMITED\r\n"
        assert rate_limited_metric(proxy) == {"billing": 5}

        # A reload that keeps (rate, burst) keeps the bucket: reloading does not refill it.
        proxy.server.reload_policy(parse_acl(rated_acl(slow), "acl.yaml"))
        assert await billing.line(b"list-tube-used") == b"RATE_LIMITED"

        # A changed limit starts a fresh bucket for the live connection.
        proxy.server.reload_policy(parse_acl(rated_acl({"per_second": 0.001, "burst": 2}), "a"))
        await billing.send(LTU * 3)
        assert await replies(billing, 3) == [b"USING default"] * 2 + [b"RATE_LIMITED"]

        # Removing the rate lifts the limit on the same connection, from its next command.
        proxy.server.reload_policy(parse_acl(rated_acl(None), "acl.yaml"))
        await billing.send(LTU * 4)
        assert await replies(billing, 4) == [b"USING default"] * 4
        assert await cmd_count(beanstalkd, "cmd-list-tube-used") == 14
        assert rate_limited_metric(proxy) == {"billing": 7}
        await billing.close()
        await admin.close()


async def test_rate_limit_follows_a_renamed_principal(pki: PKI, beanstalkd: Beanstalkd) -> None:
    """A reload that maps the certificate to another principal: the connection gets that
    principal's limit, and what it counted so far stays under the old name."""
    async with serving(pki, beanstalkd.port, acl=rated_acl({"per_second": 0.001})) as proxy:
        billing = await proxy.connect("billing")
        await billing.send(LTU * 2)
        assert await replies(billing, 2) == [b"USING default", b"RATE_LIMITED"]
        renamed = rated_acl({"per_second": 0.001, "burst": 2}, billing_name="billing-v2")
        proxy.server.reload_policy(parse_acl(renamed, "acl.yaml"))
        await billing.send(LTU * 3)
        assert await replies(billing, 3) == [b"USING default"] * 2 + [b"RATE_LIMITED"]
        assert rate_limited_metric(proxy) == {"billing": 1, "billing-v2": 1}
        await billing.close()


@pytest.mark.parametrize(
    ("rate", "workers", "share"),
    [
        ((10.0, 20), 1, (10.0, 20)),
        ((10.0, 20), 2, (5.0, 10)),
        ((10.0, 21), 2, (5.0, 10)),  # rounded down: the sum never exceeds the burst...
        ((1.0, 1), 4, (0.25, 1)),  # ...unless it is below N: a bucket needs one token
        ((0.5, 3), 3, (0.5 / 3, 1)),
    ],
)
def test_worker_share(rate: tuple[float, int], workers: int, share: tuple[float, int]) -> None:
    assert worker_share(rate, workers) == share
    per_second, burst = worker_share(rate, workers)
    assert per_second * workers == pytest.approx(rate[0])
    assert burst * workers <= max(rate[1], workers)
    TokenBucket(per_second, burst, 0.0)  # a valid bucket

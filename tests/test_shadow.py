"""The shadow policy's evaluation (proxy/shadow.py), driven through the pure session without
sockets: what the enforced ACL does is unchanged byte for byte, and every difference of the
shadow is reported once with both deciding rules; no shadow decision ever sends anything
upstream, and a decision that needs a tube the session does not know is ``unknown``."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import take
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.acl import parse_acl
from proxy.relay import PolicyHolder
from proxy.session import Session
from proxy.shadow import ALLOW, DENY, FILTERED, REFUSED, Mismatch, ShadowView

ENFORCED: dict[str, Any] = {
    "principals": [{"name": "app", "match": {"cn": "app"}}],
    "rules": [
        {"principal": "app", "tubes": ["jobs", "mail"], "allow": ["produce", "consume"]},
        {"principal": "app", "tubes": ["jobs"], "allow": ["inspect"]},
    ],
}
#: The proposed change: mail loses produce, "reports" gains produce, stats allowed.
SHADOW: dict[str, Any] = {
    "principals": [{"name": "app", "match": {"cn": "app"}}],
    "rules": [
        {"principal": "app", "tubes": ["jobs", "reports"], "allow": ["produce"]},
        {"principal": "app", "tubes": ["jobs", "mail"], "allow": ["consume"]},
        {"principal": "app", "tubes": ["jobs"], "allow": ["inspect"]},
        {"principal": "app", "allow": ["server"]},
    ],
}


class Sink:
    def __init__(self) -> None:
        self.mismatches: list[Mismatch] = []
        self.unknowns: list[tuple[str, str]] = []

    def mismatch(self, record: Mismatch) -> None:
        self.mismatches.append(record)

    def unknown(self, principal: str, command: str) -> None:
        self.unknowns.append((principal, command))


def pair(
    enforced: dict[str, Any] = ENFORCED,
    shadow: dict[str, Any] | None = SHADOW,
    shadow_principal: str | None = "app",
) -> tuple[Session, Session, Sink]:
    """The same connection twice: with the shadow attached, and without (the reference)."""
    holder = PolicyHolder(parse_acl(enforced, "acl.yaml"))
    with_shadow = Session(holder, "app", denial_reply="explicit")
    plain = Session(PolicyHolder(parse_acl(enforced, "acl.yaml")), "app", denial_reply="explicit")
    sink = Sink()
    if shadow is not None:
        view = ShadowView(parse_acl(shadow, "shadow.yaml"), shadow_principal, holder, sink)
        with_shadow.set_shadow(view)
    return with_shadow, plain, sink


def both(a: Session, b: Session, client: bytes = b"", upstream: bytes = b"") -> bytes:
    """Feed both sessions; assert they sent the same bytes both ways; return the upstream
    bytes."""
    for s in (a, b):
        if client:
            s.feed_client(client)
        if upstream:
            s.feed_upstream(upstream)
    sent = take(a.to_upstream)
    assert sent == take(b.to_upstream)
    assert take(a.to_client) == take(b.to_client)
    assert a.blocked == b.blocked
    return sent


# --- success cases: agreement is silent, disagreement reported once with both rules ---------


def test_same_decisions_report_nothing() -> None:
    a, b, sink = pair()
    both(a, b, b"use jobs\r\nput 0 0 60 1\r\nx\r\nwatch mail\r\n")
    both(a, b, upstream=b"USING jobs\r\nINSERTED 1\r\nWATCHING 2\r\n")
    assert sink.mismatches == [] and sink.unknowns == []


def test_put_the_shadow_would_deny_is_forwarded_and_reported() -> None:
    a, b, sink = pair()
    sent = both(a, b, b"use mail\r\nput 0 0 60 1\r\nx\r\n")
    assert sent == b"use mail\r\nput 0 0 60 1\r\nx\r\n"  # enforcement unchanged
    (m,) = sink.mismatches
    assert (m.principal, m.command, m.tube, m.enforced, m.shadow) == (
        "app",
        "put",
        "mail",
        ALLOW,
        DENY,
    )
    assert m.enforced_rule == "rules[0] (allow produce,consume on jobs,mail)"
    assert m.shadow_rule == "default deny (no rule allows produce on 'mail' for app)"


def test_put_the_shadow_would_allow_is_denied_and_reported() -> None:
    a, b, sink = pair()
    both(a, b, b"use reports\r\nput 0 0 60 1\r\nx\r\n")
    # enforced: use reports denied, then the put refused because of it
    assert [d["command"] for d in a.denials] == ["use", "put"]
    assert [(m.command, m.enforced, m.shadow) for m in sink.mismatches] == [
        ("use", DENY, ALLOW),
        ("put", DENY, ALLOW),
    ]
    assert sink.mismatches[1].shadow_rule == "rules[0] (allow produce on jobs,reports)"
    assert "use reports was denied" in sink.mismatches[1].enforced_rule


def test_stats_redacted_by_enforced_allowed_by_shadow() -> None:
    a, b, sink = pair()
    both(a, b, b"stats\r\n")
    (m,) = sink.mismatches
    assert (m.command, m.enforced, m.shadow) == ("stats", FILTERED, ALLOW)


def test_job_tube_learned_from_put_reply_decides_the_shadow() -> None:
    a, b, sink = pair()
    both(a, b, b"use jobs\r\nput 0 0 60 1\r\nx\r\n", b"USING jobs\r\nINSERTED 7\r\n")
    both(a, b, b"peek 7\r\n")  # inspect on jobs: both allow
    assert sink.mismatches == []
    both(a, b, upstream=b"FOUND 7 1\r\nx\r\n")
    assert sink.mismatches == [] and sink.unknowns == []


def test_enforced_lookup_answers_the_shadow_too() -> None:
    """peek of a job this connection never saw: the enforced ACL asks beanstalkd (stats-job);
    the shadow decides on the same answer and sends nothing of its own."""
    shadow = {**SHADOW, "rules": [{"principal": "app", "tubes": ["mail"], "allow": ["all"]}]}
    a, b, sink = pair(shadow=shadow)
    sent = both(a, b, b"peek 42\r\n")
    assert sent == b"stats-job 42\r\n" and a.blocked
    sent = both(a, b, upstream=b"OK 26\r\n---\ntube: jobs\nstate: ready\n\r\n")
    assert sent == b"peek 42\r\n"
    (m,) = sink.mismatches
    assert (m.command, m.job, m.tube, m.enforced, m.shadow) == ("peek", 42, "jobs", ALLOW, DENY)


def test_successor_keeps_the_shadow_used_tube() -> None:
    a, b, sink = pair()
    both(a, b, b"use jobs\r\n")
    assert a.shadow is not None
    a.set_shadow(a.shadow.successor(parse_acl(SHADOW, "shadow2.yaml"), "app"))
    both(a, b, b"put 0 0 60 1\r\nx\r\n")
    assert sink.mismatches == []


# --- rejection cases: what the shadow must not do or must not claim ---------------------------


def test_without_shadow_nothing_is_evaluated() -> None:
    a, b, sink = pair(shadow=None)
    assert a.shadow is None
    both(a, b, b"use mail\r\nput 0 0 60 1\r\nx\r\nstats\r\n")
    assert sink.mismatches == [] and sink.unknowns == []


def test_unknown_job_tube_is_unknown_not_a_lookup() -> None:
    """The enforced ACL allows delete everywhere (no lookup); the shadow would need the
    job's tube: counted unknown, and nothing extra goes upstream."""
    enforced = {**ENFORCED, "rules": [{"principal": "app", "allow": ["all"]}]}
    a, b, sink = pair(enforced=enforced)
    sent = both(a, b, b"delete 99\r\n")
    assert sent == b"delete 99\r\n"
    assert sink.unknowns == [("app", "delete")] and sink.mismatches == []


def test_shadow_refusing_the_certificate_reports_refused() -> None:
    a, b, sink = pair(shadow_principal=None)
    both(a, b, b"use jobs\r\n")
    (m,) = sink.mismatches
    assert (m.enforced, m.shadow, m.shadow_principal) == (ALLOW, REFUSED, None)


def test_release_of_a_job_not_reserved_is_not_a_policy_decision() -> None:
    a, b, sink = pair()
    both(a, b, b"release 5 0 0\r\n")  # beanstalkd's NOT_FOUND, answered locally
    assert sink.mismatches == [] and sink.unknowns == []


def test_watch_denied_by_shadow_does_not_make_reserve_a_mismatch() -> None:
    """The shadow would have refused ``watch mail`` (reported once); its reserve then waits
    on the tubes the shadow would have let it watch, not on mail."""
    shadow = {**SHADOW, "rules": [{"principal": "app", "tubes": ["default"], "allow": ["all"]}]}
    enforced = {
        **ENFORCED,
        "rules": [{"principal": "app", "tubes": ["default", "mail"], "allow": ["all"]}],
    }
    a, b, sink = pair(enforced=enforced, shadow=shadow)
    both(a, b, b"watch mail\r\n", b"WATCHING 2\r\n")
    both(a, b, b"reserve-with-timeout 0\r\n", b"TIMED_OUT\r\n")
    assert [(m.command, m.enforced, m.shadow) for m in sink.mismatches] == [
        ("watch", ALLOW, DENY)
    ]


def test_put_refused_at_its_line_does_not_guess_the_body_size() -> None:
    enforced = {**ENFORCED, "rules": []}
    shadow = {
        **SHADOW,
        "rules": [{"principal": "app", "allow": ["produce"], "put": {"max_body": 10}}],
    }
    a, b, sink = pair(enforced=enforced, shadow=shadow)
    both(a, b, b"put 0 0 60 5\r\nhello\r\n")  # body discarded unseen: size unknown
    assert sink.mismatches == [] and sink.unknowns == [("app", "put")]


@pytest.mark.parametrize("line", [b"list-tube-used\r\n", b"list-tubes-watched\r\n", b"quit\r\n"])
def test_connection_local_commands_are_not_compared(line: bytes) -> None:
    a, b, sink = pair(shadow_principal=None)
    both(a, b, line)
    assert sink.mismatches == [] and sink.unknowns == []


def test_shipped_shadow_example_differs_from_acl_example_as_documented() -> None:
    """config/acl.shadow.example.yaml is a shadow of config/acl.example.yaml in which
    reporting loses inspect on invoices (README, "Changing the ACL safely")."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "config"
    enforced = yaml.safe_load((root / "acl.example.yaml").read_text())
    shadow = yaml.safe_load((root / "acl.shadow.example.yaml").read_text())
    holder = PolicyHolder(parse_acl(enforced, "acl.example.yaml"))
    s = Session(holder, "reporting", denial_reply="explicit")
    sink = Sink()
    s.set_shadow(ShadowView(parse_acl(shadow, "shadow"), "reporting", holder, sink))
    s.feed_client(b"stats-tube reports.daily\r\nstats-tube invoices\r\n")
    assert take(s.to_upstream) == b"stats-tube reports.daily\r\nstats-tube invoices\r\n"
    assert [(m.command, m.tube, m.enforced, m.shadow) for m in sink.mismatches] == [
        ("stats-tube", "invoices", ALLOW, DENY)
    ]
    assert sink.mismatches[0].enforced_rule == "rules[4] (allow inspect on reports.*,invoices)"


def record(principal: str = "app", command: str = "put") -> Mismatch:
    return Mismatch(principal, principal, command, "mail", None, ALLOW, "r1", DENY, "r2")


def test_reporter_counts_every_mismatch_and_logs_a_burst_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from proxy.metrics import Metrics
    from proxy.shadowreport import LOG_BURST, LOG_WINDOW, ShadowReporter

    now = [100.0]
    metrics = Metrics()
    reporter = ShadowReporter(metrics, clock=lambda: now[0])
    caplog.set_level("INFO", logger="beanstalk_proxy.audit")
    for _ in range(LOG_BURST + 5):
        reporter.mismatch(record())
    reporter.mismatch(record("other"))  # another principal has its own window
    events = [getattr(r, "fields", {}) for r in caplog.records]
    assert [e["principal"] for e in events] == ["app"] * LOG_BURST + ["other"]
    assert events[0]["enforced_rule"] == "r1" and events[0]["shadow_rule"] == "r2"
    labels = {"principal": "app", "command": "put", "enforced": "allow", "shadow": "deny"}
    sample = metrics.registry.get_sample_value("beanstalk_proxy_shadow_mismatch_total", labels)
    assert sample == LOG_BURST + 5
    caplog.clear()
    now[0] += LOG_WINDOW + 1
    reporter.mismatch(record())
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    assert fields[0]["event"] == "shadow_mismatch_suppressed"
    assert (fields[0]["principal"], fields[0]["suppressed"]) == ("app", 5)
    assert fields[1]["event"] == "shadow_mismatch"


def test_reporter_caps_principal_labels() -> None:
    from proxy.metrics import MAX_SHADOW_PRINCIPAL_LABELS, Metrics
    from proxy.shadowreport import ShadowReporter

    metrics = Metrics()
    reporter = ShadowReporter(metrics)
    for i in range(MAX_SHADOW_PRINCIPAL_LABELS + 3):
        reporter.unknown(f"p{i}", "delete")
    other = metrics.registry.get_sample_value(
        "beanstalk_proxy_shadow_unknown_total", {"principal": "_other", "command": "delete"}
    )
    assert other == 3


def test_enforced_reload_invalidates_the_agreement_cache() -> None:
    """Puts on jobs agree (cached); after the enforced ACL drops produce on jobs, the next
    put there is a mismatch (enforced deny, shadow allow), not a cached agreement."""
    a, b, sink = pair()
    both(a, b, b"use jobs\r\nput 0 0 60 1\r\nx\r\n", b"USING jobs\r\nINSERTED 1\r\n")
    assert sink.mismatches == []
    narrower = {**ENFORCED, "rules": [{"principal": "app", "tubes": ["mail"], "allow": ["all"]}]}
    for s in (a, b):
        s._source.current = parse_acl(narrower, "acl.yaml")  # type: ignore[misc]
    both(a, b, b"put 0 0 60 1\r\nx\r\n")
    assert [(m.command, m.enforced, m.shadow) for m in sink.mismatches] == [("put", DENY, ALLOW)]


_TUBES = ("jobs", "mail", "reports", "default", "other")
_LINES = st.one_of(
    st.sampled_from(_TUBES).map(lambda t: b"use %s\r\n" % t.encode()),
    st.sampled_from(_TUBES).map(lambda t: b"watch %s\r\n" % t.encode()),
    st.sampled_from(_TUBES).map(lambda t: b"ignore %s\r\n" % t.encode()),
    st.sampled_from(_TUBES).map(lambda t: b"stats-tube %s\r\n" % t.encode()),
    st.integers(0, 3).map(lambda n: b"put 0 0 60 %d\r\n%s\r\n" % (n, b"x" * n)),
    st.integers(1, 4).map(lambda j: b"delete %d\r\n" % j),
    st.integers(1, 4).map(lambda j: b"release %d 0 0\r\n" % j),
    st.sampled_from(
        [b"reserve-with-timeout 0\r\n", b"peek-ready\r\n", b"kick 1\r\n", b"stats\r\n"]
    ),
    st.sampled_from([b"list-tubes\r\n", b"list-tube-used\r\n"]),
)


#: A shadow that differs in consume and manage too.
SHADOW_CONSUME: dict[str, Any] = {
    **SHADOW,
    "rules": [
        {"principal": "app", "tubes": ["jobs", "reports"], "allow": ["consume", "produce"]},
        {"principal": "app", "tubes": ["default"], "allow": ["manage"]},
    ],
}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_LINES, max_size=25),
    st.sampled_from([SHADOW, SHADOW_CONSUME]),
    st.booleans(),
)
def test_enforcement_is_byte_for_byte_the_same_with_a_shadow(
    lines: list[bytes], shadow: dict[str, Any], refused: bool
) -> None:
    """Whatever the client sends, the session with a shadow sends exactly what the one
    without sends, both ways, and records the same denials (upstream answers NOT_FOUND to
    everything, lookups included, after each command)."""
    a, b, _ = pair(shadow=shadow, shadow_principal=None if refused else "app")
    for line in lines:
        both(a, b, line)
        assert len(a.pending) == len(b.pending)
        if a.pending:
            both(a, b, upstream=b"NOT_FOUND\r\n" * len(a.pending))
    assert a.denials == b.denials

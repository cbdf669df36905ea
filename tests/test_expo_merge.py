"""``proxy.expo_merge``: the workers' expositions merged into one. Counters and histograms
are summed per label set (bucket by bucket), per-process families get a ``worker`` label,
reload flags and expiry take the worst worker, build info stays 1, retired inputs add only
counters, label values of any text survive the round trip, and garbage is refused."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.expo_merge import family_mode, merge, merge_counters
from proxy.metrics import Metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def exposition(
    counts: dict[str, int],
    gauge: float,
    observations: list[float],
    rss: float,
    reload_ok: int,
) -> str:
    r = CollectorRegistry()
    c = Counter("beanstalk_proxy_things", "Things, by label", ["tube"], registry=r)
    for label, n in counts.items():
        c.labels(label).inc(n)
    Gauge("beanstalk_proxy_connections_open", "Open now", registry=r).set(gauge)
    h = Histogram("beanstalk_proxy_latency_seconds", "Latency", buckets=BUCKETS, registry=r)
    for v in observations:
        h.observe(v)
    Gauge("process_resident_memory_bytes", "RSS", registry=r).set(rss)
    ok = Gauge("beanstalk_proxy_config_last_reload_successful", "ok", ["kind"], registry=r)
    ok.labels("acl").set(reload_ok)
    Gauge("beanstalk_proxy_build_info", "1", ["version"], registry=r).labels("1.0").set(1)
    return generate_latest(r).decode()


_WORKER = st.fixed_dictionaries(
    {
        "counts": st.dictionaries(st.text(max_size=8), st.integers(0, 10**6), max_size=4),
        "gauge": st.integers(0, 10_000).map(float),
        "observations": st.lists(st.floats(0, 5, allow_nan=False), max_size=10),
        "rss": st.integers(0, 2**40).map(float),
        "reload_ok": st.integers(0, 1),
    }
)


@settings(max_examples=80, deadline=None)
@given(st.lists(_WORKER, min_size=1, max_size=4))
def test_sums_per_label_set_and_labels_per_process_figures(workers: list[dict]) -> None:
    texts = [(str(k), exposition(**w)) for k, w in enumerate(workers)]
    merged = parse(merge(texts))

    for label in {t for w in workers for t in w["counts"]}:
        total = sum(w["counts"].get(label, 0) for w in workers)
        assert merged[("beanstalk_proxy_things_total", frozenset({("tube", label)}))] == total
    assert merged[("beanstalk_proxy_connections_open", frozenset())] == sum(
        w["gauge"] for w in workers
    )
    all_obs = [v for w in workers for v in w["observations"]]
    for le in BUCKETS:
        key = ("beanstalk_proxy_latency_seconds_bucket", frozenset({("le", str(le))}))
        assert merged[key] == sum(1 for v in all_obs if v <= le)
    assert merged[("beanstalk_proxy_latency_seconds_count", frozenset())] == len(all_obs)
    total = merged[("beanstalk_proxy_latency_seconds_sum", frozenset())]
    assert math.isclose(total, math.fsum(all_obs), rel_tol=1e-9, abs_tol=1e-9)
    for k, w in enumerate(workers):
        key = ("process_resident_memory_bytes", frozenset({("worker", str(k))}))
        assert merged[key] == w["rss"]
    assert ("process_resident_memory_bytes", frozenset()) not in merged
    ok = ("beanstalk_proxy_config_last_reload_successful", frozenset({("kind", "acl")}))
    assert merged[ok] == min(w["reload_ok"] for w in workers)
    assert merged[("beanstalk_proxy_build_info", frozenset({("version", "1.0")}))] == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(_WORKER, min_size=2, max_size=3), st.randoms())
def test_the_order_of_the_workers_does_not_matter(workers: list[dict], rnd) -> None:  # type: ignore[no-untyped-def]
    texts = [(str(k), exposition(**w)) for k, w in enumerate(workers)]
    shuffled = list(texts)
    rnd.shuffle(shuffled)
    one, other = parse(merge(texts)), parse(merge(shuffled))
    assert one.keys() == other.keys()
    for key, v in one.items():  # float sums may differ in the last bit with the order
        assert math.isclose(v, other[key], rel_tol=1e-12), key


@settings(max_examples=40, deadline=None)
@given(_WORKER, _WORKER)
def test_a_retired_input_adds_its_counters_only(old: dict, new: dict) -> None:
    retired = merge_counters([(None, exposition(**old))])
    kept = parse(retired)
    assert {name for name, _ in kept} <= {
        "beanstalk_proxy_things_total",
        "beanstalk_proxy_latency_seconds_bucket",
        "beanstalk_proxy_latency_seconds_count",
        "beanstalk_proxy_latency_seconds_sum",
    }
    merged = parse(merge([("0", exposition(**new)), (None, retired)]))
    for label in set(old["counts"]) | set(new["counts"]):
        key = ("beanstalk_proxy_things_total", frozenset({("tube", label)}))
        assert merged[key] == old["counts"].get(label, 0) + new["counts"].get(label, 0)
    count = ("beanstalk_proxy_latency_seconds_count", frozenset())
    assert merged[count] == len(old["observations"]) + len(new["observations"])
    # Gauges and per-process figures come from the live worker alone.
    assert merged[("beanstalk_proxy_connections_open", frozenset())] == new["gauge"]
    assert merged[("process_resident_memory_bytes", frozenset({("worker", "0")}))] == new["rss"]
    assert len([k for k in merged if k[0] == "process_resident_memory_bytes"]) == 1


def test_the_proxys_own_exposition_round_trips() -> None:
    a, b = Metrics(), Metrics()
    a.handshake_failures.labels("unknown_ca").inc(2)
    b.handshake_failures.labels("unknown_ca").inc(3)
    b.denied("billing", 'tube "with" \\ odd\nchars', "put")
    for m in (a, b):  # both workers load the same edit...
        m.reload_result("acl", True, counted=True)
    b.reload_result("acl", False, counted=True)  # ...and one of them a broken one
    merged = parse(
        merge(
            [
                ("0", generate_latest(a.registry).decode()),
                ("1", generate_latest(b.registry).decode()),
            ]
        )
    )
    assert (
        merged[("beanstalk_proxy_handshake_failures_total", frozenset({("reason", "unknown_ca")}))]
        == 5
    )
    denial = frozenset(
        {("principal", "billing"), ("tube", 'tube "with" \\ odd\nchars'), ("command", "put")}
    )
    assert merged[("beanstalk_proxy_denials_total", denial)] == 1
    assert (
        merged[("beanstalk_proxy_config_last_reload_successful", frozenset({("kind", "acl")}))] == 0
    )
    # Every worker counts the same reload: it counts once for the proxy.
    success = frozenset({("kind", "acl"), ("result", "success")})
    failure = frozenset({("kind", "acl"), ("result", "failure")})
    assert (
        merged[("beanstalk_proxy_reloads_total", success)],
        merged[("beanstalk_proxy_reloads_total", failure)],
    ) == (1, 1)
    cpu = [k for k in merged if k[0] == "process_cpu_seconds_total"]
    assert sorted(dict(labels)["worker"] for _, labels in cpu) == ["0", "1"]


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("beanstalk_proxy_commands", "sum"),
        ("beanstalk_proxy_client_sockets", "sum"),
        ("process_open_fds", "worker"),
        ("python_gc_collections", "worker"),
        ("beanstalk_proxy_open_fds", "worker"),
        ("beanstalk_proxy_certificate_expiry_timestamp_seconds", "min"),
        ("beanstalk_proxy_build_info", "max"),
        ("beanstalk_proxy_reloads", "max"),
    ],
)
def test_family_modes(name: str, mode: str) -> None:
    assert family_mode(name) == mode


@pytest.mark.parametrize(
    "text",
    [
        "not a metric line at all {\n",
        'x{a="unterminated} 1\n',
        "x not_a_number\n",
    ],
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        merge([("0", text)])

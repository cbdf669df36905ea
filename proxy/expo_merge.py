"""Merge the Prometheus text expositions of the workers of ``serve --workers N`` into one.

Pure: text in, text out (parsed and written with ``prometheus_client``'s own parser and
writer, so escaping round-trips). Each family is merged by its ``mode`` (``family_mode``):

- ``sum`` (counters, histograms bucket by bucket, and gauges that count things now, such as
  open connections): the samples with the same name and label set are added up. Workers run
  the same code, so their histograms have the same buckets.
- ``worker``: per-process facts (``process_*``, ``python_*``, open fds, start time) are kept
  per worker with a ``worker="k"`` label, so a leaking worker stays visible (sum them in the
  query for a whole-proxy figure).
- ``min``: the last-reload success flags and timestamps and the certificate expiry: the
  whole proxy is as good as its worst worker.
- ``max``: ``beanstalk_proxy_build_info`` (1 in every worker, so 1) and
  ``beanstalk_proxy_reloads_total`` (every worker loads the same files on the same signal or
  change: a reload of the proxy counts once, not N times).

An input may be ``retired`` (its worker label ``None``): the counters of a worker that was
replaced, carried so the whole-proxy counters never go backwards when a worker restarts; it
contributes to counter and histogram families only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["WORKER_LABEL", "family_mode", "merge", "merge_counters"]

#: The label that tells workers apart in per-worker families.
WORKER_LABEL: Final = "worker"

_PER_WORKER_PREFIXES: Final = ("process_", "python_")
_PER_WORKER: Final = frozenset({"beanstalk_proxy_open_fds", "beanstalk_proxy_start_time_seconds"})
_MIN: Final = frozenset(
    {
        "beanstalk_proxy_config_last_reload_successful",
        "beanstalk_proxy_config_last_reload_success_timestamp_seconds",
        "beanstalk_proxy_certificate_expiry_timestamp_seconds",
    }
)
_MAX: Final = frozenset({"beanstalk_proxy_build_info", "beanstalk_proxy_reloads"})
_CUMULATIVE: Final = frozenset({"counter", "histogram", "summary"})

_Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


def family_mode(name: str) -> str:
    """How the family ``name`` (as parsed: counters without ``_total``) is merged."""
    if name.startswith(_PER_WORKER_PREFIXES) or name in _PER_WORKER:
        return "worker"
    if name in _MIN:
        return "min"
    if name in _MAX:
        return "max"
    return "sum"


class _Family:
    __slots__ = ("documentation", "mode", "name", "samples", "type")

    def __init__(self, metric: Metric) -> None:
        self.name = metric.name
        self.documentation = metric.documentation
        self.type = metric.type
        self.mode = family_mode(metric.name)
        # Insertion-ordered: the first input's sample order (histogram buckets stay sorted).
        self.samples: dict[_Key, tuple[dict[str, str], float]] = {}

    def add(self, metric: Metric, worker: str | None) -> None:
        mode, samples = self.mode, self.samples
        for s in metric.samples:
            labels = s.labels
            if mode == "worker":
                if worker is None:
                    continue
                labels = {**labels, WORKER_LABEL: worker}
            key = (s.name, tuple(sorted(labels.items())))
            have = samples.get(key)
            if have is None:
                samples[key] = (labels, s.value)
            elif mode == "min":
                samples[key] = (have[0], min(have[1], s.value))
            elif mode == "max":
                samples[key] = (have[0], max(have[1], s.value))
            else:
                samples[key] = (have[0], have[1] + s.value)

    def metric(self) -> Metric:
        out = Metric(self.name, self.documentation, self.type)
        for (name, _), (labels, value) in self.samples.items():
            out.add_sample(name, labels, value)
        return out


class _Families(Collector):
    def __init__(self, families: Iterable[_Family]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.metric()


def _merged(inputs: Sequence[tuple[str | None, str]], counters_only: bool) -> list[_Family]:
    families: dict[str, _Family] = {}
    for worker, text in inputs:
        for metric in text_string_to_metric_families(text):
            summed = metric.type in _CUMULATIVE and family_mode(metric.name) == "sum"
            if (worker is None or counters_only) and not summed:
                continue
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = _Family(metric)
            family.add(metric, worker)
    return list(families.values())


def _render(families: Iterable[_Family]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode("utf-8")


def merge(inputs: Sequence[tuple[str | None, str]]) -> str:
    """One exposition from ``(worker label, exposition text)`` pairs; a ``None`` label marks
    a retired input (counters and histograms only). Raises ``ValueError`` on unparseable
    text."""
    return _render(_merged(inputs, counters_only=False))


def merge_counters(inputs: Sequence[tuple[str | None, str]]) -> str:
    """Only the summed counter and histogram families of ``inputs``: what a replaced worker
    leaves behind to be carried into later merges as a retired input."""
    return _render(_merged(inputs, counters_only=True))

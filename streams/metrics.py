"""A worker's Prometheus metrics and health: read when scraped, from the state the roles already keep.

Counters stay the plain integers of WorkerStats and SinkStats (a scrape reads them: no per-event cost on the hot
path); the two latency histograms are observed once per batch and per insert. Names and labels are documented in
docs/operations.md, and deploy/prometheus/rules.yml alerts on them.

Health, for the manifests' probes:
- liveness (/livez): the event loop runs its one-second heartbeat; a loop blocked for `stall_s` is not alive;
- readiness (/readyz): reference data loaded, the consumer group settled (not rebalancing), and for a sink, caught
  up (its lag at most `ready_max_lag` messages). The body says which check failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Batch and insert latencies span milliseconds (a small batch) to tens of seconds (a backlog's 10,000-row insert).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Source = Callable[[], Iterable[Metric]]


class _Sources(Collector):
    """Calls every registered source at scrape time."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


class WorkerMetrics:
    """One worker's registry: per-batch and per-insert histograms, and sources read at scrape time."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry(auto_describe=False)
        self.batch_seconds = Histogram(
            "tally_batch_seconds", "Time to handle one batch of input messages, from taken to its position stored",
            ["role", "stage"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.insert_seconds = Histogram(
            "tally_sink_insert_seconds", "Time of one ClickHouse insert of the sink (one table, one batch)",
            ["table"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self._sources = _Sources()
        self.registry.register(self._sources)

    def add(self, source: Source) -> None:
        """Register a function that yields metric families when Prometheus scrapes."""
        self._sources.sources.append(source)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the text exposition format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


Samples = Iterable[tuple[dict[str, str], float]]


def _family(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str, samples: Samples,
            labels: tuple[str, ...]) -> Metric:
    family = kind(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric([values[k] for k in labels], value)
    return family


def counter(name: str, doc: str, samples: Samples, labels: tuple[str, ...] = ()) -> Metric:
    """A counter family with one sample per label set (name without _total: the client library adds it)."""
    return _family(CounterMetricFamily, name, doc, samples, labels)


def gauge(name: str, doc: str, samples: Samples, labels: tuple[str, ...] = ()) -> Metric:
    """A gauge family with one sample per label set."""
    return _family(GaugeMetricFamily, name, doc, samples, labels)


@dataclass
class Heartbeat:
    """The event loop's pulse: a one-second timer beats; liveness asks how long ago it last did."""

    last: float = 0.0

    def beat(self, now: float | None = None) -> None:
        self.last = time.monotonic() if now is None else now

    def silent_for(self, now: float | None = None) -> float:
        if not self.last:
            return 0.0  # not started yet: the worker is starting, not stuck
        return (time.monotonic() if now is None else now) - self.last


@dataclass(frozen=True)
class Check:
    """One readiness or liveness check, as the endpoint reports it."""

    name: str
    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def verdict(checks: Iterable[Check]) -> tuple[int, dict[str, Any]]:
    """HTTP status (200 when every check passes, else 503) and the JSON body listing them."""
    listed = list(checks)
    ok = all(c.ok for c in listed)
    return (200 if ok else 503), {"ok": ok, "checks": [c.as_json() for c in listed]}

"""Prometheus metrics (prometheus-client), one registry per app so tests need no global resets."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "oss_requests", "HTTP requests to the API surfaces, by status and surface", ["status", "surface"], registry=r
        )
        self.completions = Counter(
            "oss_completions", "Completions ended, by final status and API surface", ["status", "surface"], registry=r
        )
        self.active_streams = Gauge("oss_active_streams", "Completions in flight", registry=r)
        self.held_bytes = Gauge(
            "oss_held_bytes",
            "Bytes held by completions in flight and retained: text plus a per-chunk overhead (max_total_bytes bounds it)",
            registry=r,
        )
        self.chunks = Counter("oss_chunks", "Chunks delivered in order to completions", registry=r)
        self.events = LoopCounter("oss_sse_events", "SSE events written (coalesced chunks count once)", registry=r)
        self.dropped_chunks = Counter(
            "oss_dropped_chunks", "Chunks dropped: unknown request, duplicate, late, overflow", ["reason"], registry=r
        )
        self.reordered_chunks = Counter("oss_reordered_chunks", "Chunks that arrived early and were held", registry=r)
        self.retries = Counter(
            "oss_retries",
            "Requests re-sent to another replica before their first chunk (theirs died, was busy or timed out)",
            registry=r,
        )
        self.continuations = Counter(
            "oss_continuations",
            "Answers continued on another replica after theirs stopped mid-answer (the delivered pieces went along)",
            registry=r,
        )
        self.poison_requests = Counter(
            "oss_poison_requests", "Requests failed, never sent again, because their attempts crashed 2 replicas", registry=r
        )
        self.cancellations = Counter("oss_cancellations", "Completions cancelled (client gone or asked)", registry=r)
        self.errors = Counter("oss_errors", "Completions that failed, by error code", ["code"], registry=r)
        self.timeouts = Counter(
            "oss_timeouts", "Completions ended by a timeout: first_chunk, idle or gap (missing seq)", ["kind"], registry=r
        )
        self.time_to_first_chunk = Histogram(
            "oss_time_to_first_chunk_seconds", "From request to first chunk", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_chunk = LoopHistogram(
            "oss_inter_chunk_seconds",
            "Gap between in-order chunks of one completion, as received (one dora batch counts as one arrival)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def count_from(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a counter that another object keeps (an int another thread increments), read at render time."""
        self.registry.register(_ReadCounter(name, documentation, read))

    def replicas_from(self, read: Callable[[], Iterable[Any]]) -> None:
        """Per-replica series (label ``replica``), read from the backend's replicas when /metrics renders."""
        self.registry.register(_ReplicaCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoopCounter:
    """A counter for the event loop thread only: ``inc`` is one attribute update.

    For the per-event and per-row metrics of the streaming path. prometheus-client's
    ``Counter.inc`` takes a lock and costs ~0.5 us, its ``Histogram.observe`` ~1.2 us
    (benchmarks/README.md); per SSE event (``oss_sse_events``) and per delivered row
    (``oss_inter_chunk_seconds``) that was a tenth of the server's ~31 us per event at
    1,000 streams x 30 tokens/s in step mode. Everything that touches these runs on the
    loop, /metrics included, so no lock is needed. Rendered as prometheus-client renders a
    counter, less the ``_created`` sample.
    """

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class LoopHistogram:
    """A histogram for the event loop thread only (why: ``LoopCounter``); ``observe`` is a bisect and two adds."""

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = [float(b) for b in buckets]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1  # ``le`` buckets: amount <= bound
        self.sum += amount

    def collect(self) -> Iterator[Metric]:
        cumulative, total = [], 0
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class _ReadCounter:
    """A custom collector: one counter whose value ``read()`` returns when /metrics renders."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class _ReplicaCollector:
    """``oss_replica_*``: live, in flight, served, failures, retries per model replica; nothing on the hot path."""

    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("oss_replica_live", "1 while the model replica is live", labels=["replica"])
        in_flight = GaugeMetricFamily("oss_replica_in_flight", "Requests in flight on the model replica", labels=["replica"])
        served = CounterMetricFamily("oss_replica_served", "Requests the model replica completed", labels=["replica"])
        failures = CounterMetricFamily(
            "oss_replica_failures", "Times the model replica died, went silent or was restarted", labels=["replica"]
        )
        retries = CounterMetricFamily(
            "oss_replica_retries", "Requests re-sent elsewhere because the replica died before answering", labels=["replica"]
        )
        for r in self.read():
            labels = [r.replica_id]
            live.add_metric(labels, 1.0 if r.live else 0.0)
            in_flight.add_metric(labels, r.in_flight)
            served.add_metric(labels, r.served)
            failures.add_metric(labels, r.failures)
            retries.add_metric(labels, r.retries)
        yield from (live, in_flight, served, failures, retries)

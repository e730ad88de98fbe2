"""The coordinator's metrics (``[metrics] listen``, served by ``fedtre.metrics_http``): queries
by outcome and their end-to-end time, and whether each trust is reachable and serves this
catalog (from the trust monitor). Nothing here carries a value from any trust's data."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedtre.metrics_http import WRITE_BUCKETS

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CoordinatorMetrics:
    def __init__(self, trusts_up: Callable[[], dict[str, bool]]) -> None:
        self.registry = CollectorRegistry()
        self.queries = Counter(
            "fedtre_coordinator_queries", "Queries by outcome", ["outcome"], registry=self.registry
        )
        self.seconds = Histogram(
            "fedtre_coordinator_query_seconds",
            "End-to-end time of a query at the coordinator, both phases",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.audit_write = Histogram(
            "fedtre_coordinator_audit_write_seconds",
            "Audit log writes (sync=full: durable before acting or replying)",
            ["sync"],
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_TrustsUp(trusts_up))

    def observe(self, outcome: str, seconds: float) -> None:
        self.queries.labels(outcome).inc()
        self.seconds.observe(seconds)


class _TrustsUp(Collector):
    def __init__(self, trusts_up: Callable[[], dict[str, bool]]) -> None:
        self.trusts_up = trusts_up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "fedtre_coordinator_trust_up",
            "1 if the trust is reachable and serves this catalog",
            labels=["trust"],
        )
        for trust, up in sorted(self.trusts_up().items()):
            gauge.add_metric([trust], 1.0 if up else 0.0)
        yield gauge

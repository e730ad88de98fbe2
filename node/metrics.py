"""The node's metrics (``[metrics] listen``, served by ``fedtre.metrics_http``): requests by
call and outcome, their handling time, and each project's ε spent and left, read from the
ledger at scrape time. Nothing here carries a value from the data: counts are of requests, not
of persons."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedtre.dp import units_to_epsilon
from fedtre.errors import UserError
from fedtre.metrics_http import WRITE_BUCKETS
from node.engine import NodeEngine

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NodeMetrics:
    def __init__(self, engine: NodeEngine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedtre_node_requests",
            "Calls handled, by call and outcome",
            ["call", "outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "fedtre_node_request_seconds",
            "Handling time per call, answer slot included",
            ["call"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.ledger_write = Histogram(
            "fedtre_node_ledger_write_seconds",
            "Ledger write transactions; sync=full is a release's commit (fsync), normal the rest",
            ["sync"],
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.audit_write = Histogram(
            "fedtre_node_audit_write_seconds",
            "Audit entries written on their own (sync=full: durable before the reply, such as "
            "refusals); entries of a ledger change are in the ledger's transaction",
            ["sync"],
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Budget(engine))
        engine.ledger.on_write = lambda durable, seconds: self.ledger_write.labels(
            "full" if durable else "normal"
        ).observe(seconds)
        engine.audit.on_write = lambda durable, seconds: self.audit_write.labels(
            "full" if durable else "normal"
        ).observe(seconds)

    def observe(self, call: str, outcome: str, seconds: float) -> None:
        self.requests.labels(call, outcome).inc()
        self.seconds.labels(call).observe(seconds)


class _Budget(Collector):
    def __init__(self, engine: NodeEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spent = GaugeMetricFamily(
            "fedtre_node_epsilon_spent", "ε spent per project", labels=["project"]
        )
        left = GaugeMetricFamily(
            "fedtre_node_epsilon_left", "ε left per project", labels=["project"]
        )
        for project_id in self.engine.projects.held():
            try:
                status = self.engine.budget(project_id)
            except UserError:  # revoked or lapsed since the listing
                continue
            spent.add_metric([project_id], units_to_epsilon(status.spent_units))
            left.add_metric([project_id], status.remaining)
        yield spent
        yield left

"""The node's metrics and probe endpoint, on a local port of its own (``[metrics] listen``).

``/metrics``: Prometheus text (``prometheus_client``): requests by call and outcome, their
handling time, and each project's ε spent and left, read from the ledger at scrape time.
``/healthz``: plain text ``SERVING`` (200) or ``NOT_SERVING`` (503) for probes that cannot speak
mutual-TLS gRPC (e.g. Kubernetes'). Nothing here carries a value from the data: counts are of
requests, not of persons.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedtre.dp import units_to_epsilon
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
        self.registry.register(_Budget(engine))

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
        for project_id in sorted(self.engine.config.projects):
            status = self.engine.budget(project_id)
            spent.add_metric([project_id], units_to_epsilon(status.spent_units))
            left.add_metric([project_id], status.remaining)
        yield spent
        yield left


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the operator log


def serve_metrics(
    listen: str, metrics: NodeMetrics, serving: Callable[[], bool]
) -> tuple[WSGIServer, int]:
    """Start the endpoint in a thread; returns the server (``shutdown()`` stops it) and port."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = serving()
            start(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [b"SERVING\n" if ok else b"NOT_SERVING\n"]
        return prometheus(environ, start)

    host, port = listen.rsplit(":", 1)
    server = make_server(host, int(port), app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server, server.server_port

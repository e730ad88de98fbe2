"""The local metrics and probe endpoint both servers offer (``[metrics] listen``): Prometheus
text at ``/metrics`` from a registry of the service's own, and ``/healthz``: plain text
``SERVING`` (200) or ``NOT_SERVING`` (503), for probes that cannot speak mutual-TLS gRPC."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# Seconds, for disk writes (an fsync on an SSD: about a millisecond)
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the operator log


def serve_metrics(
    listen: str, registry: CollectorRegistry, serving: Callable[[], bool]
) -> tuple[WSGIServer, int]:
    """Start the endpoint in a thread; returns the server (``shutdown()`` stops it) and port."""
    prometheus = make_wsgi_app(registry)

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

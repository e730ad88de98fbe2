"""The local metrics and probe endpoint both servers offer (``[metrics] listen``): Prometheus
text at ``/metrics`` from a registry of the service's own, and ``/healthz``: plain text
``SERVING`` (200) or ``NOT_SERVING`` (503), for probes that cannot speak mutual-TLS gRPC."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# Seconds, for disk writes (an fsync on an SSD: about a millisecond)
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0)


MAX_CONNECTIONS = 32  # at once; more are closed at once (a local port: probes and a scraper)
CONNECTION_SECONDS = 10.0  # a connection is closed after this long, however it trickles


class _Quiet(WSGIRequestHandler):
    timeout = 5  # seconds a connection may sit idle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the operator log


class _Threaded(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most ``MAX_CONNECTIONS`` of them, each closed after
    ``connection_seconds``: a slow, idle or trickling client never holds the endpoint, and a
    flood of connections costs a bounded number of threads and descriptors."""

    daemon_threads = True
    connection_seconds = CONNECTION_SECONDS

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(self.connection_seconds, _cut, args=(request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()


def _cut(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def serve_metrics(
    listen: str,
    registry: CollectorRegistry,
    serving: Callable[[], bool],
    connection_seconds: float = CONNECTION_SECONDS,
    documents: Mapping[str, Callable[[], Any]] | None = None,
) -> tuple[WSGIServer, int]:
    """Start the endpoint in a thread; returns the server (``shutdown()`` stops it) and port.
    ``documents``: more paths, each answered with the JSON its function returns (e.g. the
    coordinator's ``/trusts``)."""
    prometheus = make_wsgi_app(registry)
    extra = dict(documents or {})

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path in extra:
            body = json.dumps(extra[path](), ensure_ascii=True, indent=1).encode() + b"\n"
            start("200 OK", [("Content-Type", "application/json")])
            return [body]
        if path == "/healthz":
            ok = serving()
            start(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [b"SERVING\n" if ok else b"NOT_SERVING\n"]
        return prometheus(environ, start)

    host, port = listen.rsplit(":", 1)
    server = make_server(host, int(port), app, server_class=_Threaded, handler_class=_Quiet)
    server.connection_seconds = connection_seconds
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server, server.server_port


def local_url(listen: str, path: str) -> str:
    """The URL of ``path`` on the local endpoint at ``listen`` (a wildcard host: loopback)."""
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 (a wildcard listen is asked on loopback)
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def no_metrics_port(config: Path, what: str) -> int:
    """Say that ``config`` has no ``[metrics] listen``, where ``what`` is served; exit 3."""
    print(
        f"{config} has no [metrics] listen: {what} is served there "
        '(e.g. listen = "127.0.0.1:9464")',
        file=sys.stderr,
    )
    return 3


def probe(listen: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Ask the local ``/healthz`` at ``listen``: (serving, what it said), for ``fedtre node
    health`` and container health checks."""
    url = local_url(listen, "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (http, local_url)
            return True, reply.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode("utf-8", "replace").strip() or f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"no answer at {url} ({reason}): is the service running?"


def health_command(listen: str, config: Path) -> int:
    """``fedtre node|coordinator health``: 0 when serving, 1 when not, 3 without a port."""
    if not listen:
        return no_metrics_port(config, "the health endpoint")
    ok, said = probe(listen)
    print(said if ok else f"NOT SERVING: {said}")
    return 0 if ok else 1


def fetch_document(listen: str, path: str, timeout: float = 3.0) -> Any:
    """GET a JSON document from the local endpoint at ``listen``."""
    url = local_url(listen, path)
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (http, local_url)
        return json.loads(reply.read())

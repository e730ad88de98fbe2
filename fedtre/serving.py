"""What node and coordinator servers share: building a gRPC server with TLS, size limits and the
standard health service, and running it until SIGTERM/SIGINT with a graceful stop."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtre import logs
from fedtre.errors import ConfigError, InternalError
from fedtre.native_logs import route_native_stderr
from fedtre.tls import CallerPolicy, TlsFiles, server_credentials

log = logs.get("serving")
HANDSHAKE_TIMEOUT_MS = 10_000
HANDSHAKE = "tls-handshake"  # the "method" of a connection refused before any call
UNVERIFIED_PEER = "unverified peer"


class Health:
    """The standard gRPC health service; ``""`` is the server as a whole.

    ``set`` is the service's own view (e.g. whether every project's rule can be met); a
    ``hold`` (e.g. the audit log cannot be written) keeps it NOT_SERVING whatever ``set`` says,
    until ``release``."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.servicer = health.HealthServicer()
        self.services = ("", *services)
        self.serving = False
        self._wanted = False
        self._holds: set[str] = set()
        self._lock = threading.Lock()

    def set(self, serving: bool) -> None:
        with self._lock:
            self._wanted = serving
            self._publish()

    def hold(self, reason: str) -> None:
        with self._lock:
            self._holds.add(reason)
            self._publish()

    def release(self, reason: str) -> None:
        with self._lock:
            self._holds.discard(reason)
            self._publish()

    def _publish(self) -> None:
        self.serving = self._wanted and not self._holds
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.services:
            self.servicer.set(name, status)


class Engine(Protocol):
    def close(self) -> None: ...


E = TypeVar("E", bound=Engine)


@dataclass
class Running(Generic[E]):
    """A started service and the engine behind it: a gRPC server, or (a dial-out node) only
    outbound links, stopped by ``stoppers`` before the engine closes."""

    server: grpc.Server | None
    port: int
    address: str  # "" until a dial-out node's first link is up
    health: Health
    engine: E
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    metrics_address: str = ""  # the local /metrics and /healthz endpoint, if any
    # Audits (method, who, why) for a call refused before any handler ran; also told of each
    # failed TLS handshake (``fedtre.native_logs``).
    audit_refusal: Callable[[str, str, str], None] | None = None

    def stop(self, grace: float = 5.0) -> None:
        self.health.set(False)
        for stop in self.stoppers:
            stop()
        if self.server is not None:
            self.server.stop(grace).wait()
        self.engine.close()


def add_serve_arguments(parser: argparse.ArgumentParser, insecure_help: str) -> None:
    """``--config``, ``--insecure`` and ``--ready-file``: the same for node and coordinator."""
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--insecure", action="store_true", help=insecure_help)
    parser.add_argument("--ready-file", type=Path, help="write the bound address here when up")


def serve_command(
    service: str, start: Callable[[], Running[E]], insecure: bool, ready_file: Path | None
) -> int:
    """What ``fedtre node serve`` and ``fedtre coordinator serve`` do once config is loaded."""
    native = route_native_stderr(service)  # gRPC's own lines into the same JSON stream
    logs.setup(service)
    if insecure:
        print(
            "WARNING: --insecure: plaintext and no caller authentication. Development only.",
            file=sys.stderr,
        )
    running = start()
    audit = running.audit_refusal
    if audit is not None:

        def refused(why: str, count: int) -> None:
            # gRPC does not say whether the connection came in or went out, nor from where
            audit(HANDSHAKE, UNVERIFIED_PEER, f"{why} ({count} connection(s) in or out)")

        native.handshakes.set_report(refused)
        running.stoppers.append(native.handshakes.close)  # the last counts, while audit is open
    if ready_file is not None and running.address:  # a dial-out node writes it when linked
        write_ready_file(ready_file, running.address)
    run_until_signalled(running)
    return 0


def build_server(
    *,
    address: str,
    tls: TlsFiles | None,
    policy: CallerPolicy | None,
    max_workers: int,
    max_receive_bytes: int,
    max_send_bytes: int,
    service_names: tuple[str, ...],
    add_services: Callable[[grpc.Server], None],
) -> tuple[grpc.Server, int, Health]:
    """Build and start a server. ``tls=None`` is plaintext (development only)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[policy] if policy is not None else [],
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.so_reuseport", 0),
            # A connection that has not finished its TLS handshake within this is closed (gRPC's
            # default, 120 s, lets silent connections hold the process's descriptors).
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ],
        maximum_concurrent_rpcs=max_workers * 16,
    )
    add_services(server)
    checker = Health(service_names)
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (in use, or not an address of this host)")
    server.start()
    checker.set(True)
    return server, port, checker


def bound_address(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"


def write_ready_file(path: Path, address: str) -> None:
    """Tell a supervisor (tests, the demo) where we listen, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}))
    tmp.replace(path)


def read_ready_file(path: Path) -> str:
    return str(json.loads(path.read_text())["address"])


def wait_for_address(
    popen: subprocess.Popen[bytes], ready_file: Path, log: Path, name: str, timeout: float = 60.0
) -> str:
    """The address a ``serve`` process started with ``--ready-file`` listens on, once it is up.
    Fails with the tail of its log if it exits first, or if it is not up within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready_file.exists():
            return read_ready_file(ready_file)
        if popen.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise InternalError(f"{name} exited while starting:\n{tail}")
        time.sleep(0.05)
    raise InternalError(f"{name} did not start within {timeout:.0f} s")


def run_until_signalled(running: Running[E], grace: float = 5.0) -> None:
    """Serve until SIGTERM or SIGINT; then report NOT_SERVING, finish in-flight calls within
    ``grace`` seconds, stop the links and close the engine."""
    stop = threading.Event()

    def _signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    previous = {s: signal.signal(s, _signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Wake up regularly: a signal delivered to one of gRPC's threads only sets a flag that
        # the main thread checks when it runs, so an untimed wait could sleep through SIGTERM.
        while not stop.wait(0.2):
            pass
    finally:
        running.stop(grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("stopped")

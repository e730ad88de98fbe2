"""``fedtre node serve``: the node's gRPC server (dial-in), or its outbound links to the
coordinator (dial-out).

Dial-in: the node accepts calls only from the certificate named in ``[server] coordinator``
(checked in ``CallerPolicy`` before any handler runs, after TLS has verified the chain to the
federation CA). Dial-out: the node dials that coordinator, verifying its certificate name, and
holds a stream (``node.dial_out``). Both hand every call to the same ``NodeHandler``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import grpc

from fedtre import logs
from fedtre.audit.events import Event
from fedtre.audit.recovery import AuditRecovery
from fedtre.errors import ConfigError, InternalError
from fedtre.metrics_http import serve_metrics
from fedtre.pki import Role
from fedtre.serde.common import MAX_REQUEST_BYTES, MAX_RESULT_BYTES
from fedtre.serving import Health, Running, bound_address, build_server
from fedtre.tls import CallerPolicy, Peer, TlsFiles, peer_identity
from fedtre.v2 import node_pb2_grpc
from node.config import NodeConfig, ServerMode, ServerSettings
from node.dial_out import DialOut
from node.engine import NodeEngine
from node.handler import NodeHandler
from node.metrics import NodeMetrics
from node.service import NodeServicer

log = logs.get("node")
SERVICE_NAME = "fedtre.v2.NodeService"
INSECURE_CALLER = "insecure-development-caller"
AUDITED_REQUEST_BYTES = 1024 * 1024


def create_server(
    config: NodeConfig,
    *,
    insecure: bool = False,
    on_connected: Callable[[str], None] = lambda address: None,
) -> Running[NodeEngine]:
    """Open the engine and start serving. Dial-in: returns the bound port (``listen`` may use
    port 0). Dial-out: starts the links and returns at once; ``on_connected`` is told each
    coordinator address when its link comes up."""
    settings = _settings(config, insecure)
    engine = NodeEngine(config, serving=True)
    try:
        metrics = NodeMetrics(engine) if config.metrics_listen else None
        if settings.mode is ServerMode.DIAL_OUT:
            running = _dial_out(config, settings, engine, insecure, on_connected, metrics)
        else:
            running = _dial_in(config, settings, engine, insecure, metrics)
        if metrics is not None:
            server, port = serve_metrics(
                config.metrics_listen, metrics.registry, lambda: running.health.serving
            )
            running.stoppers.append(server.shutdown)
            running.metrics_address = bound_address(config.metrics_listen, port)
    except BaseException:
        engine.close()
        raise
    running.audit_refusal = _audit_refusal(engine)
    engine.start_expiry()
    engine.audit.write(
        Event.NODE_SERVING,
        mode=settings.mode.value,
        address=running.address or None,
        tls=not insecure,
    )
    log.info(
        "serving",
        extra={
            "node": config.node_id,
            "mode": settings.mode.value,
            "address": running.address or ", ".join(settings.connect),
            "tls": not insecure,
        },
    )
    return running


def _dial_in(
    config: NodeConfig,
    settings: ServerSettings,
    engine: NodeEngine,
    insecure: bool,
    metrics: NodeMetrics | None,
) -> Running[NodeEngine]:
    tls = None if insecure else _tls(settings)
    policy = (
        None
        if insecure
        else CallerPolicy(
            _only(settings.coordinator),
            on_refused=_audit_refusal(engine),
            max_request_bytes=MAX_REQUEST_BYTES,
            revoked=engine.projects.crl.problem if engine.projects.crl is not None else None,
        )
    )

    def caller(context: grpc.ServicerContext) -> str:
        if insecure:
            return INSECURE_CALLER
        peer = peer_identity(context)
        if peer is None or peer.role is None:
            return "unknown"
        return f"{peer.role.value}:{peer.name}"

    recovery = AuditRecovery(engine.audit, log, lambda: engine.lost_writes)
    observe = metrics.observe if metrics is not None else _ignore
    servicer = NodeServicer(NodeHandler(engine, recovery.failed, observe), caller)
    server, port, health = build_server(
        address=settings.listen,
        tls=tls,
        policy=policy,
        max_workers=settings.max_workers,
        # oversized requests up to this are refused by the policy, audited; larger by gRPC
        max_receive_bytes=AUDITED_REQUEST_BYTES,
        max_send_bytes=MAX_RESULT_BYTES,
        service_names=(SERVICE_NAME,),
        add_services=lambda s: node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, s),
    )
    recovery.watch(health)
    return Running(
        server,
        port,
        bound_address(settings.listen, port),
        health,
        engine,
        stoppers=[recovery.stop],
    )


def _dial_out(
    config: NodeConfig,
    settings: ServerSettings,
    engine: NodeEngine,
    insecure: bool,
    on_connected: Callable[[str], None],
    metrics: NodeMetrics | None,
) -> Running[NodeEngine]:
    health = Health((SERVICE_NAME,))  # not served over gRPC: a dial-out node listens on nothing
    observe = metrics.observe if metrics is not None else _ignore
    recovery = AuditRecovery(engine.audit, log, lambda: engine.lost_writes)
    recovery.watch(health)
    links = DialOut(
        NodeHandler(engine, recovery.failed, observe),
        settings.connect,
        settings.coordinator,
        None if insecure else _tls(settings),
        config.catalog.version,
        settings.max_workers,
        on_connected,
    )
    links.start()
    health.set(True)
    return Running(None, 0, "", health, engine, stoppers=[links.stop, recovery.stop])


def _ignore(call: str, outcome: str, seconds: float) -> None:
    pass


def _audit_refusal(engine: NodeEngine) -> Callable[[str, str, str], None]:
    def audit(method: str, who: str, why: str) -> None:
        with contextlib.suppress(InternalError):  # refused either way
            engine.audit.write(Event.CALL_REFUSED, method=method, caller=who, reason=why)

    return audit


def _settings(config: NodeConfig, insecure: bool) -> ServerSettings:
    if config.server is None:
        raise ConfigError("the node config has no [server] section (listen, coordinator, TLS)")
    if not insecure and config.server.ca is None:
        raise ConfigError(
            "[server] needs ca, cert and key (mutual TLS); plaintext only with --insecure"
        )
    return config.server


def _tls(settings: ServerSettings) -> TlsFiles:
    assert settings.ca is not None and settings.cert is not None and settings.key is not None
    return TlsFiles(ca=settings.ca, cert=settings.cert, key=settings.key)


def _only(coordinator: str) -> Callable[[Peer], bool]:
    def allowed(peer: Peer) -> bool:
        return peer.role is Role.COORDINATOR and peer.name == coordinator

    return allowed

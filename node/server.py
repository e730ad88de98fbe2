"""``fedtre node serve``: the node's gRPC server.

The node accepts calls only from the certificate named in ``[server] coordinator`` (checked in
``CallerPolicy`` before any handler runs, after TLS has verified the chain to the federation CA).
Query handling lives in ``NodeEngine`` and does not depend on who dialled whom, so a
node-initiated (outbound-only) connection mode can reuse it.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from fedtre import logs
from fedtre.errors import ConfigError
from fedtre.pki import Role
from fedtre.serde.common import MAX_REQUEST_BYTES, MAX_RESULT_BYTES
from fedtre.serving import Health, Running, bound_address, build_server
from fedtre.tls import CallerPolicy, Peer, TlsFiles, peer_identity
from fedtre.v2 import node_pb2_grpc
from node.config import NodeConfig, ServerSettings
from node.engine import NodeEngine
from node.handler import NodeHandler
from node.service import NodeServicer

log = logs.get("node")
SERVICE_NAME = "fedtre.v2.NodeService"
INSECURE_CALLER = "insecure-development-caller"


def create_server(config: NodeConfig, *, insecure: bool = False) -> Running[NodeEngine]:
    """Open the engine and start serving; returns the bound port (``listen`` may use port 0)."""
    settings = _settings(config, insecure)
    engine = NodeEngine(config)
    try:
        tls = None if insecure else _tls(settings)
        policy = None if insecure else CallerPolicy(_only(settings.coordinator))
        holder: list[Health] = []

        def caller(context: grpc.ServicerContext) -> str:
            if insecure:
                return INSECURE_CALLER
            peer = peer_identity(context)
            if peer is None or peer.role is None:
                return "unknown"
            return f"{peer.role.value}:{peer.name}"

        def on_audit_failure() -> None:
            for h in holder:
                h.set(False)

        servicer = NodeServicer(NodeHandler(engine, on_audit_failure), caller)
        server, port, health = build_server(
            address=settings.listen,
            tls=tls,
            policy=policy,
            max_workers=settings.max_workers,
            max_receive_bytes=MAX_REQUEST_BYTES,
            max_send_bytes=MAX_RESULT_BYTES,
            service_names=(SERVICE_NAME,),
            add_services=lambda s: node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, s),
        )
        holder.append(health)
    except BaseException:
        engine.close()
        raise
    engine.start_expiry()
    address = bound_address(settings.listen, port)
    engine.audit.write("node.serving", address=address, tls=not insecure)
    log.info(
        "serving",
        extra={"node": config.node_id, "address": address, "tls": not insecure},
    )
    return Running(server, port, address, health, engine)


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

"""``fedtre coordinator serve``: the researcher-facing gRPC server and its channels to trusts."""

from __future__ import annotations

import grpc

from coordinator.config import CoordinatorConfig
from coordinator.dial_in import DialInLink
from coordinator.engine import CoordinatorEngine
from coordinator.fanout import Trusts
from coordinator.service import ResearcherServicer
from fedtre import logs
from fedtre.errors import ConfigError
from fedtre.pki import Role
from fedtre.serde.common import MAX_REQUEST_BYTES, MAX_RESULT_BYTES
from fedtre.serving import Running, bound_address, build_server
from fedtre.tls import CallerPolicy, Peer, TlsFiles, peer_identity
from fedtre.v2 import coordinator_pb2_grpc

log = logs.get("coordinator")
SERVICE_NAME = "fedtre.v2.ResearcherService"
INSECURE_RESEARCHER = "dev"


def create_server(
    config: CoordinatorConfig, *, insecure: bool = False
) -> Running[CoordinatorEngine]:
    tls = None if insecure else _tls(config)
    links = {nid: DialInLink(nid, e.address, tls) for nid, e in config.nodes.items()}
    engine = CoordinatorEngine(config, Trusts(links))
    try:

        def researcher(context: grpc.ServicerContext) -> str:
            if insecure:
                return INSECURE_RESEARCHER
            peer = peer_identity(context)
            if peer is None:  # CallerPolicy admits no such call; never guess an identity
                raise ConfigError("no client certificate on a mutual-TLS server")
            return peer.name

        servicer = ResearcherServicer(engine, researcher)
        server, port, health = build_server(
            address=config.listen,
            tls=tls,
            policy=None if insecure else CallerPolicy(_researchers_only),
            max_workers=config.max_workers,
            max_receive_bytes=MAX_REQUEST_BYTES,
            max_send_bytes=2 * MAX_RESULT_BYTES,
            service_names=(SERVICE_NAME,),
            add_services=lambda s: coordinator_pb2_grpc.add_ResearcherServiceServicer_to_server(
                servicer, s
            ),
        )
    except BaseException:
        engine.close()
        raise
    address = bound_address(config.listen, port)
    engine.audit.write("coordinator.serving", address=address, tls=not insecure)
    log.info(
        "serving",
        extra={"coordinator": config.coordinator_id, "address": address, "tls": not insecure},
    )
    return Running(server, port, address, health, engine)


def _researchers_only(peer: Peer) -> bool:
    return peer.role is Role.RESEARCHER


def _tls(config: CoordinatorConfig) -> TlsFiles:
    if config.ca is None or config.cert is None or config.key is None:
        raise ConfigError("the config has no [tls] (ca, cert, key); plaintext only with --insecure")
    return TlsFiles(ca=config.ca, cert=config.cert, key=config.key)

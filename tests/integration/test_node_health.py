"""A node whose audit log cannot be written releases nothing and reports NOT_SERVING."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtre.pki import Role, init_ca, issue
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v2 import node_pb2 as npb
from fedtre.v2 import node_pb2_grpc
from node.config import NodeConfig, parse_node_config
from node.ledger import project_scope
from node.server import create_server

SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


@pytest.fixture
def secured(tmp_path: Path, node_config_factory: Callable[..., NodeConfig]) -> NodeConfig:
    pki = tmp_path / "pki"
    init_ca(pki)
    issue(pki, Role.NODE, "trust-test")
    issue(pki, Role.COORDINATOR, "hub")
    base = node_config_factory()
    tls = TlsFiles.in_pki_dir(pki, Role.NODE, "trust-test")
    data = {
        "node_id": base.node_id,
        "database": str(base.database),
        "state_dir": str(base.state_dir),
        "node_epsilon_ceiling": 100.0,
        "projects": {
            "study": {
                "total_epsilon": 5.0,
                "max_epsilon_per_query": 1.0,
                "views": ["patients"],
                "max_tier": "general",
            }
        },
        "server": {
            "listen": "127.0.0.1:0",
            "coordinator": "hub",
            "ca": str(tls.ca),
            "cert": str(tls.cert),
            "key": str(tls.key),
        },
    }
    return parse_node_config(data, base_dir=tmp_path, source="test")


def test_audit_failure_fails_closed_and_reports_not_serving(secured: NodeConfig) -> None:
    running = create_server(secured)
    pki = Path(str(secured.server.ca)).parent  # type: ignore[union-attr]
    files = TlsFiles.in_pki_dir(pki, Role.COORDINATOR, "hub")
    try:
        with grpc.secure_channel(
            running.address, channel_credentials(files), options=channel_options("trust-test")
        ) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            prepared = stub.Prepare(
                npb.PrepareRequest(
                    query_id="h-1", project_id="study", sql=SQL, epsilon_units=100_000
                ),
                timeout=10,
            )
            assert prepared.outcome == npb.OUTCOME_PREPARED, prepared.reason
            ok = stub.Commit(npb.DecisionRequest(query_id="h-1", project_id="study"), timeout=10)
            assert ok.outcome == npb.OUTCOME_COMMITTED
            assert ok.budget.spent_units == 100_000
            os.close(running.engine.audit._fd)  # the audit disk goes away
            running.engine.audit._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail
            failed = stub.Prepare(
                npb.PrepareRequest(
                    query_id="h-2", project_id="study", sql=SQL, epsilon_units=100_000
                ),
                timeout=10,
            )
            assert failed.outcome == npb.OUTCOME_FAILED
            assert "audit" in failed.reason
            assert not failed.HasField("result")
            assert running.engine.ledger.spent(project_scope("study")) == 100_000
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.server.stop(0).wait()  # the engine cannot audit its own close any more

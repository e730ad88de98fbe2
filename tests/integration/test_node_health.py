"""A node whose audit log cannot be written releases nothing and reports NOT_SERVING, and
serves again once it can write."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtre.audit.log import read_audit
from fedtre.audit.verify import verify
from fedtre.pki import Role, init_ca, issue
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v2 import node_pb2 as npb
from fedtre.v2 import node_pb2_grpc
from node.config import NodeConfig, parse_node_config
from node.ledger import project_scope
from node.server import create_server
from tests.integration.full_disk import fill, settle, small_filesystem

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


def test_a_full_disk_fails_closed_reports_not_serving_and_recovers(
    secured: NodeConfig,
) -> None:
    """The state directory on a real, small filesystem that fills up: the node releases
    nothing and reports NOT_SERVING; once space returns it serves again, says so in its log
    (``audit.resumed``), and the log verifies."""
    with small_filesystem(secured.state_dir):
        running = create_server(secured)
        pki = Path(str(secured.server.ca)).parent  # type: ignore[union-attr]
        files = TlsFiles.in_pki_dir(pki, Role.COORDINATOR, "hub")
        try:
            with grpc.secure_channel(
                running.address, channel_credentials(files), options=channel_options("trust-test")
            ) as channel:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)

                def status() -> int:
                    return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

                prepared = stub.Prepare(_prepare("h-1"), timeout=10)
                assert prepared.outcome == npb.OUTCOME_PREPARED, prepared.reason
                ok = stub.Commit(
                    npb.DecisionRequest(query_id="h-1", project_id="study"), timeout=10
                )
                assert ok.outcome == npb.OUTCOME_COMMITTED
                assert ok.budget.spent_units == 100_000
                settle(secured.ledger_path)
                filler = fill(secured.state_dir)  # the disk fills up
                failed = stub.Prepare(_prepare("h-2"), timeout=10)
                assert failed.outcome == npb.OUTCOME_FAILED
                assert "audit" in failed.reason
                assert not failed.HasField("result")
                assert running.engine.ledger.spent(project_scope("study")) == 100_000
                assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
                filler.unlink()  # space returns
                deadline = time.monotonic() + 15
                while status() != health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline, "the node did not resume"
                    time.sleep(0.1)
                again = stub.Prepare(_prepare("h-2"), timeout=10)
                assert again.outcome == npb.OUTCOME_PREPARED, again.reason
        finally:
            running.stop(grace=0)
        events = [e["event"] for e in read_audit(secured.ledger_path)]
        assert "audit.resumed" in events
        assert verify(secured.ledger_path).ok


def _prepare(query_id: str) -> npb.PrepareRequest:
    return npb.PrepareRequest(query_id=query_id, project_id="study", sql=SQL, epsilon_units=100_000)

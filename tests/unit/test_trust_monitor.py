"""The coordinator's trust monitor and fan-out with fake links: a trust that serves another
catalog is never sent a query, and health follows whether every project's rule can be met."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coordinator.config import parse_coordinator_config
from coordinator.fanout import Trusts
from coordinator.links import LinkDown
from coordinator.server import TrustMonitor
from fedtre.protocol import (
    Decision,
    NodeDescription,
    NodeOutcome,
    OutcomeKind,
    PrepareRequest,
)
from fedtre.serving import Health


@dataclass
class FakeLink:
    node_id: str
    catalog: str = "2.0.0"
    up: bool = True
    asked: list[str] = field(default_factory=list)

    def prepare(self, request: PrepareRequest, timeout: float) -> NodeOutcome:
        self.asked.append("prepare")
        return NodeOutcome(
            OutcomeKind.PREPARED,
            self.node_id,
            request.project_id,
            request.query_id,
            request.epsilon_units,
        )

    def commit(self, decision: Decision, timeout: float) -> NodeOutcome:
        raise AssertionError("not used")

    def abort(self, decision: Decision, timeout: float) -> NodeOutcome:
        raise AssertionError("not used")

    def budget(self, project_id: str, timeout: float) -> NodeOutcome:
        raise AssertionError("not used")

    def describe(self, timeout: float, checkpoints: tuple[str, ...] = ()) -> NodeDescription:
        self.asked.append("describe")
        if not self.up:
            raise LinkDown("down")
        return NodeDescription(self.node_id, self.catalog, "digest", ("study",))

    def reachable(self) -> bool:
        return self.up

    def status(self) -> str:
        return "fake"

    def close(self) -> None:
        pass


def _config(partial: bool):  # type: ignore[no-untyped-def]
    return parse_coordinator_config(
        {
            "coordinator_id": "hub",
            "listen": "127.0.0.1:0",
            "state_dir": "state",
            "nodes": {"trust-a": {"address": "a:1"}, "trust-b": {"mode": "dial-out"}},
            "projects": {
                "study": {
                    "researchers": ["alice"],
                    "max_epsilon_per_query": 1.0,
                    "allow_partial": partial,
                }
            },
        },
        Path("/tmp"),
        "t",
    )


def _serving(health: Health) -> bool:
    from grpc_health.v1 import health_pb2

    reply = health.servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_trust_with_another_catalog_is_never_sent_a_query() -> None:
    links = {"trust-a": FakeLink("trust-a"), "trust-b": FakeLink("trust-b", catalog="9.9.9")}
    trusts = Trusts(links)
    health = Health(("x",))
    monitor = TrustMonitor(_config(partial=False), trusts, links, health)
    monitor.check()
    assert trusts.mismatched == {"trust-b"}
    assert not _serving(health)  # the project needs every trust
    request = PrepareRequest("q-1", "study", "SELECT COUNT(*) FROM patients", 100_000, "alice")
    outcomes = {o.node_id: o for o in trusts.prepare(["trust-a", "trust-b"], request, 5.0)}
    assert outcomes["trust-a"].kind is OutcomeKind.PREPARED
    assert outcomes["trust-b"].kind is OutcomeKind.FAILED
    assert "catalog" in outcomes["trust-b"].reason
    assert links["trust-b"].asked == ["describe"]  # never asked to prepare
    trusts.close()


def test_health_follows_the_projects_rules() -> None:
    links = {"trust-a": FakeLink("trust-a"), "trust-b": FakeLink("trust-b")}
    for partial, expect_when_b_down in ((False, False), (True, True)):
        links["trust-b"].up = True
        trusts = Trusts(links)
        health = Health(("x",))
        monitor = TrustMonitor(_config(partial), trusts, links, health)
        monitor.check()
        assert _serving(health)
        links["trust-b"].up = False
        monitor.check()
        assert _serving(health) is expect_when_b_down
        links["trust-b"].up = True
        monitor.check()
        assert _serving(health)
        trusts.close()

"""Outbound-only nodes: the node checks everything itself over the link, exactly as in dial-in
mode, and both ends check who is on the other end.

A fake coordinator (the real coordinator's certificate, our own servicer) sends the node what a
compromised coordinator could send; the real coordinator is probed with the wrong certificates.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fedtre.audit.log import read_audit
from fedtre.errors import Refusal
from fedtre.pki import Role, issue
from fedtre.protocol import (
    Call,
    Decision,
    Hello,
    LinkReply,
    LinkRequest,
    OutcomeKind,
    PrepareRequest,
)
from fedtre.serde.link import (
    link_reply_from_proto,
    link_reply_to_proto,
    link_request_to_proto,
)
from fedtre.tls import TlsFiles, channel_credentials, channel_options, server_credentials
from fedtre.v2 import link_pb2 as lpb
from fedtre.v2 import link_pb2_grpc
from node.config import parse_node_config
from node.server import create_server
from tests.conftest import private_database
from tests.integration.federation import (
    PROJECT,
    Federation,
    make_databases,
    make_pki,
)

SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


class FakeCoordinator(link_pb2_grpc.TrustLinkServiceServicer):
    """Accepts one node stream and lets the test send it anything."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[LinkRequest | None] = queue.Queue()
        self.replies: queue.Queue[LinkReply] = queue.Queue()
        self.hello: Hello | None = None
        self.connected = threading.Event()

    def Connect(
        self, request_iterator: Iterator[lpb.NodeToCoordinator], context: grpc.ServicerContext
    ) -> Iterator[lpb.CoordinatorToNode]:
        first = link_reply_from_proto(next(request_iterator))
        self.hello = first.hello
        self.connected.set()

        def read() -> None:
            try:
                for msg in request_iterator:
                    reply = link_reply_from_proto(msg)
                    if reply.call_id:
                        self.replies.put(reply)
            except grpc.RpcError:  # the node hung up
                pass

        threading.Thread(target=read, daemon=True).start()
        yield link_request_to_proto(LinkRequest(0, Call.HEARTBEAT))
        while True:
            try:
                item = self.outbox.get(timeout=1.0)
            except queue.Empty:
                item = LinkRequest(0, Call.HEARTBEAT)
            if item is None:
                return
            yield link_request_to_proto(item)

    def ask(self, request: LinkRequest, timeout: float = 15.0) -> LinkReply:
        self.outbox.put(request)
        return self.replies.get(timeout=timeout)


def _serve_fake(files: TlsFiles) -> tuple[grpc.Server, str, FakeCoordinator]:
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    link_pb2_grpc.add_TrustLinkServiceServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    server.start()
    return server, f"127.0.0.1:{port}", fake


def _dial_out_node(tmp: Path, pki: Path, database: Path, address: str):  # type: ignore[no-untyped-def]
    tls = TlsFiles.in_pki_dir(pki, Role.NODE, "trust-a")
    data = {
        "node_id": "trust-a",
        "database": str(private_database(tmp, database)),
        "state_dir": str(tmp / "state"),
        "node_epsilon_ceiling": 10.0,
        "answer_slot_ms": 10,
        "projects": {
            PROJECT: {
                "total_epsilon": 1.0,
                "max_epsilon_per_query": 0.5,
                "views": ["patients"],
                "max_tier": "general",
            }
        },
        "server": {
            "mode": "dial-out",
            "connect": address,
            "coordinator": "hub",
            "ca": str(tls.ca),
            "cert": str(tls.cert),
            "key": str(tls.key),
        },
    }
    return create_server(parse_node_config(data, base_dir=tmp, source="test"))


@pytest.fixture(scope="module")
def trust_db(tmp_path_factory: pytest.TempPathFactory, catalog) -> Path:  # type: ignore[no-untyped-def]
    return make_databases(tmp_path_factory.mktemp("trusts"), catalog)["trust-a"]


def test_a_dial_out_node_checks_everything_itself(
    tmp_path: Path, pki: Path, trust_db: Path
) -> None:
    server, address, fake = _serve_fake(TlsFiles.in_pki_dir(pki, Role.COORDINATOR, "hub"))
    running = _dial_out_node(tmp_path, pki, trust_db, address)
    try:
        assert fake.connected.wait(15), "the node never dialled in"
        assert fake.hello == Hello("trust-a", running.engine.catalog.version)
        cases = [
            ("made-up", 100_000, Refusal.UNKNOWN_PROJECT),
            (PROJECT, 600_000, Refusal.OUT_OF_SCOPE),  # over the node's own per-query cap
            (PROJECT, 0, Refusal.INVALID_EPSILON),
        ]
        for i, (project, units, refusal) in enumerate(cases, start=1):
            prepare = PrepareRequest(f"x-{i}", project, SQL, units, "mallory")
            reply = fake.ask(LinkRequest(i, Call.PREPARE, 10.0, prepare=prepare))
            assert reply.call_id == i and reply.outcome is not None
            assert reply.outcome.kind is OutcomeKind.REFUSED, reply.outcome.reason
            assert reply.outcome.refusal is refusal
        # out of the project's views (conditions) and above its tier
        for i, sql in enumerate(
            (
                "SELECT COUNT(*) AS n FROM conditions",
                "SELECT mental_health, COUNT(*) AS n FROM visits GROUP BY mental_health",
            ),
            start=10,
        ):
            prepare = PrepareRequest(f"x-{i}", PROJECT, sql, 100_000, "mallory")
            reply = fake.ask(LinkRequest(i, Call.PREPARE, 10.0, prepare=prepare))
            assert reply.outcome is not None and reply.outcome.refusal is Refusal.OUT_OF_SCOPE
        # a commit for what was never prepared releases nothing
        reply = fake.ask(LinkRequest(20, Call.COMMIT, 10.0, decision=Decision("never", PROJECT)))
        assert reply.outcome is not None and reply.outcome.refusal is Refusal.NOT_PREPARED
        assert reply.outcome.result is None
        # a deadline shorter than the node's answer slot is refused before anything is spent
        prepare = PrepareRequest("x-30", PROJECT, SQL, 100_000, "mallory")
        reply = fake.ask(LinkRequest(30, Call.PREPARE, 0.001, prepare=prepare))
        assert reply.outcome is not None and reply.outcome.refusal is Refusal.DEADLINE_TOO_SHORT
        assert running.engine.budget(PROJECT).spent_units == 0
        # and a proper two-phase query works over the same stream
        prepare = PrepareRequest("ok-1", PROJECT, SQL, 100_000, "alice")
        prepared = fake.ask(LinkRequest(40, Call.PREPARE, 10.0, prepare=prepare))
        assert prepared.outcome is not None and prepared.outcome.kind is OutcomeKind.PREPARED
        assert prepared.outcome.result is None  # nothing data-dependent before the commit
        committed = fake.ask(LinkRequest(41, Call.COMMIT, 10.0, decision=Decision("ok-1", PROJECT)))
        assert committed.outcome is not None and committed.outcome.result is not None
        assert running.engine.budget(PROJECT).spent_units == 100_000
        events = [r["event"] for r in read_audit(running.engine.config.audit_path)]
        assert events.count("query.refused") >= 7  # every refusal audited at the node
    finally:
        fake.outbox.put(None)
        running.stop(grace=1)
        server.stop(0)


def test_a_dial_out_node_talks_only_to_its_coordinator(
    tmp_path: Path, pki: Path, trust_db: Path
) -> None:
    """A server holding a valid federation certificate of another name (here trust-b's) is
    not the coordinator: the node's TLS check refuses it, so it never says hello."""
    server, address, fake = _serve_fake(TlsFiles.in_pki_dir(pki, Role.NODE, "trust-b"))
    running = _dial_out_node(tmp_path, pki, trust_db, address)
    try:
        assert not fake.connected.wait(3)
    finally:
        running.stop(grace=1)
        server.stop(0)


def test_a_certificate_of_another_role_under_the_coordinators_name_is_not_the_coordinator(
    tmp_path: Path, pki: Path, trust_db: Path
) -> None:
    """Same CA, same name 'hub', but a node certificate (issued where the federation's PKI
    would refuse it: one name, one role): the node checks the role too and never says hello."""
    other = tmp_path / "same-ca"
    other.mkdir()
    for f in ("ca.pem", "ca.key"):
        (other / f).write_bytes((pki / f).read_bytes())
    issue(other, Role.NODE, "hub")
    server, address, fake = _serve_fake(TlsFiles.in_pki_dir(other, Role.NODE, "hub"))
    running = _dial_out_node(tmp_path, pki, trust_db, address)
    try:
        assert not fake.connected.wait(3)
    finally:
        running.stop(grace=1)
        server.stop(0)


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory, pki: Path, catalog) -> Iterator[Federation]:  # type: ignore[no-untyped-def]
    databases = make_databases(tmp_path_factory.mktemp("dbs"), catalog)
    fed = Federation(tmp_path_factory.mktemp("fed"), pki, databases, mode="mixed").start()
    yield fed
    fed.stop()


def _connect(fed: Federation, role: Role, name: str, hello_as: str) -> grpc.RpcError:
    files = TlsFiles.in_pki_dir(fed.pki, role, name)
    with grpc.secure_channel(
        fed.coordinator.address, channel_credentials(files), options=channel_options("hub")
    ) as channel:
        hello = link_reply_to_proto(LinkReply(0, hello=Hello(hello_as, "2.0.0")))
        stream = link_pb2_grpc.TrustLinkServiceStub(channel).Connect(iter([hello]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        return info.value


@pytest.mark.parametrize(
    ("role", "name", "hello_as"),
    [
        (Role.RESEARCHER, "alice", "trust-a"),  # not a node
        (Role.NODE, "trust-b", "trust-b"),  # a node, but configured dial-in
        (Role.NODE, "trust-a", "trust-c"),  # a dial-out node claiming to be another
    ],
    ids=["researcher", "dial-in-node", "claims-another-name"],
)
def test_the_coordinators_link_admits_only_its_dial_out_trusts(
    linked: Federation, role: Role, name: str, hello_as: str
) -> None:
    error = _connect(linked, role, name, hello_as)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    refused = linked.audit("coordinator")[-1]  # audited where it was refused: who, what, why
    assert refused["event"] == "call.refused"
    assert refused["method"] == "/fedtre.v2.TrustLinkService/Connect"
    assert refused["caller"] == f"{role.value}:{name}"
    with linked.client() as client:  # and the real links are untouched
        assert client.query(PROJECT, SQL, 0.1).released


def test_a_mixed_federation_answers_from_both_kinds_of_trust(linked: Federation) -> None:
    with linked.client() as client:
        result = client.query(PROJECT, SQL, 0.1)
    assert result.released
    assert set(result.covered_trusts) == {"trust-a", "trust-b", "trust-c"}

"""The federation end to end: real processes, loopback, ports from the OS, mutual TLS."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pytest

from fedtre.answer import NotReleased
from fedtre.audit.checkpoint import Checkpoint
from fedtre.audit.events import Event
from fedtre.audit.log import entries
from fedtre.audit.reconcile import reconcile
from fedtre.audit.verify import verify
from fedtre.catalog import Catalog, load_catalog
from fedtre.client import Client, ConnectionTrust, CoordinatorUnavailable, Profile
from fedtre.errors import Refusal, UserError
from fedtre.governance.query_signature import sign as sign_query
from fedtre.pki import Role
from fedtre.serde.common import refusal_from_proto, signed_query_to_proto
from fedtre.tls import NO_REQUEST, TlsFiles, channel_credentials, channel_options
from fedtre.v2 import coordinator_pb2 as cpb
from fedtre.v2 import coordinator_pb2_grpc, node_pb2_grpc
from fedtre.v2 import node_pb2 as npb
from tests.integration.federation import (
    PARTIAL,
    PROJECT,
    Federation,
    make_databases,
    make_pki,
)

BY_SEX = "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM patients GROUP BY sex"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> dict[str, Path]:
    return make_databases(tmp_path_factory.mktemp("trusts"), catalog)


@pytest.fixture(scope="module", params=["dial-in", "dial-out"])
def fed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pki: Path,
    databases: dict[str, Path],
) -> Iterator[Federation]:
    federation = Federation(
        tmp_path_factory.mktemp("fed"), pki, databases, mode=request.param
    ).start()
    yield federation
    codes = federation.stop()
    assert all(code == 0 for code in codes.values()), f"unclean shutdown: {codes}"


@pytest.fixture(params=["dial-in", "dial-out"])
def faulty(
    request: pytest.FixtureRequest, tmp_path: Path, pki: Path, databases: dict[str, Path]
) -> Iterator[Federation]:
    """A federation of its own, for tests that kill or freeze a trust."""
    federation = Federation(
        tmp_path, pki, _copies(tmp_path, databases), deadline=2.0, mode=request.param
    ).start()
    yield federation
    federation.stop()


def _copies(tmp: Path, databases: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for name, path in databases.items():
        out[name] = tmp / f"{name}.duckdb"
        out[name].write_bytes(path.read_bytes())
        out[name].chmod(0o600)  # person-level data: the node refuses it open to others
    return out


def _node_stub(fed: Federation, node: str, role: Role, name: str, pki: Path | None = None):  # type: ignore[no-untyped-def]
    files = TlsFiles.in_pki_dir(pki or fed.pki, role, name)
    channel = grpc.secure_channel(
        fed.nodes[node].address, channel_credentials(files), options=channel_options(node)
    )
    return channel, node_pb2_grpc.NodeServiceStub(channel)


def _dial_in_only(fed: Federation) -> None:
    if fed.mode != "dial-in":
        pytest.skip("calls a node's own port; the dial-out equivalents are in test_dial_out.py")


# -- a full query ---------------------------------------------------------------------------


def test_the_audit_logs_reconcile_verify_and_witness_each_other(fed: Federation) -> None:
    """First in this module, on a fresh federation: releases, a replay and refusals appear on
    both sides and reconcile; each trust's log verifies against the checkpoints the
    coordinator kept of it; the command-line tools say the same."""
    with fed.client() as client:
        client.query(PROJECT, BY_SEX, epsilon=0.1, query_id="audit-1")
        client.query(PROJECT, BY_SEX, epsilon=0.1, query_id="audit-1")  # a replay
        client.query(PARTIAL, BY_SEX, epsilon=0.1, query_id="audit-2")
        with pytest.raises(UserError):
            client.query(PROJECT, "SELECT * FROM patients", epsilon=0.1, query_id="audit-3")
    hub = fed.audit_path("coordinator")
    trusts = [fed.audit_path(n) for n in fed.nodes]
    found = reconcile([hub], trusts)
    assert found.ok, found.discrepancies
    assert found.trust_releases == 2 * len(fed.nodes)
    assert found.replays == len(fed.nodes)
    witnessed = list(entries(hub, (Event.CHECKPOINT_WITNESSED,)))
    for name, path in zip(fed.nodes, trusts, strict=True):
        kept = [Checkpoint.from_json(e["checkpoint"]) for e in witnessed if e["trust"] == name]
        assert kept and not any(e.get("problem") for e in witnessed)
        assert verify(path, kept).ok
    # ... and each trust keeps the coordinator's, and the other trusts' it was sent
    held: dict[str, list[Checkpoint]] = {}
    for path in trusts:
        for e in entries(path, (Event.CHECKPOINT_WITNESSED,)):
            assert not e.get("problem"), e
            cp = Checkpoint.from_json(e["checkpoint"])
            held.setdefault(cp.actor, []).append(cp)
    hub_id = fed.audit("coordinator")[0]["coordinator"]
    assert hub_id in held and set(held) - {hub_id}, held.keys()
    logs = {hub_id: hub, **dict(zip(fed.nodes, trusts, strict=True))}
    for actor, cps in held.items():
        assert verify(logs[actor], cps).ok, actor
    cli = [sys.executable, "-m", "fedtre.cli", "audit"]
    rec = subprocess.run(
        [*cli, "reconcile", "--coordinator", str(hub), *[f"--trust={t}" for t in trusts]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rec.returncode == 0 and "OK: every release" in rec.stdout, rec.stdout + rec.stderr
    ver = subprocess.run([*cli, "verify", str(hub)], capture_output=True, text=True, check=False)
    assert ver.returncode == 0 and ver.stdout.startswith("OK"), ver.stdout + ver.stderr


def test_full_query_covers_every_trust(fed: Federation) -> None:
    before = {n: fed.spent_units(n) for n in fed.nodes}
    with fed.client() as client:
        result = client.query(PROJECT, BY_SEX, epsilon=0.5)
    assert result.released
    assert result.covered_trusts == ("trust-a", "trust-b", "trust-c")
    assert [t.state for t in result.trusts] == ["answered"] * 3
    assert [c[0] for c in result.cells] == ["female", "male", "unknown"]
    for row in result.rows():
        assert row["n_ci_low"] <= row["n"] <= row["n_ci_high"]
    for t in result.trusts:
        assert t.epsilon_spent == 0.5
        assert t.epsilon_left == 50.0 - (fed.spent_units(t.node_id) / 1e6)
    assert all(fed.spent_units(n) - before[n] == 500_000 for n in fed.nodes)
    frame = result.to_pandas()
    assert list(frame.columns[:3]) == ["sex", "n", "n_ci_low"]
    assert frame.attrs["covered_trusts"] == ["trust-a", "trust-b", "trust-c"]
    # every answer says which reference date its ages use: the catalog's, at every trust
    assert result.reference_date == load_catalog().reference_date.isoformat()
    assert frame.attrs["reference_date"] == result.reference_date


def test_no_timing_of_any_trust_reaches_the_researcher(fed: Federation) -> None:
    """Per-trust handling times stay in the coordinator's operator log (issue 7, defect 6)."""
    assert "handling_ms" not in cpb.TrustStatus.DESCRIPTOR.fields_by_name
    assert "handling_ms" not in cpb.SubmitResponse.DESCRIPTOR.fields_by_name
    with fed.client() as client:
        result = client.query(PROJECT, BY_SEX, epsilon=0.1, query_id="no-timing")
    text = result.to_json() + result.table() + result.to_csv()
    assert "_ms" not in text and "handling" not in text
    for trust in result.trusts:
        assert set(vars(trust)) == {
            "node_id", "state", "reason", "refusal", "epsilon_spent", "epsilon_left", "replayed",
            "data_as_of",  # the date of the trust's extract: a date, never a time of the query
        }  # fmt: skip
        assert len(trust.data_as_of) == 10
    assert fed.coordinator is not None
    logged = [e for e in fed.log_lines("coordinator") if e.get("query_id") == "no-timing"]
    assert any(set(e.get("handling_ms", {})) == set(fed.nodes) for e in logged)


def test_federated_count_is_near_the_pooled_truth(
    fed: Federation, databases: dict[str, Path]
) -> None:
    with fed.client() as client:
        result = client.query(PROJECT, "SELECT COUNT(*) AS n FROM patients", epsilon=1.0)
    truth = 0
    for path in databases.values():
        with duckdb.connect(str(path), read_only=True) as con:
            truth += con.execute("SELECT COUNT(*) FROM patients").fetchone()[0]
    (row,) = result.rows()
    # Noise std at ε=1 is about 1.4 per trust: far inside ±60 unless combining is wrong.
    assert abs(row["n"] - truth) < 60
    assert row["n_ci_low"] <= row["n"] <= row["n_ci_high"]


def test_retry_of_a_query_id_replays_without_a_second_debit(fed: Federation) -> None:
    with fed.client() as client:
        first = client.query(PROJECT, BY_SEX, epsilon=0.2, query_id="retry-1")
        spent = {n: fed.spent_units(n) for n in fed.nodes}
        again = client.query(PROJECT, BY_SEX, epsilon=0.2, query_id="retry-1")
    assert again.rows() == first.rows()
    assert all(t.replayed for t in again.trusts)
    assert {n: fed.spent_units(n) for n in fed.nodes} == spent


def test_json_and_csv_outputs(fed: Federation) -> None:
    import json

    with fed.client() as client:
        result = client.query(PROJECT, BY_SEX, epsilon=0.1)
    doc = json.loads(result.to_json())
    assert doc["released"] is True and len(doc["rows"]) == 3
    lines = result.to_csv().splitlines()
    assert lines[0].startswith("sex,n,n_ci_low,n_ci_high,n_se,n_suppressed,mean_age")
    assert len(lines) == 4
    # each estimate carries its standard error: for a count, the noise's (public: it depends
    # on ε and the sensitivity only), the same in every cell
    ses = {row["n_se"] for row in doc["rows"]}
    assert len(ses) == 1 and next(iter(ses)) > 0
    assert all(row["mean_age_se"] > 0 for row in doc["rows"] if row["mean_age"] is not None)
    # counts are whole numbers in pandas (Int64), means are floats
    frame = result.to_pandas()
    assert str(frame["n"].dtype) == "Int64" and str(frame["n_ci_low"].dtype) == "Int64"
    assert frame["mean_age"].dtype.kind == "f"
    html = result._repr_html_()
    assert "<table>" in html and "trust-c" in html and "95% interval" in html


# -- refusals at the coordinator: nothing reaches any trust, nothing is spent ------------------


@pytest.mark.parametrize(
    ("project", "sql", "epsilon", "refusal"),
    [
        (PROJECT, "SELECT age, sex FROM patients", 0.1, Refusal.UNSUPPORTED_QUERY),
        (PROJECT, "SELECT COUNT(*) FROM read_csv('/etc/passwd')", 0.1, None),
        (PROJECT, BY_SEX, 5.0, Refusal.OUT_OF_SCOPE),
        (PROJECT, BY_SEX, float("nan"), Refusal.INVALID_EPSILON),
        (PROJECT, BY_SEX, -1.0, Refusal.INVALID_EPSILON),
        # ε = 0 is refused, not read as "the project's default" (issue 7, defect 7)
        (PROJECT, BY_SEX, 0.0, Refusal.INVALID_EPSILON),
        (PROJECT, BY_SEX, -0.0, Refusal.INVALID_EPSILON),
        ("no-such-project", BY_SEX, 0.1, Refusal.NOT_AUTHORISED),
        ("BAD PROJECT", BY_SEX, 0.1, Refusal.INVALID_REQUEST),
        (PROJECT, "", 0.1, None),
    ],
)
def test_coordinator_refuses_before_fan_out(
    fed: Federation, project: str, sql: str, epsilon: float, refusal: Refusal | None
) -> None:
    node_lines = {n: len(fed.audit(n)) for n in fed.nodes}
    spent = {n: fed.spent_units(n) for n in fed.nodes}
    with fed.client() as client, pytest.raises(UserError) as info:
        client.query(project, sql, epsilon)
    if refusal is not None:
        assert info.value.refusal is refusal
    assert info.value.message and "Traceback" not in info.value.message
    assert {n: len(fed.audit(n)) for n in fed.nodes} == node_lines  # no trust was asked
    assert {n: fed.spent_units(n) for n in fed.nodes} == spent
    assert fed.audit("coordinator")[-1]["event"] == "query.refused"


def test_researcher_not_on_the_project_is_refused(fed: Federation) -> None:
    with fed.client("mallory") as client, pytest.raises(UserError) as info:
        client.query(PROJECT, BY_SEX, 0.1)
    assert info.value.refusal is Refusal.NOT_AUTHORISED
    with fed.client("mallory") as client:
        assert client.projects() == []


def test_identity_in_metadata_is_ignored(fed: Federation) -> None:
    """mallory claims to be alice in metadata; the certificate decides."""
    assert fed.coordinator is not None
    files = TlsFiles.in_pki_dir(fed.pki, Role.RESEARCHER, "mallory")
    with grpc.secure_channel(
        fed.coordinator.address, channel_credentials(files), options=channel_options("hub")
    ) as channel:
        stub = coordinator_pb2_grpc.ResearcherServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(
                cpb.SubmitRequest(query_id="m-1", project_id=PROJECT, sql=BY_SEX, epsilon=0.1),
                metadata=(("x-researcher", "alice"), ("user", "alice")),
                timeout=10,
            )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_malformed_and_oversized_requests_are_refused(fed: Federation) -> None:
    assert fed.coordinator is not None
    files = TlsFiles.in_pki_dir(fed.pki, Role.RESEARCHER, "alice")
    with grpc.secure_channel(
        fed.coordinator.address, channel_credentials(files), options=channel_options("hub")
    ) as channel:
        stub = coordinator_pb2_grpc.ResearcherServiceStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            stub.Submit(cpb.SubmitRequest(), timeout=10)
        assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # no project id
        with pytest.raises(grpc.RpcError) as big:
            stub.Submit(
                cpb.SubmitRequest(query_id="big", project_id=PROJECT, sql="x" * 100_000),
                timeout=10,
            )
        assert big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        refused = fed.audit("coordinator")[-1]
        assert refused["event"] == "call.refused" and refused["caller"] == "researcher:alice"
        lines = len(fed.audit("coordinator"))
        # over gRPC's own limit (1 MiB; 8 MiB with dial-out trusts' answers): audited as well
        with pytest.raises(grpc.RpcError) as huge:
            stub.Submit(
                cpb.SubmitRequest(query_id="huge", project_id=PROJECT, sql="x" * 20_000_000),
                timeout=10,
            )
        assert huge.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        new = _new_audit_lines(fed, "coordinator", lines)
        assert [(e["event"], e["caller"], e["reason"]) for e in new] == [
            ("call.refused", "researcher:alice", NO_REQUEST)
        ]
        raw = channel.unary_unary("/fedtre.v2.ResearcherService/Submit")
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xfe\x00garbage", timeout=10)
        assert garbage.value.code() in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNKNOWN,
        )
    with fed.client() as client:  # still serving
        assert client.query(PROJECT, BY_SEX, 0.1).released


# -- the node's own checks ------------------------------------------------------------------


def test_a_node_refuses_what_it_has_not_approved_even_from_the_coordinator(
    fed: Federation,
) -> None:
    """Anyone holding the coordinator's certificate still cannot spend outside the trust's
    own approvals: unknown project, ε over the per-query cap."""
    _dial_in_only(fed)  # a dial-out node listens on nothing: tests/integration/test_dial_out.py
    channel, stub = _node_stub(fed, "trust-a", Role.COORDINATOR, "hub")
    spent = fed.spent_units("trust-a")
    with channel:
        cases = [
            ("made-up-project", 100_000, Refusal.UNKNOWN_PROJECT),
            (PROJECT, 2_000_000, Refusal.OUT_OF_SCOPE),
            (PROJECT, 0, Refusal.INVALID_EPSILON),
        ]
        for i, (project, units, refusal) in enumerate(cases):
            # signed by alice as her client would: the node's own rules still refuse
            files = TlsFiles.in_pki_dir(fed.pki, Role.RESEARCHER, "alice")
            signed = sign_query(files.key, files.cert, project, f"direct-{i}", BY_SEX, units / 1e6)
            reply = stub.Prepare(
                npb.PrepareRequest(
                    query_id=f"direct-{i}",
                    project_id=project,
                    sql=BY_SEX,
                    epsilon_units=units,
                    signed=signed_query_to_proto(signed),
                ),
                timeout=10,
            )
            assert reply.outcome == npb.OUTCOME_REFUSED, reply.reason
            assert refusal_from_proto(reply.refusal) is refusal, reply.reason
        empty = stub.Prepare(npb.PrepareRequest(), timeout=10)
        assert empty.outcome == npb.OUTCOME_REFUSED
        assert refusal_from_proto(empty.refusal) is Refusal.INVALID_REQUEST
        # a commit for an id never prepared releases nothing
        commit = stub.Commit(npb.DecisionRequest(query_id="never", project_id=PROJECT), timeout=10)
        assert commit.outcome == npb.OUTCOME_REFUSED and not commit.HasField("result")
        assert refusal_from_proto(commit.refusal) is Refusal.NOT_PREPARED
    assert fed.spent_units("trust-a") == spent
    events = [line["event"] for line in fed.audit("trust-a")[-10:]]
    assert events.count("query.refused") == 5  # each refusal audited


def test_a_node_accepts_only_the_coordinator_certificate(fed: Federation) -> None:
    _dial_in_only(fed)  # a dial-out node listens on nothing: tests/integration/test_dial_out.py
    lines = len(fed.audit("trust-a"))
    for role, name in ((Role.RESEARCHER, "alice"), (Role.NODE, "trust-b")):
        channel, stub = _node_stub(fed, "trust-a", role, name)
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.Prepare(
                npb.PrepareRequest(
                    query_id="x-1", project_id=PROJECT, sql=BY_SEX, epsilon_units=100_000
                ),
                timeout=10,
            )
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    new = fed.audit("trust-a")[lines:]
    # the handler never ran, and each refusal is audited: who, which method, why
    assert [e["event"] for e in new] == ["call.refused", "call.refused"]
    assert [e["caller"] for e in new] == ["researcher:alice", "node:trust-b"]
    assert all(e["method"] == "/fedtre.v2.NodeService/Prepare" for e in new)
    # an oversized request from the coordinator itself is refused and audited too
    channel, stub = _node_stub(fed, "trust-a", Role.COORDINATOR, "hub")
    with channel, pytest.raises(grpc.RpcError) as big:
        stub.Prepare(npb.PrepareRequest(query_id="big", sql="x" * 100_000), timeout=10)
    assert big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    last = fed.audit("trust-a")[-1]
    assert last["event"] == "call.refused" and "larger" in last["reason"]
    # and one over gRPC's own limit (1 MiB), which gRPC refuses before any handler runs
    lines = len(fed.audit("trust-a"))
    channel, stub = _node_stub(fed, "trust-a", Role.COORDINATOR, "hub")
    with channel, pytest.raises(grpc.RpcError) as huge:
        stub.Prepare(npb.PrepareRequest(query_id="huge", sql="x" * 2_000_000), timeout=10)
    assert huge.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    new = _new_audit_lines(fed, "trust-a", lines)
    assert [(e["event"], e["caller"], e["reason"]) for e in new] == [
        ("call.refused", "coordinator:hub", NO_REQUEST)
    ]


@pytest.mark.parametrize(
    ("which", "says"),
    [("other-ca", "not signed by the CA in your profile"), ("expired", "expired on")],
)
def test_bad_certificates_fail_the_handshake(fed: Federation, which: str, says: str) -> None:
    """Told apart from "the coordinator is down", with what to check."""
    lines = {n: len(fed.audit(n)) for n in [*fed.nodes, "coordinator"]}
    with (
        pytest.raises(ConnectionTrust, match=says),
        fed.client(pki=fed.pki / which, retries=0, timeout=5) as client,
    ):
        client.query(PROJECT, BY_SEX, 0.1)
    channel, stub = _node_stub(fed, "trust-a", Role.COORDINATOR, "hub", pki=fed.pki / which)
    with channel, pytest.raises(grpc.RpcError) as node_info:
        stub.Describe(npb.DescribeRequest(), timeout=5)
    assert node_info.value.code() is grpc.StatusCode.UNAVAILABLE
    # No call reached a handler. Another CA in the profile: the client refuses the server's
    # certificate, so no server refused anything. An expired certificate: the client checks
    # its own certificate before it connects (ConnectionTrust); the raw stub does not, and the
    # server it reaches (trust-a; dial-out: trust-a listens on nothing, its address is the
    # coordinator's) refuses the connection and audits it (who: nobody verified; why: TLS's).
    refused_at = ["trust-a"] if fed.mode == "dial-in" else ["coordinator"]
    for name in [*fed.nodes, "coordinator"]:
        expect = which == "expired" and name in refused_at
        new = _new_audit(fed, name, lines[name], wait=expect)
        assert all(_handshake_refusal(e) for e in new), new
        assert bool(new) == expect, (name, new)


def _handshake_refusal(entry: dict[str, Any]) -> bool:
    return (
        entry["event"] == "call.refused"
        and entry["method"] == "tls-handshake"
        and entry["caller"] == "unverified peer"
        and bool(entry["reason"])
    )


def _connections(entry: dict[str, Any]) -> int:
    found = re.search(r"\((\d+) connection\(s\) in or out\)$", entry.get("reason", ""))
    return int(found.group(1)) if found and _handshake_refusal(entry) else 0


def _new_audit(
    fed: Federation, name: str, since: int, wait: bool, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The audit entries written after the first ``since``; with ``wait``, at least one (a
    refused handshake is audited by the thread reading gRPC's log, a moment later)."""
    stop = time.monotonic() + timeout
    while True:
        new = fed.audit(name)[since:]
        if new or not wait or time.monotonic() > stop:
            return new
        time.sleep(0.05)


def test_a_wrong_coordinator_name_and_a_down_coordinator_say_different_things(
    fed: Federation, tmp_path: Path
) -> None:
    files = TlsFiles.in_pki_dir(fed.pki, Role.RESEARCHER, "alice")
    wrong = Client(Profile(fed.coordinator.address, "not-hub", files), retries=0, timeout=5)
    with wrong, pytest.raises(ConnectionTrust, match="coordinator_name"):
        wrong.projects()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    down = Client(Profile(nobody, "hub", files), retries=0, timeout=5)
    with down, pytest.raises(CoordinatorUnavailable) as info:
        down.projects()
    assert not isinstance(info.value, ConnectionTrust)
    assert "could not be reached" in str(info.value)


def test_missing_client_certificate_fails_the_handshake(fed: Federation) -> None:
    ca = (fed.pki / "ca.pem").read_bytes()
    for address, name in ((fed.nodes["trust-a"].address, "trust-a"),):
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(address, creds, options=channel_options(name)) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Describe(npb.DescribeRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(fed.nodes["trust-a"].address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as plain:
            stub.Describe(npb.DescribeRequest(), timeout=5)
    assert plain.value.code() is grpc.StatusCode.UNAVAILABLE


def test_refused_handshakes_are_audited_and_grpc_logs_are_json(fed: Federation) -> None:
    """At a dial-in node, or (dial-out) at the coordinator the nodes dial."""
    name, server, role = (
        ("trust-a", "trust-a", Role.NODE)
        if fed.mode == "dial-in"
        else ("coordinator", "hub", Role.COORDINATOR)
    )
    proc = fed.nodes.get(name, fed.coordinator)
    since = len(fed.audit(name))
    ca = (fed.pki / "ca.pem").read_bytes()
    other = fed.pki / "other-ca"
    attempts = [  # no certificate; another CA's certificate; plaintext
        grpc.ssl_channel_credentials(root_certificates=ca),
        grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(other / "coordinator-hub.key").read_bytes(),
            certificate_chain=(other / "coordinator-hub.pem").read_bytes(),
        ),
        None,
    ]
    for creds in attempts:
        channel = (
            grpc.insecure_channel(proc.address)
            if creds is None
            else grpc.secure_channel(proc.address, creds, options=channel_options(server, role))
        )
        with channel, pytest.raises(grpc.RpcError) as info:
            node_pb2_grpc.NodeServiceStub(channel).Describe(npb.DescribeRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    # Audited as counts: the first failure of each kind at once, the rest of a 10 s window
    # at its end (a flood of bad connections costs a few records, not one each).
    stop = time.monotonic() + 15
    while sum(_connections(e) for e in fed.audit(name)[since:]) < 3:
        assert time.monotonic() < stop, fed.audit(name)[since:]
        time.sleep(0.1)
    new = fed.audit(name)[since:]
    assert all(_handshake_refusal(e) for e in new), new
    reasons = " ".join(e["reason"] for e in new)
    assert "CERTIFICATE" in reasons.upper()  # the TLS library's own words, for trust IT
    # gRPC's C core wrote those failures on its stderr: they arrive as JSON lines too
    logged = [e for e in fed.log_lines(name) if e.get("event") == "tls.handshake_failed"]
    assert logged and all(e["why"] for e in logged)
    assert {e["why"] for e in logged} >= {e["reason"].rsplit(" (", 1)[0] for e in new}
    raw = proc.log.read_text().splitlines()
    assert not [line for line in raw if re.match(r"^[IWEF]\d{4} ", line)], "unformatted gRPC line"


def test_health_service_reports_serving(fed: Federation) -> None:
    _dial_in_only(fed)  # a dial-out node listens on nothing: tests/integration/test_dial_out.py
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel, _ = _node_stub(fed, "trust-b", Role.COORDINATOR, "hub")
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedtre.v2.NodeService"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- faults ---------------------------------------------------------------------------------


def _retry_until_released(client, query_id: str, epsilon: float = 0.3):  # type: ignore[no-untyped-def]
    """What a researcher does after a partial answer: ask again with the same query id (the
    coordinator's channel to a restarted trust reconnects within its 2 s backoff)."""
    for _ in range(40):
        result = client.query(
            PROJECT, BY_SEX, epsilon, query_id=query_id, raise_if_not_released=False
        )
        if result.released:
            return result
        time.sleep(0.25)
    raise AssertionError("never released")


def test_a_killed_node_is_marked_unavailable_and_not_debited(faulty: Federation) -> None:
    with faulty.client() as client:
        faulty.signal("trust-b", signal.SIGSTOP)  # hold it mid-way, then kill it
        outcome: dict[str, object] = {}

        def run() -> None:
            start = time.monotonic()
            outcome["result"] = client.query(PARTIAL, BY_SEX, 0.3, query_id="kill-1")
            outcome["seconds"] = time.monotonic() - start

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        faulty.signal("trust-b", signal.SIGKILL)
        worker.join(timeout=30)
        result = outcome["result"]
        assert outcome["seconds"] < faulty.deadline + 1.5  # type: ignore[operator]
        states = {t.node_id: t.state for t in result.trusts}  # type: ignore[attr-defined]
        assert states == {"trust-a": "answered", "trust-b": "unavailable", "trust-c": "answered"}
        assert result.released and result.covered_trusts == ("trust-a", "trust-c")  # type: ignore[attr-defined]
        assert faulty.spent_units("trust-b", f"project:{PARTIAL}") == 0
        # A project where every trust must answer withholds the partial result, and the
        # trusts that prepared withdraw their answers: nothing is spent anywhere.
        spent_a = faulty.spent_units("trust-a")
        with pytest.raises(NotReleased) as raised:  # the API raises, with the trusts' states
            client.query(PROJECT, BY_SEX, 0.3, query_id="kill-2")
        assert raised.value.status == "withheld" and raised.value.trusts["trust-b"] == "unavailable"
        withheld = raised.value.result
        assert not withheld.released and "trust-b" in withheld.withheld_reason
        assert withheld.rows() == [] or withheld.columns == ()
        states = {t.node_id: t.state for t in withheld.trusts}
        assert states == {"trust-a": "withdrawn", "trust-b": "unavailable", "trust-c": "withdrawn"}
        assert all(t.epsilon_spent == 0 for t in withheld.trusts)
        assert faulty.spent_units("trust-a") == spent_a
        assert faulty.spent_units("trust-c") == 0  # the study project spent nothing there
        # The trust comes back; the retry is answered everywhere and debited once at each.
        faulty.restart_node("trust-b")
        again = _retry_until_released(client, "kill-2")
        assert len(again.covered_trusts) == 3
        assert faulty.spent_units("trust-a") == spent_a + 300_000
        assert faulty.spent_units("trust-b") == 300_000  # debited once, now


def test_a_frozen_node_cannot_hold_the_query_past_the_deadline(faulty: Federation) -> None:
    with faulty.client() as client:
        assert client.query(PARTIAL, BY_SEX, 0.1).released  # connections are up
        faulty.signal("trust-c", signal.SIGSTOP)
        try:
            start = time.monotonic()
            result = client.query(
                PROJECT, BY_SEX, 0.25, query_id="freeze-1", raise_if_not_released=False
            )
            took = time.monotonic() - start
        finally:
            faulty.signal("trust-c", signal.SIGCONT)
        assert took < faulty.deadline + 1.5
        states = {t.node_id: t.state for t in result.trusts}
        assert states["trust-c"] == "unavailable" and not result.released
        assert "deadline" in next(t.reason for t in result.trusts if t.node_id == "trust-c")
        # Woken up, the node finds its caller gone and spends nothing for that request.
        time.sleep(1.0)
        assert faulty.spent_units("trust-c") == 0
        _retry_until_released(client, "freeze-1", epsilon=0.25)
        assert faulty.spent_units("trust-c") == 250_000


# -- the researcher's command line and the operators' logs ----------------------------------


def test_fedtre_query_command_prints_table_json_and_csv(fed: Federation, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    assert fed.coordinator is not None
    files = TlsFiles.in_pki_dir(fed.pki, Role.RESEARCHER, "alice")
    profile = tmp_path / "alice.toml"
    profile.write_text(
        f'coordinator = "{fed.coordinator.address}"\ncoordinator_name = "hub"\n'
        f'ca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
    )

    def fedtre(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedtre.cli", *args, "--profile", str(profile)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    table = fedtre("query", "--project", PROJECT, "--epsilon", "0.1", BY_SEX)
    assert table.returncode == 0, table.stderr
    assert "95% interval" in table.stdout and "trust-c" in table.stdout
    doc = json.loads(fedtre("query", "--project", PROJECT, "--format", "json", BY_SEX).stdout)
    assert doc["covered_trusts"] == ["trust-a", "trust-b", "trust-c"]
    assert doc["epsilon_per_trust"] == 0.1  # the project's default
    csv_out = fedtre("query", "--project", PROJECT, "--format", "csv", BY_SEX).stdout
    assert csv_out.splitlines()[0].startswith("sex,n,")
    refused = fedtre("query", "--project", PROJECT, "SELECT * FROM patients")
    assert refused.returncode == 2 and "refused" in refused.stderr
    spent = {n: fed.spent_units(n) for n in fed.nodes}
    for zero in ("0", "-0", "0.0"):  # never "the project's default"
        refused = fedtre("query", "--project", PROJECT, "--epsilon", zero, BY_SEX)
        assert refused.returncode == 2 and "positive" in refused.stderr, refused.stderr
    assert {n: fed.spent_units(n) for n in fed.nodes} == spent
    projects = fedtre("projects", "--format", "json")
    assert [p["project_id"] for p in json.loads(projects.stdout)] == [PARTIAL, PROJECT]
    budget = json.loads(fedtre("budget", "--project", PROJECT, "--format", "json").stdout)
    assert [b["trust"] for b in budget] == ["trust-a", "trust-b", "trust-c"]
    assert all(0 < b["epsilon_left"] < 50 for b in budget)
    # suppression off for 'study': never "< 0"; views, tier, default ε and budget per trust
    listing = fedtre("projects").stdout
    assert "< 0" not in listing and "no suppression" in listing
    assert "views: conditions, patients, visits; tier: mental_health" in listing
    assert "default 0.1" in listing and listing.count("ε left") == 6  # 2 projects × 3 trusts
    # discovery: the catalog the coordinator serves, as the trusts load it
    shown = fedtre("catalog", "show", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["version"] == load_catalog().version
    conditions = next(v for v in doc["views"] if v["view"] == "conditions")
    groups = next(c for c in conditions["columns"] if c["column"] == "condition_group")
    assert groups["value_tiers"]["self_harm"] == "highly_sensitive"
    with fed.client() as client:
        assert client.catalog().digest == load_catalog().digest
    # --explain: the cost, the cells and the expected error, with nothing spent
    before = {n: fed.spent_units(n) for n in fed.nodes}
    explained = fedtre("query", "--project", PROJECT, "--explain", "--format", "json", BY_SEX)
    assert explained.returncode == 0, explained.stderr
    plan = json.loads(explained.stdout)
    assert {n: fed.spent_units(n) for n in fed.nodes} == before
    assert plan["epsilon_per_trust"] == 0.1 and len(plan["cells"]) == 3
    count = next(s for s in plan["statistics"] if s["aggregate"] == "n")
    assert count["sensitivity"] == 1
    # the prediction is the interval the answer then carries (no rounding in this project)
    with fed.client() as client:
        answer = client.query(PROJECT, BY_SEX, 0.1)
    n = next(c for c in answer.columns if c.alias == "n")
    widths = {e.high - e.value for e in n.estimates if e.value is not None and e.low > 0}
    assert widths == {count["half_width_95"]}
    spent = {n: fed.spent_units(n) for n in fed.nodes}
    # refused by every trust's own rules (above the project's tier): said in every format,
    # never an empty stdout, exit 2
    self_harm = "SELECT COUNT(*) AS n FROM conditions WHERE condition_group = 'self_harm'"
    for fmt in ("table", "json", "csv"):
        out = fedtre("query", "--project", PROJECT, "--format", fmt, self_harm)
        assert out.returncode == 2, (fmt, out.stderr)
        assert out.stdout.strip() and "refused" in out.stderr
        assert "refused" in out.stdout
    doc = json.loads(fedtre("query", "--project", PROJECT, "--format", "json", self_harm).stdout)
    assert doc["status"] == "refused" and doc["rows"] == []
    assert {t["state"] for t in doc["trusts"]} == {"refused"}
    assert {n: fed.spent_units(n) for n in fed.nodes} == spent  # nothing spent by refusals
    # a reader that stops early and a terminal that cannot show "ε" crash nothing
    piped = subprocess.run(
        f"{sys.executable} -m fedtre.cli query --profile {profile} --project {PROJECT} "
        f"--format csv '{BY_SEX}' | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in piped.stderr, piped.stderr
    query_args = ("--project", PROJECT, BY_SEX)
    ascii_run = subprocess.run(
        [sys.executable, "-m", "fedtre.cli", "query", "--profile", str(profile), *query_args],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
    )
    assert ascii_run.returncode == 0 and b"Traceback" not in ascii_run.stderr
    assert b"? spent" in ascii_run.stdout  # "ε spent", shown as best the terminal can


def test_operator_logs_are_json_lines_without_data(fed: Federation) -> None:
    with fed.client() as client:
        client.query(PROJECT, BY_SEX, 0.1)
    events = fed.log_lines("coordinator")
    assert any(e.get("event") == "serving" and e.get("service") == "coordinator" for e in events)
    node_events = fed.log_lines("trust-a")
    assert any(e.get("event") == "serving" for e in node_events)
    text = fed.nodes["trust-a"].log.read_text() + fed.coordinator.log.read_text()
    assert "SELECT" not in text  # queries are in the audit log, not the operators' log
    # one line per request at the node and per query at the coordinator: ids, outcome, ε, time
    requests = [e for e in node_events if e.get("event") == "request"]
    assert {e["call"] for e in requests} >= {"prepare", "commit"}
    assert {"query_id", "project", "outcome", "epsilon_units", "ms"} <= set(requests[0])
    queries = [e for e in events if e.get("event") == "query"]
    assert queries and all(e["outcome"] in ("released", "withheld") for e in queries)
    allowed = {"ts", "level", "service", "event", "node", "call", "query_id", "project",
               "outcome", "refusal", "epsilon_units", "ms"}  # fmt: skip
    assert all(set(e) <= allowed for e in requests), "no other field, so no value"


def test_the_coordinator_reports_not_serving_while_a_needed_trust_is_down(
    faulty: Federation,
) -> None:
    """Project 'study' needs every trust: with one down the coordinator cannot meet its rule,
    says so on its health service, and logs the trust going down and coming back."""
    assert faulty.coordinator_serving()
    faulty.kill("trust-b")
    deadline = time.monotonic() + 15
    while faulty.coordinator_serving():
        assert time.monotonic() < deadline, "still SERVING with a needed trust down"
        time.sleep(0.2)
    faulty.restart_node("trust-b")
    deadline = time.monotonic() + 15
    while not faulty.coordinator_serving():
        assert time.monotonic() < deadline, "not SERVING after the trust came back"
        time.sleep(0.2)
    events = [(e.get("event"), e.get("node")) for e in faulty.log_lines("coordinator")]
    assert ("trust down", "trust-b") in events and ("trust up", "trust-b") in events


def _new_audit_lines(fed: Federation, name: str, after: int) -> list[dict[str, Any]]:
    """Audit lines after the first ``after``, once one has appeared (gRPC answers a caller
    whose request it refused itself, and the server's policy audits it just after)."""
    deadline = time.monotonic() + 10
    while len(fed.audit(name)) <= after:
        assert time.monotonic() < deadline, f"no new audit line at {name}"
        time.sleep(0.02)
    time.sleep(0.2)  # nothing else follows
    return fed.audit(name)[after:]

"""Governance enforced at every node, on real processes with mutual TLS (dial-in trusts, so a
test can call a node directly with the coordinator's certificate, as a compromised
coordinator could).

- The walk-through a new user would do, by the commands of README's governance section:
  submit, review (a service user and a clinician), each trust's data guardian signs, query,
  revoke, refused.
- THREATS.md "Governance and identity" at the node: forged, tampered, replayed, under-signed,
  no service user, revoked also when the coordinator withholds the revocation (the trust
  imports it itself). Each refused by the node with a plain reason, audited, nothing spent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtre.audit.verify import verify
from fedtre.errors import Refusal
from fedtre.governance import statements
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import Signed, Verdict
from fedtre.governance.keys import SigningKey
from fedtre.governance.local import application
from fedtre.governance.query_signature import sign as sign_query
from fedtre.pki import Role
from fedtre.pki_requests import request, revoke, sign_request, write_crl
from fedtre.serde.common import refusal_from_proto
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v2 import common_pb2 as pb
from fedtre.v2 import node_pb2 as npb
from fedtre.v2 import node_pb2_grpc
from tests.integration.federation import PROJECT, Federation, make_databases, make_pki

BY_SEX = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
TRUSTS = ("trust-a", "trust-b", "trust-c")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, catalog) -> Iterator[Federation]:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    write_crl(pki, pki / "crl.pem")  # nobody revoked yet
    databases = make_databases(tmp_path_factory.mktemp("trusts"), catalog)
    federation = Federation(
        tmp_path_factory.mktemp("fed"), pki, databases, crl=pki / "crl.pem"
    ).start()
    yield federation
    codes = federation.stop()
    assert all(code == 0 for code in codes.values()), codes


def _fedtre(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "fedtre.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"fedtre {' '.join(args)}: {out.returncode}\n{out.stderr}")
    return out


def _signed(
    fed: Federation, project: str, qid: str, researcher: str = "alice", sql: str = BY_SEX
) -> pb.SignedQuery:
    """``researcher``'s signature over the query, made as their client makes it."""
    files = TlsFiles.in_pki_dir(fed.pki, Role.RESEARCHER, researcher)
    s = sign_query(files.key, files.cert, project, qid, sql, 0.1)
    return pb.SignedQuery(statement=s.statement, signature=s.signature, certificate=s.certificate)


def _prepare(  # type: ignore[no-untyped-def]
    fed: Federation,
    node: str,
    project: str,
    approval: bytes,
    qid: str,
    signed: pb.SignedQuery | None = None,
    sql: str = BY_SEX,
):
    """A Prepare straight to a node with the coordinator's certificate, signed by alice
    unless ``signed`` says otherwise."""
    if signed is None:
        signed = _signed(fed, project, qid)
    files = TlsFiles.in_pki_dir(fed.pki, Role.COORDINATOR, "hub")
    with grpc.secure_channel(
        fed.nodes[node].address, channel_credentials(files), options=channel_options(node)
    ) as channel:
        return node_pb2_grpc.NodeServiceStub(channel).Prepare(
            npb.PrepareRequest(
                query_id=qid,
                project_id=project,
                sql=sql,
                epsilon_units=100_000,
                researcher="alice",
                approval=approval,
                signed=signed,
            ),
            timeout=10,
        )


def _abort(fed: Federation, node: str, project: str, qid: str) -> None:
    files = TlsFiles.in_pki_dir(fed.pki, Role.COORDINATOR, "hub")
    with grpc.secure_channel(
        fed.nodes[node].address, channel_credentials(files), options=channel_options(node)
    ) as channel:
        reply = node_pb2_grpc.NodeServiceStub(channel).Abort(
            npb.DecisionRequest(query_id=qid, project_id=project), timeout=10
        )
    assert reply.outcome == npb.OUTCOME_ABORTED, reply.reason


def _refused_everywhere(
    fed: Federation,
    project: str,
    approval: bytes,
    qid: str,
    says: str,
    sign: Callable[[str], pb.SignedQuery] | None = None,
) -> None:
    """Each node refuses, says why, audits it, and spends nothing."""
    for node in TRUSTS:
        before = fed.spent_units(node, f"project:{project}")
        lines = len(fed.audit(node))
        node_qid = f"{qid}-{node}"
        signed = sign(node_qid) if sign is not None else None
        reply = _prepare(fed, node, project, approval, node_qid, signed)
        assert reply.outcome == npb.OUTCOME_REFUSED, (node, reply.reason)
        assert refusal_from_proto(reply.refusal) is Refusal.NOT_AUTHORISED, reply.reason
        assert says in reply.reason, (node, reply.reason)
        new = fed.audit(node)[lines:]
        assert [e["event"] for e in new] == ["query.received", "query.refused"], new
        assert says in new[-1]["reason"]
        assert fed.spent_units(node, f"project:{project}") == before


def test_the_governance_walk_through(fed: Federation, tmp_path: Path) -> None:
    gov = fed.governance
    registry = str(gov.registry.root)
    form = tmp_path / "application.toml"
    form.write_text(
        'project_id = "service-eval"\n'
        'title = "Waiting times for talking therapies"\n'
        'lay_summary = "How long do people wait for their first therapy appointment?"\n'
        'purpose = "nhs-service-evaluation"\n'
        'organisation = "Leeds and York Partnership NHS FT"\n'
        'organisation_type = "nhs"\n'
        'researchers = ["alice"]\nviews = ["patients"]\nmax_tier = "general"\n'
        f"trusts = {json.dumps(list(TRUSTS))}\n"
        "epsilon_per_trust = 2.0\nmax_epsilon_per_query = 0.5\nsuppress_below = 10\n"
        f"expires = {(dt.date.today() + dt.timedelta(days=200)).isoformat()}\n"
    )
    # 1. the researcher submits; nothing is approved yet, so nothing is answered
    assert (
        "submitted service-eval"
        in _fedtre("project", "submit", "--registry", registry, str(form)).stdout
    )
    profile = tmp_path / "alice.toml"
    profile.write_text(fed.profile_text("alice"))
    query = ["query", "--profile", str(profile), "--project", "service-eval", "--epsilon", "0.2"]
    refused = _fedtre(*query, BY_SEX, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "needs current approval by at least 2 committee members" in refused.stderr
    # 2. two members review: a service user and a clinician
    for member in ("ann", "bob"):
        _fedtre(
            "project", "review", "--registry", registry, "service-eval",
            "--key", str(gov.directory / f"{member}.key"), "--approve", "--reason", "sound",
        )  # fmt: skip
    shown = _fedtre(
        "project", "show", "--registry", registry, "service-eval",
        "--committee", str(gov.committee_path),
    ).stdout  # fmt: skip
    assert "ann (service-user): approve" in shown and "status: approved" in shown
    # service evaluation is not a purpose the trusts accept by rule: each guardian signs
    refused = _fedtre(*query, BY_SEX, check=False)
    assert refused.returncode == 2 and "data guardian has not signed" in refused.stderr
    for trust in TRUSTS:
        gov.guardian(trust)  # the key each trust's config names
        _fedtre(
            "project", "participate", "--registry", registry, "service-eval",
            "--trust", trust, "--key", str(gov.directory / f"guardian-{trust}.key"), "--accept",
        )  # fmt: skip
    # 3. the researcher's query is answered by every trust
    answered = _fedtre(*query, "--format", "json", BY_SEX)
    doc = json.loads(answered.stdout)
    assert doc["status"] == "released", doc
    today = dt.datetime.now(dt.UTC).date()
    for trust in doc["trusts"]:  # each trust's extract date (loaded today, no --extract-date)
        assert abs((dt.date.fromisoformat(trust["data_as_of"]) - today).days) <= 1, trust
    spent = {t: fed.spent_units(t, "project:service-eval") for t in TRUSTS}
    assert all(units == 200_000 for units in spent.values()), spent
    # 4. the committee revokes; the next query is refused, and so is every node asked directly
    out = tmp_path / "revocation.json"
    _fedtre(
        "project", "revoke", "--registry", registry, "service-eval",
        "--key", str(gov.directory / "bob.key"), "--reason", "consent withdrawn", "--out", str(out),
    )  # fmt: skip
    refused = _fedtre(*query, BY_SEX, check=False)
    assert refused.returncode == 2 and "revoked this project" in refused.stderr
    bundle = gov.registry.bundle("service-eval").to_bytes()
    _refused_everywhere(fed, "service-eval", bundle, "walk-revoked", "revoked this project")
    assert {t: fed.spent_units(t, "project:service-eval") for t in TRUSTS} == spent


def test_a_revocation_the_coordinator_withholds_reaches_each_node_by_import(
    fed: Federation, tmp_path: Path
) -> None:
    gov = fed.governance
    withheld = gov.registry.bundle(PROJECT).to_bytes()  # what a rogue coordinator keeps sending
    assert _prepare(fed, "trust-a", PROJECT, withheld, "before").outcome == npb.OUTCOME_PREPARED
    revocation = gov.revoke(PROJECT, by="ann", reason="safety concern")
    try:
        for node in TRUSTS:
            out = _fedtre(
                "node", "approvals", "import", "--config",
                str(fed.node_dir(node) / "config.toml"), str(revocation),
            ).stdout  # fmt: skip
            assert f"revocation of {PROJECT} by ann (service-user)" in out
        # the running nodes apply it from the next request, with the old bundle too
        _refused_everywhere(fed, PROJECT, withheld, "withheld", "revoked this project")
        listed = _fedtre(
            "node", "approvals", "list", "--config", str(fed.node_dir("trust-a") / "config.toml")
        ).stdout
        assert f"{PROJECT}: refused" in listed and "1 statement(s) imported" in listed
    finally:
        # the rest of the module's tests use a fresh project id
        for node in TRUSTS:
            for path in (fed.node_dir(node) / "state" / "imported").glob("*.json"):
                path.unlink()


def _forge(fed: Federation, project: str, kind: str) -> bytes:
    """An approval for ``project`` made wrong in one way (``kind``)."""
    gov = fed.governance
    honest = gov.registry.bundle(project)
    app = honest.application
    now = dt.datetime.now(dt.UTC)
    outsider = SigningKey(Ed25519PrivateKey.generate())  # a key the committee never listed

    def decide(key: SigningKey, data: bytes = app) -> Signed:
        return statements.decision(key, data, Verdict.APPROVE, "", now, dt.timedelta(days=30))

    if kind == "forged":
        return Bundle(app, (decide(gov.key("ann")), decide(outsider))).to_bytes()
    if kind == "tampered":
        doc = json.loads(app)
        doc["epsilon_per_trust"] = 500.0
        changed = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return Bundle(changed, honest.statements).to_bytes()
    if kind == "under-signed":
        return Bundle(app, (decide(gov.key("ann")),)).to_bytes()
    if kind == "no service user":
        return Bundle(app, (decide(gov.key("bob")),)).to_bytes()
    if kind == "other project":
        return gov.registry.bundle("partial").to_bytes()
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("forged", "not on this node's committee list"),
        ("tampered", "another version of the application"),
        ("under-signed", "it has 1"),
        ("no service user", "including 0 service user(s)"),
        ("other project", "for another project"),
    ],
)
def test_made_up_approvals_from_the_coordinator_s_certificate_are_refused(
    fed: Federation, kind: str, says: str
) -> None:
    project = "fresh-" + kind.replace(" ", "-")
    gov = fed.governance
    gov.approve(
        application(
            project,
            researchers=("alice",),
            trusts=TRUSTS,
            views=("patients",),
            max_tier="general",
            epsilon_per_trust=5.0,
            max_epsilon_per_query=1.0,
            default_epsilon=None,
            allow_partial=False,
            suppress_below=0,
            round_to=1,
        ),
        # submitted and never approved (only a forgery could make it pass), except for the
        # tampered case: approved, then altered
        signers=("ann", "bob") if kind == "tampered" else (),
    )
    if kind == "tampered":  # the honest bundle holds; altered, it does not
        honest = gov.registry.bundle(project).to_bytes()
        reply = _prepare(fed, "trust-a", project, honest, "honest")
        assert reply.outcome == npb.OUTCOME_PREPARED, reply.reason
        _abort(fed, "trust-a", project, "honest")
    _refused_everywhere(fed, project, _forge(fed, project, kind), f"forged-{project}", says)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("unsigned", "not signed by its researcher"),
        ("not named", "not named in the approval"),
        ("other query", "differs from the query its researcher signed"),
        ("other project", "differs from the query its researcher signed"),
        ("coordinator's certificate", "not a researcher's"),
    ],
)
def test_a_coordinator_cannot_invent_or_alter_a_researcher_s_query(
    fed: Federation, case: str, says: str
) -> None:
    """The approval holds; the query is not one its researcher signed."""
    project = "partial"  # approved, alice named; mallory is a researcher on no project
    approval = fed.governance.registry.bundle(project).to_bytes()
    pki = fed.pki

    def sign(qid: str) -> pb.SignedQuery:
        if case == "unsigned":
            return pb.SignedQuery()
        if case == "not named":
            return _signed(fed, project, qid, researcher="mallory")
        if case == "other query":
            return _signed(fed, project, qid, sql="SELECT COUNT(*) AS n FROM patients")
        if case == "other project":
            return _signed(fed, PROJECT, qid)
        files = TlsFiles.in_pki_dir(pki, Role.COORDINATOR, "hub")
        s = sign_query(files.key, files.cert, project, qid, BY_SEX, 0.1)
        return pb.SignedQuery(
            statement=s.statement, signature=s.signature, certificate=s.certificate
        )

    qid = "invent-" + case.replace(" ", "-").replace("'", "")
    _refused_everywhere(fed, project, approval, qid, says, sign)


def _commit(fed: Federation, node: str, project: str, qid: str):  # type: ignore[no-untyped-def]
    files = TlsFiles.in_pki_dir(fed.pki, Role.COORDINATOR, "hub")
    with grpc.secure_channel(
        fed.nodes[node].address, channel_credentials(files), options=channel_options(node)
    ) as channel:
        return node_pb2_grpc.NodeServiceStub(channel).Commit(
            npb.DecisionRequest(query_id=qid, project_id=project), timeout=10
        )


def _approve_fresh(fed: Federation, project: str, epsilon: float = 5.0) -> bytes:
    """Submit (a new version of) ``project`` and have ann and bob approve it; its bundle."""
    fed.governance.approve(
        application(
            project,
            researchers=("alice",),
            trusts=TRUSTS,
            views=("patients", "conditions"),
            max_tier="mental_health",
            epsilon_per_trust=epsilon,
            max_epsilon_per_query=1.0,
            default_epsilon=None,
            allow_partial=False,
            suppress_below=0,
            round_to=1,
        )
    )
    return fed.governance.registry.bundle(project).to_bytes()


def _import(fed: Federation, node: str, path: Path) -> str:
    config = str(fed.node_dir(node) / "config.toml")
    return _fedtre("node", "approvals", "import", "--config", config, str(path)).stdout


def test_a_commit_is_checked_against_the_approval_it_was_prepared_under(
    fed: Federation,
) -> None:
    """Revoked between prepare and commit: the commit releases nothing, even after another,
    later-approved version of the project has been shown to the node."""
    import time

    project = "swap"
    v1 = _approve_fresh(fed, project)
    prepared = _prepare(fed, "trust-a", project, v1, "swap-1")
    assert prepared.outcome == npb.OUTCOME_PREPARED, prepared.reason
    _import(fed, "trust-a", fed.governance.revoke(project, by="bob", reason="stop"))
    time.sleep(1.1)  # the next version is submitted after the revocation (whole seconds)
    v2 = _approve_fresh(fed, project)
    again = _prepare(fed, "trust-a", project, v2, "swap-2")  # the node now holds v2 as newest
    assert again.outcome == npb.OUTCOME_PREPARED, again.reason
    commit = _commit(fed, "trust-a", project, "swap-1")
    assert commit.outcome == npb.OUTCOME_REFUSED and "revoked" in commit.reason
    assert not commit.HasField("result")
    assert _commit(fed, "trust-a", project, "swap-2").outcome == npb.OUTCOME_COMMITTED


def test_an_older_version_cannot_bring_back_a_larger_budget(fed: Federation) -> None:
    import time

    project = "shrunk"
    v1 = _approve_fresh(fed, project, epsilon=5.0)
    time.sleep(1.1)
    v2 = _approve_fresh(fed, project, epsilon=1.0)  # the committee narrowed it
    assert _prepare(fed, "trust-b", project, v2, "shrunk-1").outcome == npb.OUTCOME_PREPARED
    old = _prepare(fed, "trust-b", project, v1, "shrunk-2")
    assert old.outcome == npb.OUTCOME_REFUSED and "superseded" in old.reason


def test_a_data_guardian_s_withdrawal_imported_by_the_trust_holds_whatever_is_sent(
    fed: Federation, tmp_path: Path
) -> None:
    project = "withdrawn"
    bundle = _approve_fresh(fed, project)
    assert _prepare(fed, "trust-c", project, bundle, "wd-1").outcome == npb.OUTCOME_PREPARED
    out = tmp_path / "withdrawal.json"
    _fedtre(
        "project", "participate", "--registry", str(fed.governance.registry.root), project,
        "--trust", "trust-c", "--key", str(fed.governance.directory / "guardian-trust-c.key"),
        "--refuse", "--reason", "local concerns",
    )  # fmt: skip
    signed = [
        s
        for s in fed.governance.registry.statements(project)
        if s.statement().kind.value == "fedtre.participation/1"
    ]
    out.write_text(json.dumps(signed[-1].to_json()))
    assert "data guardian's refuse" in _import(fed, "trust-c", out)
    refused = _prepare(fed, "trust-c", project, bundle, "wd-2")  # the bundle omits it
    assert refused.outcome == npb.OUTCOME_REFUSED and "declined" in refused.reason


@pytest.mark.parametrize("project", ["../../etc/passwd", "study\n", "x" * 100])
def test_budget_requests_for_malformed_project_ids_are_refused(
    fed: Federation, project: str
) -> None:
    files = TlsFiles.in_pki_dir(fed.pki, Role.COORDINATOR, "hub")
    with grpc.secure_channel(
        fed.nodes["trust-a"].address, channel_credentials(files), options=channel_options("trust-a")
    ) as channel:
        reply = node_pb2_grpc.NodeServiceStub(channel).Budget(
            npb.BudgetRequest(project_id=project), timeout=10
        )
    assert reply.outcome == npb.OUTCOME_REFUSED
    assert refusal_from_proto(reply.refusal) is Refusal.INVALID_REQUEST


def test_opt_outs_take_effect_from_the_next_query_of_a_running_node(
    fed: Federation, tmp_path: Path
) -> None:
    """Everyone at trust-a opts out: nationally, the federation's count drops by trust-a's
    persons at the next query, without a reload; opted out of commercial use only, they still
    count for this public-benefit project."""
    import duckdb

    spec = next(t for t in fed.trusts if t.name == "trust-a")
    con = duckdb.connect(str(spec.database), read_only=True)
    try:
        ids = [r[0] for r in con.execute("SELECT person_id FROM patients").fetchall()]
    finally:
        con.close()
    listing = tmp_path / "optout.csv"
    listing.write_text("person_id\n" + "".join(f"{i}\n" for i in ids))
    listing.chmod(0o600)
    config = str(fed.node_dir("trust-a") / "config.toml")
    sql = "SELECT COUNT(*) AS n FROM patients"

    def total() -> float:
        with fed.client() as client:
            return float(client.query("partial", sql, 0.5).rows()[0]["n"])

    before = total()
    out = _fedtre(
        "node", "optout", "import", "--config", config, "--kind", "national", str(listing)
    )
    assert f"added {len(ids):,}" in out.stdout
    national = total()
    # noise: each trust's count has a discrete Laplace scale of 2 (ε 0.5): ±40 is > 10 scales
    assert abs(before - national - len(ids)) < 40, (before, national, len(ids))
    _fedtre("node", "optout", "remove", "--config", config, "--kind", "national", str(listing))
    _fedtre("node", "optout", "import", "--config", config, "--kind", "commercial", str(listing))
    assert abs(total() - before) < 40  # a public-benefit project: they count
    counts = json.loads(
        _fedtre("node", "optout", "list", "--config", config, "--format", "json").stdout
    )
    assert counts == {"national": 0, "commercial": len(ids), "mental_health": 0}
    _fedtre("node", "optout", "remove", "--config", config, "--kind", "commercial", str(listing))
    # each change is in the trust's audit log, written before it acted: kind and a random
    # import id, never a person id, a digest of the list, or how many there were
    changes = [e for e in fed.audit("trust-a") if e["event"] == "optouts.changed"]
    assert [(e["kind"], e["action"]) for e in changes] == [
        ("national", "add"),
        ("national", "remove"),
        ("commercial", "add"),
        ("commercial", "remove"),
    ]
    text = json.dumps(changes)
    assert len({e["import_id"] for e in changes}) == 4
    assert not any("sha256" in key for e in changes for key in e)
    assert not any(str(i) in text for i in ids) and str(len(ids)) not in text
    assert verify(fed.audit_path("trust-a")).ok


def test_revoked_certificates_are_refused_by_every_node(fed: Federation, tmp_path: Path) -> None:
    """A leaked coordinator certificate and a leaked researcher certificate (each a real one
    of the federation, then revoked and the list published): every node refuses a call from
    the first and a query signed with the second, audited, nothing spent; the real ones work."""
    pki = fed.pki
    _, csr = request(tmp_path / "leak", Role.COORDINATOR, "hub")
    leaked_hub = sign_request(pki, csr)
    _, csr = request(tmp_path / "leak", Role.RESEARCHER, "alice")
    leaked_alice = sign_request(pki, csr)
    approval = fed.governance.registry.bundle("partial").to_bytes()

    def leaked_hub_prepare(node: str, qid: str):  # type: ignore[no-untyped-def]
        creds = channel_credentials(
            TlsFiles(pki / "ca.pem", leaked_hub, tmp_path / "leak" / "coordinator-hub.key")
        )
        with grpc.secure_channel(
            fed.nodes[node].address, creds, options=channel_options(node)
        ) as channel:
            return node_pb2_grpc.NodeServiceStub(channel).Prepare(
                npb.PrepareRequest(
                    query_id=qid,
                    project_id="partial",
                    sql=BY_SEX,
                    epsilon_units=100_000,
                    approval=approval,
                    signed=_signed(fed, "partial", qid),
                ),
                timeout=10,
            )

    def leaked_alice_signature(qid: str) -> pb.SignedQuery:
        s = sign_query(
            tmp_path / "leak" / "researcher-alice.key", leaked_alice, "partial", qid, BY_SEX, 0.1
        )
        return pb.SignedQuery(
            statement=s.statement, signature=s.signature, certificate=s.certificate
        )

    # before: both leaked certificates still work (they are the federation's own)
    assert leaked_hub_prepare("trust-a", "crl-before").outcome == npb.OUTCOME_PREPARED
    _abort(fed, "trust-a", "partial", "crl-before")
    for cert in (leaked_hub, leaked_alice):
        revoke(pki, cert, "leaked")
    time.sleep(0.01)
    write_crl(pki, pki / "crl.pem")  # the nodes read it again when it changes
    for node in TRUSTS:
        lines = len(fed.audit(node))
        before = fed.spent_units(node, "project:partial")
        with pytest.raises(grpc.RpcError) as info:
            leaked_hub_prepare(node, f"crl-hub-{node}")
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in (info.value.details() or "")
        new = fed.audit(node)[lines:]
        assert [(e["event"], e["reason"]) for e in new] == [
            ("call.refused", "the certificate has been revoked")
        ]
        assert fed.spent_units(node, "project:partial") == before
    _refused_everywhere(
        fed, "partial", approval, "crl-alice", "has been revoked", leaked_alice_signature
    )
    # the real coordinator and researcher still work
    with fed.client() as client:
        assert client.query("partial", BY_SEX, 0.1).released

"""A node under [governance], in process (engine, no transport): versions, the trust's own
imports, commits against the approval a query was prepared under, the signer, live opt-outs
when their file is replaced. Each case comes from an attacker's review; each must refuse, or
apply, exactly as docs/GOVERNANCE.md says."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtre import pki
from fedtre.governance.local import LocalGovernance, application
from fedtre.governance.query_signature import sign
from fedtre.governance.verify import NotApproved
from fedtre.pki import Role
from fedtre.request import QueryRequest
from node.config import load_node_config
from node.engine import NodeEngine
from node.optouts import OptOut, OptOuts, OptOutsUnavailable
from tests.conftest import private_database

SQL = "SELECT COUNT(*) AS n FROM patients"


@pytest.fixture
def world(tmp_path: Path, node_db: Path) -> Iterator[tuple[NodeEngine, LocalGovernance, Path]]:
    certs = tmp_path / "pki"
    pki.init_ca(certs)
    for name in ("alice", "bob"):
        pki.issue(certs, Role.RESEARCHER, name)
    gov = LocalGovernance(tmp_path / "gov").create()
    home = tmp_path / "node"
    home.mkdir()
    (home / "committee.toml").write_bytes(gov.committee_path.read_bytes())
    database = private_database(home, node_db)
    (home / "node.toml").write_text(
        f'node_id = "trust-test"\ndatabase = "{database}"\nstate_dir = "state"\n'
        "node_epsilon_ceiling = 100.0\nanswer_slot_ms = 0\n\n"
        f'[server]\nlisten = "127.0.0.1:0"\ncoordinator = "hub"\nca = "{certs / "ca.pem"}"\n'
        f'cert = "{certs / "ca.pem"}"\nkey = "{certs / "ca.key"}"\n\n'
        '[governance]\ncommittee = "committee.toml"\n'
        'accept_purposes = ["public-benefit-research"]\n'
    )
    engine = NodeEngine(load_node_config(home / "node.toml"))
    yield engine, gov, certs
    engine.close()


def _version(
    gov: LocalGovernance, *, epsilon: float, per_query: float, researchers=("alice", "bob")
) -> bytes:
    time.sleep(1.05)  # versions are ordered by their (whole-second) submission time
    gov.approve(
        application(
            "proj",
            researchers=researchers,
            trusts=("trust-test",),
            views=("patients",),
            max_tier="general",
            epsilon_per_trust=epsilon,
            max_epsilon_per_query=per_query,
            default_epsilon=None,
            allow_partial=False,
            suppress_below=0,
            round_to=1,
        )
    )
    return gov.registry.bundle("proj").to_bytes()


def _request(certs: Path, approval: bytes, qid: str, eps: float, who: str = "alice", **kw):  # type: ignore[no-untyped-def]
    signed = sign(
        certs / f"researcher-{who}.key", certs / f"researcher-{who}.pem", "proj", qid, SQL, eps
    )
    return QueryRequest(qid, "proj", SQL, eps, "test", approval, signed, kw.get("named", who))


def test_an_older_version_is_refused_even_after_it_held_and_was_cached(world) -> None:  # type: ignore[no-untyped-def]
    engine, gov, certs = world
    v1 = _version(gov, epsilon=5.0, per_query=1.0)
    engine.answer(_request(certs, v1, "a-1", 0.5, "bob"))  # cached as holding
    v2 = _version(gov, epsilon=2.0, per_query=0.2, researchers=("alice",))
    engine.answer(_request(certs, v2, "a-2", 0.1))
    spent = _spent(engine)
    with pytest.raises(NotApproved, match="superseded"):
        engine.prepare(_request(certs, v1, "a-3", 1.0, "bob"))
    assert _spent(engine) == spent


def test_a_newer_version_the_trust_imports_holds_at_once_and_is_not_undone(
    world, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    engine, gov, certs = world
    v1 = _version(gov, epsilon=5.0, per_query=1.0)
    engine.answer(_request(certs, v1, "b-1", 0.5))
    v2 = _version(gov, epsilon=2.0, per_query=0.1)
    exported = tmp_path / "v2.json"
    exported.write_bytes(v2)
    from node.approvals import Projects

    Projects(load_node_config(engine.config.state_dir.parent / "node.toml")).import_file(exported)
    # v1's statements in another order: other bytes, no cache to lean on
    doc = json.loads(v1)
    doc["statements"].reverse()
    reordered = json.dumps(doc).encode()
    spent = _spent(engine)
    with pytest.raises(NotApproved, match="superseded"):
        engine.prepare(_request(certs, reordered, "b-2", 1.0))
    assert _spent(engine) == spent
    held = (engine.config.state_dir / "approvals" / "proj.json").read_bytes()
    assert held == v2


def test_a_query_signed_by_another_researcher_than_named_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    engine, gov, certs = world
    v1 = _version(gov, epsilon=5.0, per_query=1.0)
    with pytest.raises(NotApproved, match="another researcher than the one named"):
        engine.prepare(_request(certs, v1, "c-1", 0.1, "alice", named="bob"))
    assert _spent(engine) == 0


def test_a_commit_while_the_answer_is_computed_releases_nothing(world) -> None:  # type: ignore[no-untyped-def]
    engine, gov, certs = world
    v1 = _version(gov, epsilon=5.0, per_query=1.0)
    request = _request(certs, v1, "d-1", 0.1)
    # a reservation without its answer yet (what a concurrent commit would find)
    prepared = engine.planner.prepare(request)
    engine.ledger.reserve(
        "proj", "d-1", prepared.fingerprint, prepared.units, "2026-12-02T00:00:00Z",
        {"project:proj": 5_000_000}, 60.0, prepared.approval,
    )  # fmt: skip
    from fedtre.errors import QueryRefused

    with pytest.raises(QueryRefused, match="still preparing"):
        engine.commit("proj", "d-1", "test")
    entry = engine.ledger.entry("proj", "d-1")
    assert entry is not None and entry.state.value == "reserved"  # nothing released


def test_a_future_dated_application_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    engine, gov, certs = world
    app = application(
        "proj",
        researchers=("alice",),
        trusts=("trust-test",),
        views=("patients",),
        max_tier="general",
        epsilon_per_trust=5.0,
        max_epsilon_per_query=1.0,
        default_epsilon=None,
        allow_partial=False,
        suppress_below=0,
        round_to=1,
    )
    import dataclasses

    future = dataclasses.replace(app, submitted="2036-01-01T00:00:00Z")
    gov.approve(future)
    bundle = gov.registry.bundle("proj").to_bytes()
    with pytest.raises(NotApproved, match="dated in the future"):
        engine.prepare(_request(certs, bundle, "e-1", 0.1))
    assert _spent(engine) == 0


def test_an_opt_out_list_replaced_or_removed_under_a_running_node(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, _, _ = world
    state = engine.config.state_dir
    kinds = frozenset({OptOut.NATIONAL})
    OptOuts(state).add(OptOut.NATIONAL, [1])
    assert engine.optouts.ids(kinds).column("id").to_pylist() == [1]
    # restored from a backup holding more: the running node reads the file now at the path
    backup = tmp_path / "backup"
    backup.mkdir()
    OptOuts(backup).add(OptOut.NATIONAL, [1, 3, 4])
    shutil.copyfile(backup / "optouts.sqlite", tmp_path / "restored.sqlite")
    os.replace(tmp_path / "restored.sqlite", state / "optouts.sqlite")
    assert engine.optouts.ids(kinds).column("id").to_pylist() == [1, 3, 4]
    OptOuts(state).add(OptOut.NATIONAL, [5])
    assert engine.optouts.ids(kinds).column("id").to_pylist() == [1, 3, 4, 5]
    (state / "optouts.sqlite").unlink()
    with pytest.raises(OptOutsUnavailable, match="missing"):
        engine.optouts.ids(kinds)


def _spent(engine: NodeEngine) -> int:
    return engine.ledger.spent("project:proj")

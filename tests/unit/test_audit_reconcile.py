"""``reconcile`` cross-checks the coordinator's log against each trust's log and ledger.

Each trust here is a real ``Ledger`` with its audit log in the same database, released the way
the node does it (the entry in the ledger's commit); the coordinator's log is written the way
the coordinator writes it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog
from fedtre.audit.reconcile import reconcile
from node.ledger import NODE_SCOPE, Entry, Ledger, State, project_scope

UNITS = 100_000


class Trust:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.path = root / name / "ledger.sqlite"
        self.audit = AuditLog(self.path, name)
        self.ledger = Ledger(self.path)

    def release(self, project: str, query_id: str, units: int = UNITS, logged: bool = True) -> None:
        self.audit.note(
            Event.QUERY_RECEIVED, query_id=query_id, project=project, caller="coordinator:hub"
        )

        def record(con: sqlite3.Connection, e: Entry) -> None:
            if e.state is State.COMMITTED and logged:
                self.audit.append(
                    con,
                    Event.QUERY_RELEASED,
                    query_id=e.query_id,
                    project=e.project_id,
                    caller="coordinator:hub",
                    epsilon_units=e.units,
                )

        limits = {project_scope(project): 10**9, NODE_SCOPE: 10**9}
        r = self.ledger.reserve(project, query_id, "fp", units, "2026-12-02T00:00:00", limits, 60)
        self.ledger.prepare(r.entry, "{}")
        self.ledger.commit(project, query_id, record)

    def replay(self, project: str, query_id: str) -> None:
        self.audit.write(
            Event.QUERY_REPLAYED,
            query_id=query_id,
            project=project,
            caller="coordinator:hub",
            epsilon_units=0,
        )

    def refuse(self, project: str, query_id: str) -> None:
        self.audit.write(
            Event.QUERY_REFUSED,
            query_id=query_id,
            project=project,
            caller="coordinator:hub",
            refusal="out_of_scope",
            reason="no",
        )


class Hub:
    def __init__(self, root: Path) -> None:
        self.path = root / "hub" / "audit.sqlite"
        self.audit = AuditLog(self.path, "hub", role="coordinator")

    def query(
        self,
        project: str,
        query_id: str,
        trusts: dict[str, str],
        spent: dict[str, int],
        replayed: tuple[str, ...] = (),
        at_call: tuple[str, ...] = (),
    ) -> None:
        self.audit.note(
            Event.QUERY_RECEIVED, query_id=query_id, project=project, researcher="alice"
        )
        event = Event.QUERY_RELEASED if spent else Event.QUERY_REPLAYED
        if any(s != "answered" for s in trusts.values()):
            event = Event.QUERY_WITHHELD
        self.audit.write(
            event,
            query_id=query_id,
            project=project,
            researcher="alice",
            trusts=trusts,
            spent_epsilon_units=spent,
            replayed=list(replayed),
            refused_at_call=list(at_call),
        )


def _federation(tmp_path: Path) -> tuple[Hub, Trust, Trust]:
    hub, a, b = Hub(tmp_path), Trust(tmp_path, "trust-a"), Trust(tmp_path, "trust-b")
    both = {"trust-a": "answered", "trust-b": "answered"}
    for q in ("q1", "q2"):
        a.release("study", q)
        b.release("study", q)
        hub.query("study", q, both, {"trust-a": UNITS, "trust-b": UNITS})
    # q1 asked again: both trusts replay, nothing new spent anywhere
    a.replay("study", "q1")
    b.replay("study", "q1")
    hub.query("study", "q1", both, {}, replayed=("trust-a", "trust-b"))
    # q3: trust-b refused, so the result was withheld; trust-a was aborted (nothing spent)
    b.refuse("study", "q3")
    hub.query("study", "q3", {"trust-a": "withdrawn", "trust-b": "refused"}, {})
    return hub, a, b


def _kinds(hub: Hub, *trusts: Trust) -> list[tuple[str, str, str]]:
    found = reconcile([hub.path], [t.path for t in trusts])
    return [(d.kind, d.trust, d.query_id) for d in found.discrepancies]


def test_a_consistent_federation_reconciles_and_replays_are_not_spend(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    found = reconcile([hub.path], [a.path, b.path])
    assert found.ok, found.discrepancies
    assert found.trust_releases == 4 and found.coordinator_releases == 4
    assert found.replays == 2
    assert found.epsilon_units == {"trust-a": 2 * UNITS, "trust-b": 2 * UNITS}


def test_a_release_the_coordinator_logged_but_a_trust_did_not_is_found(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    a.release("study", "q4")
    both = {"trust-a": "answered", "trust-b": "answered"}
    hub.query("study", "q4", both, {"trust-a": UNITS, "trust-b": UNITS})  # b has no q4
    assert _kinds(hub, a, b) == [("release_missing_at_trust", "trust-b", "q4")]


def test_a_release_a_trust_logged_but_the_coordinator_did_not_is_found(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    a.release("study", "q5")  # e.g. someone with the coordinator's key called trust-a directly
    assert _kinds(hub, a, b) == [("release_missing_at_coordinator", "trust-a", "q5")]


def test_an_epsilon_mismatch_between_the_sides_is_found(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    a.release("study", "q6", units=2 * UNITS)
    b.release("study", "q6")
    both = {"trust-a": "answered", "trust-b": "answered"}
    hub.query("study", "q6", both, {"trust-a": UNITS, "trust-b": UNITS})
    assert _kinds(hub, a, b) == [("epsilon_mismatch", "trust-a", "q6")]


def test_a_debit_without_its_audit_entry_is_a_ledger_mismatch(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    a.release("study", "q7", logged=False)  # the ledger holds a debit the log never saw
    # found twice: the trust's own log does not verify (a release without its entry), and
    # the ε its log releases differs from its ledger's
    assert sorted(_kinds(hub, a, b)) == [
        ("ledger_mismatch", "trust-a", ""),
        ("log_does_not_verify", "trust-a", ""),
    ]


def test_refusals_must_be_on_both_sides(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    hub.query("study", "q8", {"trust-a": "refused", "trust-b": "withdrawn"}, {})
    a.refuse("study", "q9")  # a refusal of a request the coordinator never received
    assert sorted(_kinds(hub, a, b)) == [
        ("refusal_missing_at_trust", "trust-a", "q8"),
        ("refusal_unknown_to_coordinator", "trust-a", "q9"),
    ]


def test_a_log_that_does_not_verify_is_reported(tmp_path: Path) -> None:
    hub, a, b = _federation(tmp_path)
    for t in (a, b):
        t.audit.close()
    con = sqlite3.connect(a.path)
    con.execute("DROP TRIGGER audit_log_no_update")
    con.execute("UPDATE audit_log SET entry = replace(entry, 'q2', 'qX') WHERE seq = 5")
    con.commit()
    con.close()
    assert ("log_does_not_verify", "trust-a", "") in _kinds(hub, a, b)


def test_a_retry_after_a_lost_commit_reply_is_one_spend_not_a_discrepancy(
    tmp_path: Path,
) -> None:
    """trust-b committed q10 but its reply was lost: the coordinator withheld the result;
    the researcher's retry replayed trust-b's answer. One spend at trust-b, matched."""
    hub, a, b = _federation(tmp_path)
    a.release("study", "q10")
    b.release("study", "q10")
    hub.query("study", "q10", {"trust-a": "answered", "trust-b": "failed"}, {"trust-a": UNITS})
    b.replay("study", "q10")
    a.replay("study", "q10")
    hub.query(
        "study",
        "q10",
        {"trust-a": "answered", "trust-b": "answered"},
        {},
        replayed=("trust-a", "trust-b"),
    )
    found = reconcile([hub.path], [a.path, b.path])
    assert found.ok, found.discrepancies


def test_a_trust_whose_log_was_not_given_is_named(tmp_path: Path) -> None:
    hub, a, _ = _federation(tmp_path)
    assert _kinds(hub, a) == [("trust_log_missing", "trust-b", "")]


def test_a_refusal_by_a_trusts_call_policy_is_matched_by_its_call_refused_entry(
    tmp_path: Path,
) -> None:
    """Refused before any handler ran (e.g. a revoked coordinator certificate): the trust's
    log has call.refused, which names no query; reconcile matches the counts."""
    hub, a, b = _federation(tmp_path)
    hub.query(
        "study", "q11", {"trust-a": "refused", "trust-b": "withdrawn"}, {}, at_call=("trust-a",)
    )
    assert _kinds(hub, a, b) == [("call_refusal_missing_at_trust", "trust-a", "")]
    a.audit.write(
        Event.CALL_REFUSED,
        method="/fedtre.v2.NodeService/Prepare",
        caller="coordinator:hub",
        reason="revoked certificate",
    )
    assert _kinds(hub, a, b) == []

"""Faults inside the node fail closed: nothing released, nothing debited, outcome audited."""

from __future__ import annotations

import sqlite3

import pytest

from fedtre.audit.log import read_audit
from node.errors import LedgerUnavailable
from node.ledger import NODE_SCOPE, project_scope
from tests.conftest import request

GOOD = "SELECT sex, COUNT(*) FROM patients GROUP BY sex"


def _events(engine, query_id):
    return [
        r["event"] for r in read_audit(engine.config.audit_path) if r.get("query_id") == query_id
    ]


def _failing_ledger(engine, monkeypatch, statement: str) -> None:
    real_con = engine.ledger._con

    class Failing:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *args):
            if sql.startswith(statement):
                raise sqlite3.OperationalError("disk I/O error")
            return self.con.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.con, name)

    monkeypatch.setattr(engine.ledger, "_con", lambda: Failing(real_con()))


def test_ledger_failing_at_the_debit_spends_and_releases_nothing(engine, monkeypatch):
    _failing_ledger(engine, monkeypatch, "INSERT OR REPLACE INTO queries")
    with pytest.raises(LedgerUnavailable):
        engine.answer(request(GOOD, 0.1, query_id="disk-0"))
    monkeypatch.undo()
    assert engine.ledger.lookup("study", "disk-0") is None
    assert engine.ledger.debits() == []
    assert engine.ledger.spent(project_scope("study")) == 0
    assert engine.ledger.spent(NODE_SCOPE) == 0  # the whole transaction rolled back
    assert _events(engine, "disk-0") == ["query.received", "query.failed"]


def test_ledger_failing_when_storing_the_answer_releases_nothing(engine, monkeypatch):
    """The debit happens before the data is read, so it stands; nothing is released, and a
    retry of the query id computes the answer once, without a second debit."""
    _failing_ledger(engine, monkeypatch, "UPDATE queries SET state = 'prepared'")
    with pytest.raises(LedgerUnavailable):
        engine.answer(request(GOOD, 0.1, query_id="disk-1"))
    monkeypatch.undo()
    assert engine.ledger.lookup("study", "disk-1") is None
    assert engine.ledger.spent(project_scope("study")) == 100_000
    assert engine.ledger.spent(NODE_SCOPE) == 100_000
    assert _events(engine, "disk-1") == ["query.received", "query.reserved", "query.failed"]
    # after the disk recovers the same id is answered once, and still debited once
    result = engine.answer(request(GOOD, 0.1, query_id="disk-1"))
    assert result.epsilon_units == 100_000
    assert engine.ledger.spent(project_scope("study")) == 100_000
    assert [d.query_id for d in engine.ledger.debits()] == ["disk-1"]


def test_ledger_failing_at_the_commit_releases_nothing_and_the_retry_commits_once(
    engine, monkeypatch
):
    _failing_ledger(engine, monkeypatch, "UPDATE queries SET state = 'committed'")
    with pytest.raises(LedgerUnavailable):
        engine.answer(request(GOOD, 0.1, query_id="disk-2"))
    monkeypatch.undo()
    assert engine.ledger.lookup("study", "disk-2") is None  # prepared, never released
    assert engine.ledger.spent(project_scope("study")) == 100_000
    result = engine.answer(request(GOOD, 0.1, query_id="disk-2"))
    assert engine.ledger.lookup("study", "disk-2") is not None
    assert result.epsilon_units == 100_000
    assert engine.ledger.spent(project_scope("study")) == 100_000
    assert _events(engine, "disk-2").count("query.released") == 1


def test_unexpected_error_is_audited_and_nothing_released(engine, monkeypatch):
    import node.engine as engine_module

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(engine_module, "release", broken)
    with pytest.raises(RuntimeError):
        engine.answer(request(GOOD, 0.1, query_id="bug-1"))
    assert _events(engine, "bug-1") == ["query.received", "query.reserved", "query.failed"]
    assert engine.ledger.lookup("study", "bug-1") is None
    # the cost was fixed and debited before the data was read; nothing was released
    assert engine.ledger.spent(project_scope("study")) == 100_000

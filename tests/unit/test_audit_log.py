"""The audit log: typed entries, a hash chain, several writers, and no torn entries."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog, read_audit
from fedtre.audit.verify import verify
from fedtre.errors import AuditUnavailable


def test_entries_are_typed_numbered_and_chained(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.sqlite", "trust-a", public_key="ab" * 32)
    log.write(Event.QUERY_RECEIVED, query_id="q1", sql='SELECT 1\n{"forged": 1}')
    log.note(Event.QUERY_REFUSED, query_id="q1", reason="no")
    entries = read_audit(tmp_path / "a.sqlite")
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert [e["event"] for e in entries] == ["log.created", "query.received", "query.refused"]
    assert entries[0]["public_key"] == "ab" * 32 and entries[0]["log_id"] == log.log_id
    assert all(e["node"] == "trust-a" for e in entries)
    assert entries[1]["sql"].endswith('{"forged": 1}')  # one field, not a second entry
    with pytest.raises(TypeError):
        log.write("query.received")  # type: ignore[arg-type]  # only Event kinds
    log.close()
    assert verify(tmp_path / "a.sqlite").ok


def test_the_log_refuses_updates_and_deletes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.sqlite", "trust-a")
    log.write(Event.NODE_STARTED)
    log.close()
    con = sqlite3.connect(tmp_path / "a.sqlite")
    for statement in ("UPDATE audit_log SET entry = '{}'", "DELETE FROM audit_log"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            con.execute(statement)
    con.close()


def _append_many(path: str, actor: str, n: int) -> None:
    log = AuditLog(Path(path), actor)
    for i in range(n):
        (log.write if i % 5 == 0 else log.note)(Event.BUDGET_REQUESTED, project=f"{actor}-{i}")
    log.close()


def test_several_processes_append_to_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    AuditLog(path, "trust-a").close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), f"p{i}", 150)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = read_audit(path)
    assert len(entries) == 1 + 3 * 150
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert verify(path).ok


def test_a_full_disk_fails_closed_leaves_no_torn_entry_and_writing_resumes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.sqlite"
    log = AuditLog(path, "trust-a")
    con = log._con()  # this thread's connection: give it no room to grow
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.execute(f"PRAGMA max_page_count = {pages}")
    big = "x" * 9_000
    with pytest.raises(AuditUnavailable, match="full"):
        for _ in range(50):
            log.write(Event.QUERY_RECEIVED, sql=big)
    assert log.failed_since is not None
    written = len(read_audit(path))
    assert verify(path).ok  # what was written is whole and chained
    con.execute("PRAGMA max_page_count = 1073741823")  # space returns
    log.write(Event.AUDIT_RESUMED)
    assert log.failed_since is None
    assert len(read_audit(path)) == written + 1
    log.close()
    assert verify(path).ok


def test_writes_after_close_fail(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.sqlite", "trust-a")
    log.close()
    with pytest.raises(AuditUnavailable, match="closed"):
        log.write(Event.NODE_STOPPED)


def test_a_new_log_names_the_json_lines_log_it_follows(tmp_path: Path) -> None:
    old = tmp_path / "audit.jsonl"
    old.write_text('{"event": "node.started"}\n{"event": "node.stopped"}\n')
    AuditLog(tmp_path / "a.sqlite", "trust-a", follows=old).close()
    first = read_audit(tmp_path / "a.sqlite")[0]
    assert first["follows"]["lines"] == 2 and len(first["follows"]["sha256"]) == 64


class _FailingCommit:
    """A connection whose next COMMIT fails as a failed fsync does (SQLITE_IOERR_FSYNC)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = 1034  # type: ignore[attr-defined]
            raise exc
        return self.con.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.con, name)


def test_an_io_error_is_final_for_the_log_and_the_ledger(tmp_path: Path) -> None:
    """The kernel reports a lost write to one fsync only: after an I/O error neither the
    audit log nor the ledger writes again until the service restarts."""
    from node.ledger import Ledger, LedgerUnavailable

    log = AuditLog(tmp_path / "ledger.sqlite", "trust-a")
    real = log._con()
    log._local.con = _FailingCommit(real)
    with pytest.raises(AuditUnavailable):
        log.write(Event.QUERY_RECEIVED)
    log._local.con = real
    with pytest.raises(AuditUnavailable, match="restart"):
        log.write(Event.QUERY_RECEIVED)  # the disk is fine again, but this proves nothing
    assert log.lost_writes is not None
    log.close()

    ledger = Ledger(tmp_path / "ledger.sqlite")
    real = ledger._con()
    ledger._local.con = _FailingCommit(real)
    limits = {"node": 10**9}
    with pytest.raises(LedgerUnavailable):
        ledger.reserve("p", "q1", "fp", 1, "2026-12-02T00:00:00", limits, 60)
    ledger._local.con = real
    with pytest.raises(LedgerUnavailable, match="restart"):
        ledger.reserve("p", "q2", "fp", 1, "2026-12-02T00:00:00", limits, 60)
    assert Ledger(tmp_path / "ledger.sqlite").entry("p", "q2") is None  # a restart: fine


def test_every_event_kind_is_documented_for_auditors() -> None:
    from fedtre.audit.events import MEANING
    from fedtre.audit_cli import events_markdown

    assert set(MEANING) == set(Event)
    doc = (Path(__file__).parents[2] / "docs" / "AUDIT.md").read_text(encoding="utf-8")
    assert events_markdown() in doc, "docs/AUDIT.md is stale: regenerate with fedtre audit events"

"""``verify`` finds every mutation of a 10,000-entry log, given an earlier checkpoint.

Mutations are made as an attacker with write access to the file would: straight in SQLite,
with the append-only triggers dropped, and (where stated) every link after the change
recomputed so that the chain is internally valid again.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtre.audit.checkpoint import Checkpoint, CheckpointError, public_hex, sign_checkpoint
from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog, canonical, genesis, link
from fedtre.audit.verify import verify
from fedtre.errors import AuditUnavailable

SIZE = 10_000


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Checkpoint]:
    path = tmp_path_factory.mktemp("log") / "ledger.sqlite"
    key = Ed25519PrivateKey.generate()
    log = AuditLog(path, "trust-a", public_key=public_hex(key))
    con = log._con()
    con.execute("BEGIN IMMEDIATE")  # one transaction: 10,000 entries in well under a second
    for i in range(SIZE - 2):
        log.append(con, Event.BUDGET_REQUESTED, project=f"p{i % 7}", caller="coordinator:hub")
    con.execute("COMMIT")
    checkpoint = sign_checkpoint(log, key)  # the auditor's copy: size 9,999 (then one entry)
    log.close()
    _settle(path)
    return path, checkpoint


@pytest.fixture
def log_copy(original: tuple[Path, Checkpoint], tmp_path: Path) -> tuple[Path, Checkpoint]:
    path, checkpoint = original
    shutil.copy(path, tmp_path / "ledger.sqlite")
    return tmp_path / "ledger.sqlite", checkpoint


def _settle(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("PRAGMA journal_mode=DELETE")
    con.close()


def _tamper(path: Path, change: Callable[[sqlite3.Connection], None], relink: bool) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("BEGIN")
    guards = con.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'"
    ).fetchall()
    for name, _ in guards:
        con.execute(f"DROP TRIGGER {name}")
    change(con)
    if relink:
        log_id = con.execute("SELECT value FROM audit_meta WHERE key = 'log_id'").fetchone()[0]
        previous = genesis(log_id)
        rows = con.execute("SELECT seq, entry FROM audit_log ORDER BY seq").fetchall()
        for seq, entry in rows:
            previous = link(previous, seq, entry.encode())
            con.execute("UPDATE audit_log SET link = ? WHERE seq = ?", (previous, seq))
    for _, sql in guards:  # a careful attacker puts the guards back
        con.execute(sql)
    con.execute("COMMIT")
    con.close()


def _entry(con: sqlite3.Connection, seq: int) -> dict:
    return json.loads(
        con.execute("SELECT entry FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0]
    )


def _set(con: sqlite3.Connection, seq: int, record: dict) -> None:
    con.execute("UPDATE audit_log SET entry = ? WHERE seq = ?", (canonical(record), seq))


def _modify(con: sqlite3.Connection) -> None:
    record = _entry(con, 5000)
    record["project"] = "other"
    _set(con, 5000, record)


def _delete(con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM audit_log WHERE seq = 5000")


def _delete_and_renumber(con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM audit_log WHERE seq = 5000")
    rows = con.execute("SELECT seq, entry FROM audit_log WHERE seq > 5000 ORDER BY seq").fetchall()
    for seq, entry in rows:
        record = json.loads(entry)
        record["seq"] = seq - 1
        con.execute(
            "UPDATE audit_log SET seq = ?, entry = ? WHERE seq = ?",
            (seq - 1, canonical(record), seq),
        )


def _insert(con: sqlite3.Connection) -> None:
    rows = con.execute(
        "SELECT seq, entry, link FROM audit_log WHERE seq >= 5000 ORDER BY seq DESC"
    ).fetchall()
    for seq, entry, _link in rows:  # make room at 5000, renumbering what follows
        record = json.loads(entry)
        record["seq"] = seq + 1
        con.execute(
            "UPDATE audit_log SET seq = ?, entry = ? WHERE seq = ?",
            (seq + 1, canonical(record), seq),
        )
    record = _entry(con, 5001)
    record.update(seq=5000, event="query.refused", reason="invented")
    con.execute(
        "INSERT INTO audit_log (seq, entry, link) VALUES (5000, ?, ?)", (canonical(record), b"x")
    )


def _reorder(con: sqlite3.Connection) -> None:
    a, b = _entry(con, 100), _entry(con, 200)
    a["seq"], b["seq"] = 200, 100
    _set(con, 100, b)
    _set(con, 200, a)


def _truncate(con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM audit_log WHERE seq > 8000")


MUTATIONS = {
    "modify": _modify,
    "delete": _delete,
    "delete and renumber": _delete_and_renumber,
    "insert": _insert,
    "reorder": _reorder,
    "truncate": _truncate,
}


@pytest.mark.parametrize("relink", [False, True], ids=["links kept", "links recomputed"])
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutation_is_detected_given_an_earlier_checkpoint(
    log_copy: tuple[Path, Checkpoint], name: str, relink: bool
) -> None:
    path, checkpoint = log_copy
    assert verify(path, [checkpoint]).ok  # the untouched copy verifies
    _tamper(path, MUTATIONS[name], relink)
    found = verify(path, [checkpoint])
    assert not found.ok, name
    if not relink and name not in ("truncate",):
        # the links name the first bad entry
        assert found.problems[0].seq in (100, 5000), found.problems


def test_a_rewrite_with_a_new_valid_chain_is_detected(
    log_copy: tuple[Path, Checkpoint], tmp_path: Path
) -> None:
    path, checkpoint = log_copy
    # a whole new log, with its own id and key: internally valid, and as long
    fake_key = Ed25519PrivateKey.generate()
    fake = AuditLog(tmp_path / "fake.sqlite", "trust-a", public_key=public_hex(fake_key))
    con = fake._con()
    con.execute("BEGIN IMMEDIATE")
    for _ in range(SIZE + 5):
        fake.append(con, Event.BUDGET_REQUESTED, project="p0", caller="coordinator:hub")
    con.execute("COMMIT")
    fake.close()
    assert verify(tmp_path / "fake.sqlite").ok  # valid on its own
    found = verify(tmp_path / "fake.sqlite", [checkpoint])
    assert not found.ok and "replaced or rewritten" in found.problems[0].what
    # the same log id kept, every entry rewritten and relinked: the heads differ
    _tamper(
        path,
        lambda c: c.execute("UPDATE audit_log SET entry = replace(entry, 'p3', 'p4')"),
        relink=True,
    )
    assert verify(path).ok  # internally valid again
    found = verify(path, [checkpoint])
    assert not found.ok and "do not hash" in found.problems[0].what


def test_a_forged_or_foreign_checkpoint_is_not_accepted(log_copy: tuple[Path, Checkpoint]) -> None:
    path, checkpoint = log_copy
    forged = Checkpoint(**{**checkpoint.__dict__, "size": checkpoint.size - 1})
    assert not verify(path, [forged]).ok
    with pytest.raises(CheckpointError):
        forged.check()
    other = Ed25519PrivateKey.generate()
    with pytest.raises(CheckpointError, match="pinned"):
        checkpoint.check(pinned_key=public_hex(other))
    assert not verify(path, [checkpoint], pinned_key=public_hex(other)).ok
    assert verify(path, [checkpoint], pinned_key=checkpoint.public_key).ok
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint


def test_without_a_checkpoint_an_edit_is_still_found_by_its_link(
    log_copy: tuple[Path, Checkpoint],
) -> None:
    path, _ = log_copy
    _tamper(path, _modify, relink=False)
    found = verify(path)
    assert [p.seq for p in found.problems][:1] == [5000]


def test_a_trigger_that_drops_entries_is_refused_and_found(
    log_copy: tuple[Path, Checkpoint],
) -> None:
    """An attacker adds a trigger that silently skips every release entry (and keeps the
    guards): the log refuses to be written to, and verify names the change."""
    path, checkpoint = log_copy
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TRIGGER audit_log_index BEFORE INSERT ON audit_log "
        "WHEN json_extract(NEW.entry, '$.event') = 'query.released' "
        "BEGIN SELECT RAISE(IGNORE); END"
    )
    con.commit()
    con.close()
    found = verify(path, [checkpoint])
    assert not found.ok and "schema was changed" in found.problems[0].what
    with pytest.raises(AuditUnavailable, match="schema was changed"):
        AuditLog(path, "trust-a")


def test_insert_or_replace_cannot_rewrite_an_entry(log_copy: tuple[Path, Checkpoint]) -> None:
    path, _ = log_copy
    con = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute(
            "INSERT OR REPLACE INTO audit_log (seq, entry, link) VALUES (5000, '{}', x'00')"
        )
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):  # only the next seq
        con.execute("INSERT INTO audit_log (seq, entry, link) VALUES (99999, '{}', x'00')")
    con.close()


def test_a_pinned_key_is_checked_without_a_checkpoint(
    log_copy: tuple[Path, Checkpoint], tmp_path: Path
) -> None:
    path, checkpoint = log_copy
    assert verify(path, pinned_key=checkpoint.public_key).ok
    assert not verify(path, pinned_key="00").ok
    other = AuditLog(tmp_path / "other.sqlite", "trust-a", public_key="ab" * 32)
    other.close()
    assert not verify(tmp_path / "other.sqlite", pinned_key=checkpoint.public_key).ok


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE audit_log SET entry = 'not json' WHERE seq = 1",
        "UPDATE audit_log SET entry = '[1, 2]' WHERE seq = 1",
        "UPDATE audit_log SET entry = CAST(entry AS BLOB) WHERE seq = 3",
        "UPDATE audit_log SET seq = -5 WHERE seq = 4",
        "UPDATE audit_log SET seq = seq + 20000 WHERE seq = 7",
        "UPDATE audit_log SET link = 'text' WHERE seq = 8",
    ],
)
def test_malformed_logs_are_reported_not_crashed_on(
    log_copy: tuple[Path, Checkpoint], change: str
) -> None:
    path, checkpoint = log_copy
    con = sqlite3.connect(path)
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        con.execute(f"DROP TRIGGER {name}")
    con.execute(change)
    con.commit()
    con.close()
    found = verify(path, [checkpoint])
    assert not found.ok and found.problems

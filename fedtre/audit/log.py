"""A tamper-evident audit log (node or coordinator) in SQLite: one entry per event, hash-chained.

Each entry is canonical JSON (sorted keys, ASCII, no spaces) of ``{"seq", "ts", "<role>":
actor, "event", ...fields}``; its link is ``SHA-256(previous link ‖ seq ‖ entry)``, starting
from a genesis value derived from the log's id. A signed checkpoint of (size, head link) lets
anyone who holds it prove later that the first ``size`` entries were not modified, deleted,
inserted, reordered, truncated or rewritten (``fedtre audit verify``). Entries are
structured, so nothing a caller sends can forge a second entry, and a transaction either
commits whole or not at all: a full disk leaves no half-written entry.

Where it lives: a node keeps its log in the budget ledger's database, so that a release's
entry commits in the same transaction as the ledger's final debit (one durable write per
release); the coordinator keeps its own. Several processes may append (the server and the
command-line tools): each append reads the head and inserts under SQLite's write lock.

Durability: ``write`` commits with an fsync (``synchronous=FULL``) before it returns; ``note``
commits without waiting for the disk (in the write-ahead log: it survives a crash of the
process, and the next durable commit makes it durable too); ``append`` adds an entry to the
caller's own transaction. If the log cannot be written the service fails closed:
``AuditUnavailable`` stops the request before anything is released. A failed transaction leaves
the log as it was, so the service resumes once the disk has room again.

Records carry identifiers, the query text the researcher wrote, refusal reasons, ε and noise
scales: never a row value, an exact aggregate or a count of persons.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtre.audit.events import Event
from fedtre.errors import AuditUnavailable
from fedtre.sqlite_store import enable_wal, lost_write, write_transaction

MAX_FIELD_CHARS = 10_000
FORMAT = "fedtre-audit-v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    entry TEXT NOT NULL,
    link BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (size INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_append_only BEFORE INSERT ON audit_log
    WHEN NEW.seq IS NOT (SELECT coalesce(max(seq), 0) + 1 FROM audit_log)
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
_TRIGGERS = ("audit_log_no_update", "audit_log_no_delete", "audit_log_append_only")


def _expected_schema() -> frozenset[tuple[str, str, str]]:
    con = sqlite3.connect(":memory:")
    try:
        for statement in _SCHEMA.split(";\n"):
            if statement.strip():
                con.execute(statement)
        return _schema(con)
    finally:
        con.close()


def _schema(con: sqlite3.Connection) -> frozenset[tuple[str, str, str]]:
    """Every object on the audit log's table, and every trigger that names it."""
    rows = con.execute(
        "SELECT type, name, coalesce(sql, '') FROM sqlite_master WHERE tbl_name = 'audit_log' "
        "OR (type = 'trigger' AND lower(sql) LIKE '%audit_log%')"
    ).fetchall()
    return frozenset((t, n, " ".join(str(s).split())) for t, n, s in rows)


def schema_problem(con: sqlite3.Connection) -> str:
    """ "" if the audit log's table and triggers are exactly fedtre's; else what differs (a
    trigger added to drop or rewrite entries, a guard removed)."""
    found = _schema(con)
    expected = _EXPECTED
    extra = sorted(n for _, n, _ in found - expected)
    missing = sorted(n for _, n, _ in expected - found)
    if not extra and not missing:
        return ""
    parts = []
    if extra:
        parts.append(f"unexpected or altered: {', '.join(extra)}")
    if missing:
        parts.append(f"missing or altered: {', '.join(missing)}")
    return "the audit log's schema was changed (" + "; ".join(parts) + ")"


_EXPECTED = _expected_schema()


def genesis(log_id: str) -> bytes:
    return hashlib.sha256(f"{FORMAT}\0{log_id}".encode()).digest()


def link(previous: bytes, seq: int, entry: bytes) -> bytes:
    return hashlib.sha256(previous + seq.to_bytes(8, "big") + entry).digest()


def canonical(record: dict[str, Any]) -> str:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


class AuditLog:
    """Append-only, hash-chained; see the module's docstring."""

    def __init__(
        self,
        path: Path,
        actor: str,
        role: str = "node",
        public_key: str = "",
        follows: Path | None = None,
    ) -> None:
        """Open (or create) the log at ``path``. A new log's first entry names ``public_key``
        (hex Ed25519: what signs its checkpoints) and the digest of ``follows`` (an older
        JSON-lines log) if that file exists."""
        self.path = path
        self.actor = actor
        self.role = role
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._closed = False
        self.failed_since: str | None = None  # when writing first failed (cleared on success)
        self._final: str | None = None  # an I/O error: later writes prove nothing (restart)
        # Told (durable, seconds) of every write of its own (metrics); must not raise.
        self.on_write: Callable[[bool, float], None] = lambda durable, seconds: None
        # told of every failed write (a service reports NOT_SERVING until it can write again)
        self.on_failed: Callable[[], None] = lambda: None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fresh = not path.exists()
            con = self._con()
            if fresh:  # the log holds query text and ids: owner only
                os.chmod(path, 0o600)
            enable_wal(con)
            con.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";\n"):  # (executescript would commit)
                    if statement.strip():
                        con.execute(statement)
                problem = schema_problem(con)
                if problem:  # refuse to append to a log that could drop or rewrite entries
                    raise AuditUnavailable(f"{path}: {problem}")
                row = con.execute("SELECT value FROM audit_meta WHERE key = 'log_id'").fetchone()
                if row is None:
                    self.log_id = uuid.uuid4().hex
                    con.execute(
                        "INSERT INTO audit_meta (key, value) VALUES ('log_id', ?)", (self.log_id,)
                    )
                    self._genesis = genesis(self.log_id)
                    self._append(
                        con,
                        Event.LOG_CREATED,
                        {
                            "log_id": self.log_id,
                            "format": FORMAT,
                            "public_key": public_key,
                            "follows": _digest(follows),
                        },
                    )
                else:
                    self.log_id = str(row[0])
                    self._genesis = genesis(self.log_id)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            raise AuditUnavailable(f"cannot open audit log {path}: {exc}") from exc

    # -- writing ---------------------------------------------------------------------------

    def write(self, event: Event, **fields: Any) -> int:
        """Append one entry and return once it is on disk."""
        return self._own(event, fields, durable=True)

    def note(self, event: Event, **fields: Any) -> int:
        """Append one entry; it is durable with the next durable commit on this database."""
        return self._own(event, fields, durable=False)

    def append(self, con: sqlite3.Connection, event: Event, **fields: Any) -> int:
        """Append one entry inside ``con``'s open write transaction (same database)."""
        self._usable()
        if not con.in_transaction:
            raise sqlite3.ProgrammingError("an audit entry is appended inside a transaction")
        return self._append(con, event, fields)

    def _usable(self) -> None:
        if self._closed:
            raise AuditUnavailable(f"audit log {self.path} is closed")
        if self._final is not None:
            raise AuditUnavailable(
                f"audit log {self.path} lost writes ({self._final}): restart the service"
            )

    @property
    def lost_writes(self) -> str | None:
        """Why the log refuses until restart (an I/O error), or None."""
        return self._final

    def _own(self, event: Event, fields: dict[str, Any], durable: bool) -> int:
        self._usable()
        started = time.perf_counter()
        try:
            seq = write_transaction(self._con(), lambda c: self._append(c, event, fields), durable)
        except sqlite3.Error as exc:
            self.failed(exc)
        self.failed_since = None
        with contextlib.suppress(Exception):
            self.on_write(durable, time.perf_counter() - started)
        return seq

    def failed(self, exc: BaseException) -> None:
        """Record that a write failed and raise ``AuditUnavailable``.

        A full disk (or a locked database) leaves the log as it was: writing resumes when it
        can. An I/O error is final until restart: the kernel reports a lost write to one
        fsync only, so a later commit that succeeds proves nothing about the ones before."""
        if self.failed_since is None:
            self.failed_since = _now()
        if lost_write(exc):
            self._final = str(exc)
        with contextlib.suppress(Exception):
            self.on_failed()
        raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc

    def _append(self, con: sqlite3.Connection, event: Event, fields: dict[str, Any]) -> int:
        if not isinstance(event, Event):
            raise TypeError(f"not an audit event kind: {event!r}")
        row = con.execute("SELECT seq, link FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        seq, previous = (int(row[0]) + 1, bytes(row[1])) if row else (1, self._genesis)
        record = {
            "seq": seq,
            "ts": _now(),
            self.role: self.actor,
            "event": event.value,
            **{k: _bounded(v) for k, v in fields.items()},
        }
        entry = canonical(record)
        cur = con.execute(
            "INSERT INTO audit_log (seq, entry, link) VALUES (?, ?, ?)",
            (seq, entry, link(previous, seq, entry.encode())),
        )
        if cur.rowcount != 1:  # something (a trigger added behind our back) dropped it
            raise sqlite3.IntegrityError("the audit entry was not stored")
        return seq

    # -- reading ---------------------------------------------------------------------------

    def head(self) -> tuple[int, bytes]:
        """(size, link of the last entry): what a checkpoint signs."""
        return read_head(self._con(), self._genesis)

    def keep_checkpoint(self, size: int, body: str) -> None:
        """Keep a signed checkpoint beside the log (published from here)."""
        try:
            con = self._con()
            con.execute(
                "INSERT OR REPLACE INTO audit_checkpoints (size, body) VALUES (?, ?)", (size, body)
            )
        except sqlite3.Error as exc:
            self.failed(exc)

    def started(self, event: Event, **fields: Any) -> None:
        """A server's start (durable): with ``config_sha256``, preceded by ``config.changed``
        when the settings differ from those of the last start of the same kind."""
        digest = fields.get("config_sha256") or ""
        row = (
            self._con()
            .execute(
                "SELECT entry FROM audit_log WHERE entry LIKE ? ORDER BY seq DESC LIMIT 1",
                (f'%"event":"{event.value}"%',),
            )
            .fetchone()
        )
        before = json.loads(row[0]).get("config_sha256") if row else None
        if digest and before and before != digest:
            self.write(Event.CONFIG_CHANGED, before=before, after=digest)
        self.write(event, **fields)

    def latest_checkpoint(self) -> str | None:
        """The newest signed checkpoint kept beside the log (JSON), if any."""
        return latest_checkpoint(self._con())

    def entries(self, after: int = 0) -> list[dict[str, Any]]:
        return [json.loads(e) for _, e in _rows(self._con(), after)]

    # -- internals -------------------------------------------------------------------------

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
            with self._guard:
                self._connections.append(con)
        return con

    def close(self) -> None:
        self._closed = True
        with self._guard:
            for con in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
            self._connections.clear()
        self._local = threading.local()


def open_existing(path: Path) -> AuditLog:
    """An existing log, for tools (its actor and role are read from its first entry)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            row = con.execute("SELECT entry FROM audit_log WHERE seq = 1").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot read audit log {path}: {exc}") from exc
    if row is None:
        raise AuditUnavailable(f"{path} holds no fedtre audit log")
    first = json.loads(row[0])
    role = next((r for r in ("node", "coordinator", "registry") if r in first), "node")
    return AuditLog(path, str(first[role]), role=role)


def read_head(con: sqlite3.Connection, start: bytes) -> tuple[int, bytes]:
    row = con.execute("SELECT seq, link FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    return (int(row[0]), bytes(row[1])) if row else (0, start)


def latest_checkpoint(con: sqlite3.Connection) -> str | None:
    row = con.execute("SELECT body FROM audit_checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    return None if row is None else str(row[0])


def _rows(con: sqlite3.Connection, after: int) -> Iterator[tuple[int, str]]:
    yield from con.execute("SELECT seq, entry FROM audit_log WHERE seq > ? ORDER BY seq", (after,))


def entries(path: Path, kinds: Sequence[Event]) -> Iterator[dict[str, Any]]:
    """The entries of the given kinds from the log at ``path`` (read-only), oldest first."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        marks = ",".join("?" * len(kinds))
        rows = con.execute(
            f"SELECT entry FROM audit_log WHERE json_extract(entry, '$.event') IN ({marks}) "
            "ORDER BY seq",
            [k.value for k in kinds],
        )
        for (text,) in rows:
            yield json.loads(text)
    finally:
        con.close()


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every entry of the log at ``path`` (read-only), oldest first."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        try:
            return [json.loads(e) for _, e in _rows(con, 0)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    finally:
        con.close()


def _digest(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    sha256, lines = file_sha256(path)
    return {"file": path.name, "sha256": sha256, "lines": lines}


def file_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, number of lines) of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    lines = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            lines += chunk.count(b"\n")
    return h.hexdigest(), lines


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + "…[truncated]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN or Infinity
    return value

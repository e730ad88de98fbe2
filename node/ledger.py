"""The node's durable privacy-budget ledger and answer store (SQLite, WAL).

A query id belongs to one project (``(project_id, query_id)`` is the key): one project can
neither learn nor block another's ids. Each query id moves through two phases, every step one
``BEGIN IMMEDIATE`` transaction:

1. ``reserve``, before the research database is touched: debit the project's budget and the
   node-wide ceiling with conditional updates that can never go negative, and record the query
   id with what it costs and when its lease ends (state ``reserved``). Whether a query may run
   is decided here, from the ledger alone, so no refusal depends on the data or its timing.
   ``prepare`` then keeps the noisy answer under the id (state ``prepared``). Nothing leaves.
2. ``commit`` (state ``committed``): the answer may now be released, and the debit is final.
   ``abort`` or the end of the lease (``expire_due``) refunds the debit and destroys the answer
   (states ``aborted`` / ``expired``). A committed answer is never refunded; each id is
   committed at most once, and a retry of a committed id returns the stored answer verbatim.

An aborted or expired id may be prepared again (same request only): nothing was released
under it, so a fresh answer releases nothing twice.

One fsync per release: reserve, prepare, abort and expiry commit without waiting for the disk
(``synchronous=NORMAL``): they are visible at once to every connection and process, so budget
checks hold, and they survive a crash of the process. ``commit`` waits for the disk
(``synchronous=FULL``); the fsync of the write-ahead log makes every earlier frame durable too,
so an answer is never released without its durable debit. A power loss before the commit can
lose a reservation, and then nothing was released under it (the coordinator's commit is then
refused and a retry prepares again).

Totals are not stored: they come from the node's configuration at every call, so the ledger
records what was spent and the operator's current policy decides what may still be spent.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

from fedtre.errors import QueryRefused, Refusal
from fedtre.sqlite_store import enable_wal, lost_write, write_transaction
from node.errors import LedgerUnavailable

NODE_SCOPE = "node"
T = TypeVar("T")
# Told every change of a query id's state inside the transaction that makes it (the audit log
# lives in the same database: a release's entry commits with its final debit).
Hook = Callable[[sqlite3.Connection, "Entry"], None]
SCHEMA_VERSION = 3  # 3: the approval each query was prepared under

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spent (
    scope TEXT PRIMARY KEY,
    units INTEGER NOT NULL DEFAULT 0 CHECK (units >= 0)
);
CREATE TABLE IF NOT EXISTS queries (
    project_id TEXT NOT NULL,
    query_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units > 0),
    scopes TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('reserved', 'prepared', 'committed', 'aborted', 'expired')),
    reserved_at TEXT NOT NULL,
    expires_at REAL,
    result TEXT,
    decided_at TEXT,
    approval TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (project_id, query_id)
);
CREATE INDEX IF NOT EXISTS queries_open ON queries (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS queries_state ON queries (state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class State(Enum):
    RESERVED = "reserved"  # debited; the answer is being computed
    PREPARED = "prepared"  # debited; the answer is stored, waiting for commit or abort
    COMMITTED = "committed"  # released: final
    ABORTED = "aborted"  # refunded, answer destroyed
    EXPIRED = "expired"  # the lease ended before a commit: refunded, answer destroyed

    @property
    def holds_budget(self) -> bool:
        return self in (State.RESERVED, State.PREPARED, State.COMMITTED)


def project_scope(project_id: str) -> str:
    return f"project:{project_id}"


def budget_refusal(scope: str) -> QueryRefused:
    return QueryRefused(
        Refusal.BUDGET_EXHAUSTED,
        "This trust's overall privacy budget is used up."
        if scope == NODE_SCOPE
        else "Not enough privacy budget is left for this query.",
    )


@dataclass(frozen=True)
class Entry:
    """One query id's row in the ledger."""

    project_id: str
    query_id: str
    fingerprint: str
    units: int
    state: State
    reserved_at: str  # ISO time the request was received: the answer's timestamp
    expires_at: float | None  # unix time the lease ends (open states only)
    result: str | None  # the stored noisy answer (prepared or committed)
    approval: str = ""  # digest of the signed application it was prepared under ("" hand-kept)


@dataclass(frozen=True)
class Reservation:
    entry: Entry
    created: bool  # this call debited the budget (False: an earlier request of this id did)

    @property
    def units(self) -> int:
        return self.entry.units


# Kept for readers of the ledger (tests, auditors): a released answer and a debit.
@dataclass(frozen=True)
class StoredRelease:
    query_id: str
    project_id: str
    fingerprint: str
    units: int
    result: str
    released_at: str


@dataclass(frozen=True)
class Debit:
    """One query id's debit that still holds budget (reserved, prepared or committed)."""

    query_id: str
    project_id: str
    units: int
    reserved_at: str
    state: State


_COLUMNS = (
    "project_id, query_id, fingerprint, units, state, reserved_at, expires_at, result, approval"
)


def _entry(row: tuple) -> Entry:
    project_id, query_id, fingerprint, units, state, reserved_at, expires_at, result, app = row
    return Entry(
        project_id,
        query_id,
        fingerprint,
        int(units),
        State(state),
        reserved_at,
        expires_at,
        result,
        app or "",
    )


class Ledger:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._local = threading.local()
        self._now = clock  # unix seconds: leases end by it (tests pass a fake clock)
        # Told (durable, seconds) of every write transaction (metrics: ledger write times).
        self.on_write: Callable[[bool, float], None] = lambda durable, seconds: None
        # An I/O error while writing: final until restart (the kernel reports a lost write to
        # one fsync only; a later commit that succeeds proves nothing about earlier ones).
        self.lost_writes: str | None = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fresh = not path.exists()
            con = self._con()
            if fresh:  # the ledger holds every query id and answer: owner only
                os.chmod(path, 0o600)
            enable_wal(con)
            con.execute("BEGIN IMMEDIATE")
            try:
                _migrate(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"cannot open budget ledger {path}: {exc}") from exc

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return con

    # -- reading ---------------------------------------------------------------------------

    def identity(self) -> str:
        """This ledger's id, fixed when it was created."""
        try:
            row = self._con().execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return str(row[0])

    def committed_count(self) -> int:
        """How many answers this ledger has released."""
        try:
            row = (
                self._con()
                .execute("SELECT COUNT(*) FROM queries WHERE state = 'committed'")
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return int(row[0])

    def spent(self, scope: str) -> int:
        try:
            row = (
                self._con().execute("SELECT units FROM spent WHERE scope = ?", (scope,)).fetchone()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return int(row[0]) if row else 0

    def entry(self, project_id: str, query_id: str) -> Entry | None:
        try:
            row = (
                self._con()
                .execute(
                    f"SELECT {_COLUMNS} FROM queries WHERE project_id = ? AND query_id = ?",
                    (project_id, query_id),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return _entry(row) if row else None

    def lookup(self, project_id: str, query_id: str) -> StoredRelease | None:
        """The released (committed) answer of a query id, if there is one."""
        e = self.entry(project_id, query_id)
        if e is None or e.state is not State.COMMITTED or e.result is None:
            return None
        return StoredRelease(
            e.query_id, e.project_id, e.fingerprint, e.units, e.result, e.reserved_at
        )

    def debits(self, project_id: str | None = None) -> list[Debit]:
        """Every query id that holds budget: reserved, prepared or committed."""
        rows = self._listing("state IN ('reserved', 'prepared', 'committed')", project_id)
        return [Debit(e.query_id, e.project_id, e.units, e.reserved_at, e.state) for e in rows]

    def releases(self, project_id: str | None = None) -> list[StoredRelease]:
        rows = self._listing("state = 'committed'", project_id)
        return [
            StoredRelease(
                e.query_id, e.project_id, e.fingerprint, e.units, e.result or "", e.reserved_at
            )
            for e in rows
        ]

    def _listing(self, where: str, project_id: str | None) -> list[Entry]:
        args: tuple[str, ...] = ()
        if project_id is not None:
            where, args = f"{where} AND project_id = ?", (project_id,)
        try:
            rows = (
                self._con()
                .execute(
                    f"SELECT {_COLUMNS} FROM queries WHERE {where} "
                    "ORDER BY reserved_at, project_id, query_id",
                    args,
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return [_entry(r) for r in rows]

    # -- phase 1 ---------------------------------------------------------------------------

    def reserve(
        self,
        project_id: str,
        query_id: str,
        fingerprint: str,
        units: int,
        reserved_at: str,
        limits: Mapping[str, int],
        lease_seconds: float,
        approval: str = "",
        record: Hook | None = None,
    ) -> Reservation:
        """Debit every scope in ``limits`` (scope -> total units allowed) for this query id.

        An id that holds budget already (reserved, prepared or committed) debits nothing: its
        entry is returned with ``created=False`` (the caller checks its fingerprint). An
        aborted or expired id with the same fingerprint is reserved afresh. Raises
        ``QueryRefused(BUDGET_EXHAUSTED)`` if any scope would exceed its total.
        """

        def work(con: sqlite3.Connection) -> Reservation:
            existing = self._get(con, project_id, query_id)
            if existing is not None and (
                existing.state.holds_budget or existing.fingerprint != fingerprint
            ):
                return Reservation(existing, created=False)
            for scope, total in limits.items():
                con.execute("INSERT OR IGNORE INTO spent (scope, units) VALUES (?, 0)", (scope,))
                cur = con.execute(
                    "UPDATE spent SET units = units + ? WHERE scope = ? AND units + ? <= ?",
                    (units, scope, units, total),
                )
                if cur.rowcount != 1:
                    raise budget_refusal(scope)
            expires = self._now() + lease_seconds
            con.execute(
                "INSERT OR REPLACE INTO queries (project_id, query_id, fingerprint, units, "
                "scopes, state, reserved_at, expires_at, result, decided_at, approval) "
                "VALUES (?, ?, ?, ?, ?, 'reserved', ?, ?, NULL, NULL, ?)",
                (
                    project_id,
                    query_id,
                    fingerprint,
                    units,
                    json.dumps(sorted(limits)),
                    reserved_at,
                    expires,
                    approval,
                ),
            )
            entry = Entry(
                project_id,
                query_id,
                fingerprint,
                units,
                State.RESERVED,
                reserved_at,
                expires,
                None,
                approval,
            )
            if record is not None:
                record(con, entry)
            return Reservation(entry, created=True)

        return self._transaction(work, durable=False)

    def prepare(self, entry: Entry, result: str, record: Hook | None = None) -> Entry:
        """Keep the noisy answer of a reserved id (the first answer stored wins) and return the
        id's entry as it now stands."""

        def work(con: sqlite3.Connection) -> Entry:
            cur = con.execute(
                "UPDATE queries SET state = 'prepared', result = ? WHERE project_id = ? AND "
                "query_id = ? AND state = 'reserved' AND fingerprint = ?",
                (result, entry.project_id, entry.query_id, entry.fingerprint),
            )
            now = self._get(con, entry.project_id, entry.query_id)
            if now is None:
                raise LedgerUnavailable("budget ledger lost a reservation")
            if cur.rowcount == 1 and record is not None:
                record(con, now)
            return now

        return self._transaction(work, durable=False)

    # -- phase 2 ---------------------------------------------------------------------------

    def commit(
        self, project_id: str, query_id: str, record: Hook | None = None
    ) -> tuple[Entry | None, bool]:
        """Release a prepared answer: (entry as it now stands, committed by this call).

        Only a prepared id whose lease has not ended is committed (durably, before this
        returns); a committed id is returned unchanged; anything else is not committed (an id
        whose lease has ended is expired and refunded here)."""

        def work(con: sqlite3.Connection) -> tuple[Entry | None, bool]:
            e = self._get(con, project_id, query_id)
            if e is None or e.state is not State.PREPARED:
                return e, False
            if e.expires_at is not None and e.expires_at < self._now():
                return self._refund(con, e, State.EXPIRED, record), False
            con.execute(
                "UPDATE queries SET state = 'committed', expires_at = NULL, decided_at = ? "
                "WHERE project_id = ? AND query_id = ?",
                (_iso_now(), project_id, query_id),
            )
            return self._changed(con, project_id, query_id, record), True

        return self._transaction(work, durable=True)

    def abort(
        self, project_id: str, query_id: str, record: Hook | None = None
    ) -> tuple[Entry | None, bool]:
        """Refund a reserved or prepared id and destroy its answer: (entry, aborted by this
        call). A committed id is never refunded."""

        def work(con: sqlite3.Connection) -> tuple[Entry | None, bool]:
            e = self._get(con, project_id, query_id)
            if e is None or e.state not in (State.RESERVED, State.PREPARED):
                return e, False
            return self._refund(con, e, State.ABORTED, record), True

        return self._transaction(work, durable=False)

    def expire_due(self, record: Hook | None = None) -> list[Entry]:
        """Refund every reserved or prepared id whose lease has ended; returns them."""
        now = self._now()
        try:
            due = (
                self._con()
                .execute("SELECT 1 FROM queries WHERE expires_at < ? LIMIT 1", (now,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        if due is None:  # the common case: one indexed read, no write lock
            return []

        def work(con: sqlite3.Connection) -> list[Entry]:
            rows = con.execute(
                f"SELECT {_COLUMNS} FROM queries WHERE expires_at < ? "
                "AND state IN ('reserved', 'prepared')",
                (now,),
            ).fetchall()
            expired = [_entry(r) for r in rows]
            for e in expired:
                self._refund(con, e, State.EXPIRED, record)
            return expired

        return self._transaction(work, durable=False)

    # -- internals -------------------------------------------------------------------------

    def _refund(
        self, con: sqlite3.Connection, e: Entry, state: State, record: Hook | None
    ) -> Entry:
        row = con.execute(
            "SELECT scopes FROM queries WHERE project_id = ? AND query_id = ?",
            (e.project_id, e.query_id),
        ).fetchone()
        for scope in json.loads(row[0]):
            con.execute("UPDATE spent SET units = units - ? WHERE scope = ?", (e.units, scope))
        con.execute(
            "UPDATE queries SET state = ?, result = NULL, expires_at = NULL, decided_at = ? "
            "WHERE project_id = ? AND query_id = ?",
            (state.value, _iso_now(), e.project_id, e.query_id),
        )
        return self._changed(con, e.project_id, e.query_id, record)

    def _changed(
        self, con: sqlite3.Connection, project_id: str, query_id: str, record: Hook | None
    ) -> Entry:
        now = self._get(con, project_id, query_id)
        if now is None:
            raise LedgerUnavailable("budget ledger lost a query id")
        if record is not None:
            record(con, now)
        return now

    def _get(self, con: sqlite3.Connection, project_id: str, query_id: str) -> Entry | None:
        row = con.execute(
            f"SELECT {_COLUMNS} FROM queries WHERE project_id = ? AND query_id = ?",
            (project_id, query_id),
        ).fetchone()
        return _entry(row) if row else None

    def _transaction(self, work: Callable[[sqlite3.Connection], T], durable: bool) -> T:
        if self.lost_writes is not None:
            raise LedgerUnavailable(
                f"budget ledger lost writes ({self.lost_writes}): restart the node"
            )
        con = self._con()
        started = time.perf_counter()
        try:
            out = write_transaction(con, work, durable)
        except sqlite3.Error as exc:
            if lost_write(exc):
                self.lost_writes = str(exc)
            raise LedgerUnavailable(f"budget ledger write failed: {exc}") from exc
        with contextlib.suppress(Exception):
            self.on_write(durable, time.perf_counter() - started)
        return out


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _migrate(con: sqlite3.Connection) -> None:
    """Create the schema, or bring a version-1 ledger (ids global, one phase) to version 2.

    Version 1 kept ``reservations`` (debits) and ``releases`` (answers returned). A release
    becomes a committed entry; a reservation without a release (a query killed mid-read) was
    never answered, so it is refunded, as an expired lease would be."""
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"ledger schema {version} is newer than this fedtre ({SCHEMA_VERSION})"
        )
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    columns = {r[1] for r in con.execute("PRAGMA table_info(queries)")}
    if "approval" not in columns:  # version 2: no approvals recorded
        con.execute("ALTER TABLE queries ADD COLUMN approval TEXT NOT NULL DEFAULT ''")
    old = {
        r[0]
        for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name IN ('reservations', 'releases')"
        )
    }
    if version < SCHEMA_VERSION and old == {"reservations", "releases"}:
        scopes = "json_array('node', 'project:' || project_id)"
        con.execute(
            "INSERT OR IGNORE INTO queries (project_id, query_id, fingerprint, units, scopes, "
            "state, reserved_at, expires_at, result, decided_at) "
            f"SELECT project_id, query_id, fingerprint, units, {scopes}, 'committed', "
            "released_at, NULL, result, released_at FROM releases"
        )
        orphans = con.execute(
            "SELECT project_id, query_id, fingerprint, units, reserved_at FROM reservations r "
            "WHERE NOT EXISTS (SELECT 1 FROM releases s WHERE s.query_id = r.query_id)"
        ).fetchall()
        for project_id, query_id, fingerprint, units, reserved_at in orphans:
            for scope in (NODE_SCOPE, project_scope(project_id)):
                con.execute(
                    "UPDATE spent SET units = max(0, units - ?) WHERE scope = ?", (units, scope)
                )
            con.execute(
                "INSERT OR IGNORE INTO queries (project_id, query_id, fingerprint, units, scopes, "
                "state, reserved_at, expires_at, result, decided_at) "
                "VALUES (?, ?, ?, ?, json_array('node', 'project:' || ?), 'expired', ?, NULL, "
                "NULL, ?)",
                (project_id, query_id, fingerprint, units, project_id, reserved_at, _iso_now()),
            )
        con.execute("DROP TABLE reservations")
        con.execute("DROP TABLE releases")
    # This ledger's identity: a node's records outside its state directory name it, so that a
    # lost or replaced ledger is noticed instead of silently starting the budget over.
    con.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?)", (uuid.uuid4().hex,)
    )
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

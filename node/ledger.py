"""The node's durable privacy-budget ledger and result store (SQLite, WAL, synchronous=FULL).

Two steps, each one transaction (``BEGIN IMMEDIATE``):

1. ``reserve``, before the research database is touched: debit the project's budget and the
   node-wide ceiling with conditional updates that can never go negative, and record the query
   id with what it costs. Whether a query may run is decided here, from the ledger alone, so no
   refusal ever depends on the data or on how long it took to read.
2. ``store``, after the noisy result is computed: keep it under its query id. The first stored
   result of a query id is the only one ever returned; a retry returns it verbatim.

A crash after (1) leaves a debit and no result: nothing was released, and a retry of the query
id computes and stores the answer without a second debit. Only a stored result is returned to
anyone, so nothing is released without a durable debit.

One fsync per release: (1) commits without waiting for the disk (``synchronous=NORMAL``): it
is visible at once to every connection and process, so budget checks hold, and it survives a
crash of the process. (2) commits with ``synchronous=FULL``: its fsync of the write-ahead log
makes every earlier frame durable too, the reservation included, so an answer is never durable
without its debit. Only a power loss between (1) and (2) can lose a reservation, and then no
answer was released under it.

Totals are not stored: they come from the node's configuration at every call, so the ledger
records what was spent and the operator's current policy decides what may still be spent.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtre.errors import QueryRefused, Refusal
from node.errors import LedgerUnavailable

NODE_SCOPE = "node"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spent (
    scope TEXT PRIMARY KEY,
    units INTEGER NOT NULL DEFAULT 0 CHECK (units >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    query_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units > 0),
    reserved_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    query_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units > 0),
    result TEXT NOT NULL,
    released_at TEXT NOT NULL
);
"""


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
class StoredRelease:
    query_id: str
    project_id: str
    fingerprint: str
    units: int
    result: str
    released_at: str


@dataclass(frozen=True)
class Reservation:
    query_id: str
    project_id: str
    fingerprint: str
    units: int
    reserved_at: str
    created: bool  # this call debited the budget (False: an earlier request of this id did)
    stored: StoredRelease | None = None  # the answer, if one is already stored


@dataclass(frozen=True)
class Debit:
    """One query id's debit, whether or not its answer was stored."""

    query_id: str
    project_id: str
    units: int
    reserved_at: str


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            con = self._con()
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
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

    def spent(self, scope: str) -> int:
        try:
            row = (
                self._con().execute("SELECT units FROM spent WHERE scope = ?", (scope,)).fetchone()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return int(row[0]) if row else 0

    def lookup(self, query_id: str) -> StoredRelease | None:
        """The stored answer of a query id, if there is one."""
        row = self._one(
            "SELECT query_id, project_id, fingerprint, units, result, released_at "
            "FROM releases WHERE query_id = ?",
            query_id,
        )
        return StoredRelease(*row) if row else None

    def _reservation(self, query_id: str) -> tuple | None:
        return self._one(
            "SELECT query_id, project_id, fingerprint, units, reserved_at "
            "FROM reservations WHERE query_id = ?",
            query_id,
        )

    def _one(self, sql: str, query_id: str) -> tuple | None:
        try:
            return self._con().execute(sql, (query_id,)).fetchone()
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc

    def reserve(
        self,
        query_id: str,
        project_id: str,
        fingerprint: str,
        units: int,
        reserved_at: str,
        limits: Mapping[str, int],
    ) -> Reservation:
        """Debit every scope in ``limits`` (scope -> total units allowed) for this query id.

        A query id that is already reserved or stored debits nothing: its reservation (and its
        stored answer, if any) is returned with ``created=False``. Raises
        ``QueryRefused(BUDGET_EXHAUSTED)`` if any scope would exceed its total.
        """
        con = self._con()
        try:
            # Committed (visible to every connection and process, so the budget check holds)
            # without waiting for the disk: the reservation becomes durable with the next
            # fsync of the write-ahead log, at the latest with this query's stored answer.
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("BEGIN IMMEDIATE")
            try:
                existing = self._existing(query_id)
                if existing is not None:
                    con.execute("ROLLBACK")
                    return existing
                for scope, total in limits.items():
                    con.execute(
                        "INSERT OR IGNORE INTO spent (scope, units) VALUES (?, 0)", (scope,)
                    )
                    cur = con.execute(
                        "UPDATE spent SET units = units + ? WHERE scope = ? AND units + ? <= ?",
                        (units, scope, units, total),
                    )
                    if cur.rowcount != 1:
                        con.execute("ROLLBACK")
                        raise budget_refusal(scope)
                con.execute(
                    "INSERT INTO reservations (query_id, project_id, fingerprint, units, "
                    "reserved_at) VALUES (?, ?, ?, ?, ?)",
                    (query_id, project_id, fingerprint, units, reserved_at),
                )
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger write failed: {exc}") from exc
        return Reservation(query_id, project_id, fingerprint, units, reserved_at, created=True)

    def _existing(self, query_id: str) -> Reservation | None:
        stored = self.lookup(query_id)
        if stored is not None:  # also answers stored before reservations existed
            return Reservation(
                stored.query_id,
                stored.project_id,
                stored.fingerprint,
                stored.units,
                stored.released_at,
                created=False,
                stored=stored,
            )
        row = self._reservation(query_id)
        if row is None:
            return None
        qid, project_id, fingerprint, units, reserved_at = row
        return Reservation(qid, project_id, fingerprint, units, reserved_at, created=False)

    def store(self, reservation: Reservation, result: str) -> StoredRelease:
        """Keep the answer of a reserved query id; the first stored answer wins and is returned."""
        try:  # one statement: its own durable transaction
            con = self._con()
            con.execute("PRAGMA synchronous=FULL")
            con.execute(
                "INSERT OR IGNORE INTO releases (query_id, project_id, fingerprint, units, "
                "result, released_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    reservation.query_id,
                    reservation.project_id,
                    reservation.fingerprint,
                    reservation.units,
                    result,
                    reservation.reserved_at,
                ),
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger write failed: {exc}") from exc
        stored = self.lookup(reservation.query_id)
        if stored is None:
            raise LedgerUnavailable("budget ledger lost a stored answer")
        return stored

    def debits(self, project_id: str | None = None) -> list[Debit]:
        """Every debit: reservations, and answers stored before reservations existed."""
        rows = self._listing(
            "SELECT query_id, project_id, units, reserved_at AS at FROM reservations UNION ALL "
            "SELECT query_id, project_id, units, released_at FROM releases r WHERE NOT EXISTS "
            "(SELECT 1 FROM reservations s WHERE s.query_id = r.query_id)",
            project_id,
        )
        return [Debit(*r) for r in rows]

    def releases(self, project_id: str | None = None) -> list[StoredRelease]:
        rows = self._listing(
            "SELECT query_id, project_id, fingerprint, units, result, released_at AS at "
            "FROM releases",
            project_id,
        )
        return [StoredRelease(*r) for r in rows]

    def _listing(self, sql: str, project_id: str | None) -> list[tuple]:
        """Rows of ``sql`` (which names its time ``at``), of one project or all, oldest first."""
        where, args = (
            ("WHERE project_id = ?", (project_id,)) if project_id is not None else ("", ())
        )
        try:
            return (
                self._con()
                .execute(f"SELECT * FROM ({sql}) {where} ORDER BY at, query_id", args)
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc

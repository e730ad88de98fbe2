"""The node's durable privacy-budget ledger and result store (SQLite, WAL, synchronous=FULL).

One transaction (``BEGIN IMMEDIATE``) does three things together, or none of them:
debit the project's budget and the node-wide ceiling with conditional updates that can never go
negative, and store the noisy result under its query id. Only after that commit is a result
returned to anyone, so a crash at any point leaves either no debit and nothing released, or a
debit with the stored answer that every retry of the query id returns.

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
        try:
            row = (
                self._con()
                .execute(
                    "SELECT query_id, project_id, fingerprint, units, result, released_at "
                    "FROM releases WHERE query_id = ?",
                    (query_id,),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return StoredRelease(*row) if row else None

    def commit_release(
        self,
        query_id: str,
        project_id: str,
        fingerprint: str,
        units: int,
        result: str,
        released_at: str,
        limits: Mapping[str, int],
    ) -> tuple[StoredRelease, bool]:
        """Debit every scope in ``limits`` (scope -> total units allowed) and store the result.

        Returns the stored release and whether this call created it. If the query id is already
        stored (a concurrent retry won), nothing is debited and the stored release is returned.
        Raises ``QueryRefused(BUDGET_EXHAUSTED)`` if any scope would exceed its total.
        """
        con = self._con()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                existing = self.lookup(query_id)
                if existing is not None:
                    con.execute("ROLLBACK")
                    return existing, False
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
                    "INSERT INTO releases (query_id, project_id, fingerprint, units, result, "
                    "released_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (query_id, project_id, fingerprint, units, result, released_at),
                )
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger write failed: {exc}") from exc
        stored = StoredRelease(query_id, project_id, fingerprint, units, result, released_at)
        return stored, True

    def releases(self, project_id: str | None = None) -> list[StoredRelease]:
        sql = "SELECT query_id, project_id, fingerprint, units, result, released_at FROM releases"
        args: tuple[str, ...] = ()
        if project_id is not None:
            sql += " WHERE project_id = ?"
            args = (project_id,)
        try:
            rows = self._con().execute(sql + " ORDER BY released_at, query_id", args).fetchall()
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"budget ledger read failed: {exc}") from exc
        return [StoredRelease(*r) for r in rows]

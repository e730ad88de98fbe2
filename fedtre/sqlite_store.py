"""What the ledger and the audit logs share about SQLite: write-ahead logging, one write
transaction, and telling a lost write (final) from a full disk (not)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_SQLITE_IOERR = 10


def enable_wal(con: sqlite3.Connection, wait_seconds: float = 60.0) -> None:
    """Switch to write-ahead logging, waiting for other processes opening the database at the
    same moment (SQLite does not apply its busy timeout to this switch)."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.005
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def write_transaction(
    con: sqlite3.Connection, work: Callable[[sqlite3.Connection], T], durable: bool
) -> T:
    """``work`` in one ``BEGIN IMMEDIATE`` transaction; ``durable``: the commit waits for the
    disk (``synchronous=FULL``). Rolled back on any error, which is raised."""
    con.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    con.execute("BEGIN IMMEDIATE")
    try:
        out = work(con)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    return out


def lost_write(exc: BaseException) -> bool:
    """An I/O error: the kernel reports a lost write to one fsync only, so a later commit that
    succeeds proves nothing about earlier ones; the store must refuse until restart. (A full
    disk is not one: the transaction left the database as it was.)"""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_IOERR

"""Switch a SQLite database to write-ahead logging, waiting for other processes that are
opening it at the same moment (SQLite does not apply its busy timeout to this switch)."""

from __future__ import annotations

import sqlite3
import time


def enable_wal(con: sqlite3.Connection, wait_seconds: float = 60.0) -> None:
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

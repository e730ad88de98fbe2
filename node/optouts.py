"""Live, granular opt-outs: persons who said no, kept at the node and applied to every query.

Three kinds, as service users asked for them:

- ``national``: no research use at all: the person does not exist for any project;
- ``commercial``: no commercial use: the person does not exist for projects whose approved
  purpose is commercial (they still count for public-benefit research and service evaluation);
- ``mental_health``: no use of my mental-health records: the person does not exist for a query
  that reads mental-health rows or columns (a project approved up to the mental-health tier or
  above, over a view whose rows at that tier include them, or a query naming such a column).

The list lives in the node's state directory (``optouts.sqlite``, owner-only: it is
person-level data, kept with the same care as the database) and is changed with ``fedtre node
optout import|remove``; a running node sees a change from its next query (SQLite's
``data_version``), without a reload. The node removes the persons inside the query, before any
aggregate or cohort, by their ``person_id``: everything derived for any other person depends only
on that person's own rows, so an opted-out person has exactly no influence on what is released.
Counts per kind are shown to operators; the ids never leave this module except into the query.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pyarrow as pa

from fedtre.errors import ConfigError, InternalError

FILE = "optouts.sqlite"
MAX_IDS = 50_000_000


class OptOut(Enum):
    NATIONAL = "national"
    COMMERCIAL = "commercial"
    MENTAL_HEALTH = "mental_health"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS optout (
    person_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('national', 'commercial', 'mental_health')),
    PRIMARY KEY (person_id, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS disputed (
    person_id INTEGER NOT NULL,
    view TEXT NOT NULL,
    PRIMARY KEY (person_id, view)
) WITHOUT ROWID
"""


@functools.cache
def _empty() -> pa.Table:  # not at import: building a table imports pandas (0.2 s)
    return pa.table({"id": pa.array([], type=pa.int64())})


class OptOutsUnavailable(InternalError):
    """The opt-out list cannot be read: the node answers nothing rather than ignore it."""


@dataclass(frozen=True)
class Change:
    kind: OptOut
    added: int
    removed: int
    total: int


class OptOuts:
    """The opt-out list of one node. ``ids(kinds)`` is asked on every query."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE
        self._local = threading.local()
        self._lock = threading.Lock()
        self._version: int | None = None
        self._watcher: sqlite3.Connection | None = None
        self._watched: tuple[int, int] = (-1, -1)
        self._cache: dict[tuple[frozenset[OptOut], frozenset[str]], pa.Table] = {}
        _empty()  # made now, not inside the first query's time (it imports pandas: 0.2 s)
        try:
            fresh = not self.path.exists()
            con = self._con()
            if fresh or stat.S_IMODE(self.path.stat().st_mode) & 0o077:
                os.chmod(self.path, 0o600)  # person-level data: owner only
            con.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise OptOutsUnavailable(f"cannot open the opt-out list {self.path}: {exc}") from exc

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return con

    # -- the query path ------------------------------------------------------------------------

    def ids(self, kinds: frozenset[OptOut], disputed: frozenset[str] = frozenset()) -> pa.Table:
        """The persons opted out of any of ``kinds`` now, as an Arrow table (column ``id``,
        sorted; no rows: nobody), ready for the query (``node.compiler.run_exact``).

        One connection watches the file: SQLite's ``data_version`` on it changes whenever
        another connection (``fedtre node optout``) has committed a change."""
        if not kinds and not disputed:
            return _empty()
        with self._lock:
            try:
                watch = self._watch()  # reopened if the file was replaced; refused if gone
                version = int(watch.execute("PRAGMA data_version").fetchone()[0])
                if version != self._version:
                    self._cache.clear()
                    self._version = version
                key = (kinds, disputed)
                cached = self._cache.get(key)
                if cached is not None:
                    return cached
                k_marks = ", ".join("?" for _ in kinds) or "NULL"
                v_marks = ", ".join("?" for _ in disputed) or "NULL"
                rows = watch.execute(
                    f"SELECT person_id FROM optout WHERE kind IN ({k_marks}) UNION "
                    f"SELECT person_id FROM disputed WHERE view IN ({v_marks}) ORDER BY 1",
                    [*(k.value for k in kinds), *sorted(disputed)],
                ).fetchall()
            except sqlite3.Error as exc:
                raise OptOutsUnavailable(f"cannot read the opt-out list: {exc}") from exc
            out = pa.table({"id": pa.array([r[0] for r in rows], type=pa.int64())})
            self._cache[key] = out
            return out

    def _watch(self) -> sqlite3.Connection:
        """The watching connection, on the file now at the path: a list restored from a
        backup or re-created is opened afresh; a missing one refuses (never an empty list)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise OptOutsUnavailable(
                f"the opt-out list {self.path} is missing: restore it; this node answers no "
                "query without it"
            ) from None
        identity = (st.st_dev, st.st_ino)
        if self._watcher is None or identity != self._watched:
            if self._watcher is not None:
                self._watcher.close()
            self._watcher = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=False
            )
            self._watcher.execute("PRAGMA busy_timeout=60000")
            self._watched = identity
            self._version = None
            self._cache.clear()
        return self._watcher

    # -- operators -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        rows = self._con().execute("SELECT kind, COUNT(*) FROM optout GROUP BY kind").fetchall()
        found = {str(k): int(n) for k, n in rows}
        return {k.value: found.get(k.value, 0) for k in OptOut}

    def disputes(self) -> dict[str, int]:
        """Persons with disputed records, per view."""
        rows = self._con().execute("SELECT view, COUNT(*) FROM disputed GROUP BY view").fetchall()
        return {str(v): int(n) for v, n in rows}

    def dispute(self, view: str, ids: Iterable[int], *, add: bool) -> tuple[int, int]:
        """Mark (or unmark) persons' records in ``view`` as disputed: (changed, now held)."""
        return self._write("disputed", "view", view, ids, add=add)

    def add(self, kind: OptOut, ids: Iterable[int]) -> Change:
        return self._change(kind, ids, add=True)

    def remove(self, kind: OptOut, ids: Iterable[int]) -> Change:
        return self._change(kind, ids, add=False)

    def _change(self, kind: OptOut, ids: Iterable[int], *, add: bool) -> Change:
        changed, total = self._write("optout", "kind", kind.value, ids, add=add)
        return Change(kind, changed if add else 0, 0 if add else changed, total)

    def _write(
        self, table: str, column: str, value: str, ids: Iterable[int], *, add: bool
    ) -> tuple[int, int]:
        """Add (or remove) (person, ``value``) rows in one transaction: (changed, now held).
        ``table`` and ``column`` are this module's own names, never input."""
        con = self._con()
        rows = [(int(i), value) for i in ids]
        con.execute("BEGIN IMMEDIATE")
        try:
            before = con.total_changes
            if add:
                con.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)", rows)
            else:
                con.executemany(f"DELETE FROM {table} WHERE person_id = ? AND {column} = ?", rows)
            changed = con.total_changes - before
            sql = f"SELECT COUNT(*) FROM {table} WHERE {column} = ?"
            (total,) = con.execute(sql, (value,)).fetchone()
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return changed, int(total)


def read_person_ids(path: Path) -> list[int]:
    """A CSV with a ``person_id`` column (the ids the trust's database uses). Refuses the whole
    file on any bad line, naming the line, never its text: no opt-out is skipped silently."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: not a readable UTF-8 file") from exc
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "person_id" not in [f.strip() for f in reader.fieldnames]:
        raise ConfigError(f"{path}: needs a 'person_id' column")
    column = next(f for f in reader.fieldnames if f.strip() == "person_id")
    out = []
    for line, row in enumerate(reader, start=2):
        value = (row.get(column) or "").strip()
        if not value.isdigit() or len(value) > 18:
            raise ConfigError(f"{path} line {line}: person_id must be a whole number")
        out.append(int(value))
        if len(out) > MAX_IDS:
            raise ConfigError(f"{path}: more than {MAX_IDS:,} lines")
    return out

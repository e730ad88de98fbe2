"""The node's research database, opened read-only and locked down, and checked before use.

External access (file reads, COPY, ATTACH, INSTALL, httpfs) is disabled and the configuration is
locked, so even a compiler bug could not make DuckDB read or write anything but this file.

What the privacy of every answer rests on is checked when the database is opened, not assumed
from the loader: the database was built for this catalog and its reference date; every view has
exactly the catalog's columns; clamped copies lie within the catalog bounds; each row level's
rank is present exactly on the rows visible at that level, starts at 1 and is unique per person,
and the level's cap flag (what queries read) agrees with it; no row lies beyond the cap at every
level (so one person's records bound a query's work); and a view with a cap of one row per
person (``patients``) has one row per person.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb

from fedtre.catalog import Catalog, ColumnType, Tier, View
from fedtre.errors import FedtreError
from node.errors import DatabaseError

META_TABLE = "_fedtre_meta"


def clamped_column(name: str) -> str:
    """The stored copy of a numeric column, clamped to the catalog's bounds (used by SUM)."""
    return f"_clamped_{name}"


def rank_column(level: Tier) -> str:
    """Each person's rows visible at ``level``, numbered 1, 2, ... in a fixed order that depends
    only on that person's own rows; NULL on rows above the level."""
    return f"_rank_{level.value}"


def kept_column(level: Tier) -> str:
    """Whether a row is among its person's first ``max_rows_per_person`` rows at ``level``
    (``rank_column(level) <= cap``; FALSE above the level): the cap filter queries read."""
    return f"_kept_{level.value}"


def stored_columns(view: View) -> set[str]:
    """Exactly the columns the loader stores for a research view."""
    numeric = [c.name for c in view.columns.values() if c.type is ColumnType.INTEGER]
    ranks = [rank_column(level) for level in view.row_levels]
    kept = [kept_column(level) for level in view.row_levels]
    return {"person_id", *ranks, *kept, *view.columns, *map(clamped_column, numeric)}


def row_tier_sql(view: View, alias: str = "") -> str:
    """SQL for a row's tier as a number (``Tier.rank``): the highest value tier among its values."""
    prefix = f"{alias}." if alias else ""
    arms = []
    for col in view.columns.values():
        raised = {v: t for v, t in col.value_tiers.items() if t > view.tier}
        if not raised:
            continue
        whens = " ".join(
            f"WHEN {_literal(value)} THEN {tier.rank}" for value, tier in raised.items()
        )
        arms.append(f'CASE {prefix}"{col.name}" {whens} ELSE {view.tier.rank} END')
    if not arms:
        return str(view.tier.rank)
    return arms[0] if len(arms) == 1 else f"GREATEST({', '.join(arms)})"


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def open_research_db(path: Path, catalog: Catalog, threads: int = 2, memory_limit: str = "4GB"):
    """Open the node database for queries; refuses one that breaks what privacy relies on."""
    if not path.is_file():
        raise DatabaseError(f"node database {path} does not exist: run 'fedtre node load' first")
    try:
        con = duckdb.connect(
            str(path),
            read_only=True,
            config={
                "threads": threads,
                "memory_limit": memory_limit,
                "enable_external_access": False,
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "lock_configuration": True,
            },
        )
        meta = dict(con.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    except duckdb.Error as exc:
        raise DatabaseError(f"cannot open node database {path}: {exc}") from exc
    try:
        _check_meta(meta, catalog, path)
        _check_views(con, catalog)
    except BaseException:
        con.close()
        raise
    return con


def _check_meta(meta: dict[str, str], catalog: Catalog, path: Path) -> None:
    if meta.get("catalog_version") != catalog.version:
        raise DatabaseError(
            f"node database {path} was built for catalog {meta.get('catalog_version')!r}, "
            f"this node runs catalog {catalog.version!r}: reload it with 'fedtre node load'"
        )
    if meta.get("reference_date") != catalog.reference_date.isoformat():
        raise DatabaseError(
            f"node database {path} computed ages at {meta.get('reference_date')!r}, the catalog "
            f"says {catalog.reference_date.isoformat()}: reload it with 'fedtre node load'"
        )


def _check_views(con, catalog: Catalog) -> None:
    for name, view in catalog.views.items():
        try:
            columns = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        except duckdb.Error as exc:
            raise DatabaseError(f"node database has no view {name}: reload it") from exc
        if columns != stored_columns(view):
            raise DatabaseError(f"node database view {name} does not match the catalog: reload it")
        tier = row_tier_sql(view)
        cap = int(view.max_rows_per_person)
        within = " OR ".join(
            f"COALESCE({rank_column(level)} <= {cap}, FALSE)" for level in view.row_levels
        )
        checks = ["person_id IS NULL", f"NOT ({within})"]  # rows beyond every cap: not stored
        for level in view.row_levels:
            rank, kept = rank_column(level), kept_column(level)
            # present exactly on the rows visible at this level, and from 1 up
            checks.append(f"({rank} IS NULL) <> ({tier} > {level.rank})")
            checks.append(f"{rank} < 1")
            # the flag queries read says exactly what the rank says
            checks.append(f"{kept} IS NULL OR {kept} <> COALESCE({rank} <= {cap}, FALSE)")
        for col in view.columns.values():
            if col.type is ColumnType.INTEGER:
                c, lo, hi = clamped_column(col.name), int(col.lower or 0), int(col.upper or 0)
                checks.append(f'"{c}" IS NULL OR "{c}" < {lo} OR "{c}" > {hi}')
        bad = con.execute(f'SELECT count(*) FROM "{name}" WHERE {" OR ".join(checks)}').fetchone()
        if bad[0]:
            raise DatabaseError(f"node database view {name} breaks its bounds: reload it")
        keys = [f"person_id, {rank_column(level)}" for level in view.row_levels]
        if view.max_rows_per_person == 1:
            keys.append("person_id")
        for key in keys:
            duplicated = con.execute(
                f'SELECT count(*) FROM (SELECT {key} FROM "{name}" '
                f"WHERE {key.split(', ')[-1]} IS NOT NULL GROUP BY {key} HAVING count(*) > 1)"
            ).fetchone()
            if duplicated[0]:
                raise DatabaseError(
                    f"node database view {name} has rows that are not unique per person "
                    f"({key}): reload it"
                )


class ResearchDatabase:
    """The opened research database: the only way the engine reads data.

    ``fedtre node load`` replaces the database file atomically. Before each query the node
    looks (one ``stat``) whether the file at its path is still the one it opened; if not, it
    opens the new one, checks it like at start-up, and switches to it for the following
    queries; queries already running finish on the old one, which is closed after them. A new
    file that fails the checks is refused loudly (``on_reload``) and the node keeps serving the
    database it has. So a reload (e.g. with a new opt-out list) takes effect without a restart.
    """

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        threads: int,
        memory_limit: str,
        on_reload: Callable[[bool, str], None] = lambda ok, detail: None,
    ) -> None:
        self._path = path
        self._catalog = catalog
        self._threads = threads
        self._memory_limit = memory_limit
        self._on_reload = on_reload
        self._identity = _file_identity(path)
        self._con = open_research_db(path, catalog, threads, memory_limit)
        self.data_as_of = data_as_of(self._con)  # the extract's date: every answer states it
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._active: Counter[int] = Counter()  # cursors open per connection
        self._retired: dict[int, Any] = {}

    @contextlib.contextmanager
    def reading(self) -> Iterator[Any]:
        """A cursor of the locked-down connection for one query on one thread, on the newest
        loaded database."""
        self._maybe_reload()
        with self._lock:
            con = self._con
            self._active[id(con)] += 1
            cursor = con.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
            with self._lock:
                self._active[id(con)] -= 1
                if id(con) in self._retired and self._active[id(con)] == 0:
                    self._retired.pop(id(con)).close()

    def cursor(self) -> Any:
        """A cursor on the connection now open, without looking for a reload (measurements)."""
        with self._lock:
            return self._con.cursor()

    def close(self) -> None:
        with self._lock:
            self._con.close()
            for con in self._retired.values():
                con.close()
            self._retired.clear()

    def _maybe_reload(self) -> None:
        try:
            identity = _file_identity(self._path)
        except OSError:  # mid-replace or removed: keep serving what is open
            return
        if identity == self._identity:
            return
        with self._reload_lock:
            if identity == self._identity:
                return
            previous, self._identity = self._identity, identity  # judged once, if audited
            # DuckDB shares one instance per path within a process, so the new file is opened
            # under a name of its own (a hard link, removed once open: the inode stays).
            alias = self._path.with_name(f".{self._path.name}.open-{uuid.uuid4().hex}")
            try:
                os.link(self._path, alias)
                new = open_research_db(alias, self._catalog, self._threads, self._memory_limit)
            except (FedtreError, OSError) as exc:
                try:
                    self._on_reload(False, str(exc).replace(alias.name, self._path.name))
                except BaseException:
                    self._identity = previous  # not audited: judged again next time
                    raise
                return
            finally:
                alias.unlink(missing_ok=True)
            loaded_at = _loaded_at(new)
            try:  # audited before the switch: a switch that cannot be audited does not happen
                self._on_reload(True, loaded_at)
            except BaseException:
                self._identity = previous
                new.close()
                raise
            with self._lock:
                old = self._con
                self._con = new
                self.data_as_of = data_as_of(new)
                if self._active[id(old)] == 0:
                    old.close()
                else:
                    self._retired[id(old)] = old


def _file_identity(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_mtime_ns)


def data_as_of(con: Any) -> str:
    """The date of the trust's extract (``fedtre node load --extract-date``; else the day it
    was loaded), YYYY-MM-DD."""
    try:
        rows = dict(
            con.execute(
                f"SELECT key, value FROM {META_TABLE} WHERE key IN ('extract_date', 'loaded_at')"
            ).fetchall()
        )
    except duckdb.Error:
        return ""
    return str(rows.get("extract_date") or str(rows.get("loaded_at", ""))[:10])


def _loaded_at(con: Any) -> str:
    try:
        row = con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'loaded_at'").fetchone()
    except duckdb.Error:
        return ""
    return str(row[0]) if row else ""

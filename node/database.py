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

import threading
from pathlib import Path

import duckdb

from fedtre.catalog import Catalog, ColumnType, Tier, View
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
    """The opened research database: the only way the engine reads data."""

    def __init__(self, path: Path, catalog: Catalog, threads: int, memory_limit: str) -> None:
        self._con = open_research_db(path, catalog, threads, memory_limit)
        self._lock = threading.Lock()

    def cursor(self):
        """A cursor of the locked-down connection, for one query on one thread."""
        with self._lock:
            return self._con.cursor()

    def close(self) -> None:
        self._con.close()

"""The node's research database, opened read-only and locked down.

External access (file reads, COPY, ATTACH, INSTALL, httpfs) is disabled and the configuration is
locked, so even a compiler bug could not make DuckDB read or write anything but this file.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from fedtre.catalog import Catalog, ColumnType, View
from node.errors import DatabaseError

META_TABLE = "_fedtre_meta"
RANK_COLUMN = "_rank"


def clamped_column(name: str) -> str:
    """The stored copy of a numeric column, clamped to the catalog's bounds (used by SUM)."""
    return f"_clamped_{name}"


def stored_columns(view: View) -> set[str]:
    """Exactly the columns the loader stores for a research view."""
    numeric = [c.name for c in view.columns.values() if c.type is ColumnType.INTEGER]
    return {"person_id", RANK_COLUMN, *view.columns, *map(clamped_column, numeric)}


def open_research_db(path: Path, catalog: Catalog, threads: int = 2, memory_limit: str = "4GB"):
    """Open the node database for queries; checks it was built for this catalog."""
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
    if meta.get("catalog_version") != catalog.version:
        con.close()
        raise DatabaseError(
            f"node database {path} was built for catalog {meta.get('catalog_version')!r}, "
            f"this node runs catalog {catalog.version!r}: reload it with 'fedtre node load'"
        )
    try:
        _check_views(con, catalog)
    except BaseException:
        con.close()
        raise
    return con


def _check_views(con, catalog: Catalog) -> None:
    """The invariants query-time privacy relies on: the columns, the clamped bounds and ranks."""
    for name, view in catalog.views.items():
        try:
            columns = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        except duckdb.Error as exc:
            raise DatabaseError(f"node database has no view {name}: reload it") from exc
        if columns != stored_columns(view):
            raise DatabaseError(f"node database view {name} does not match the catalog: reload it")
        checks = [f"{RANK_COLUMN} IS NULL OR {RANK_COLUMN} < 1 OR person_id IS NULL"]
        for col in view.columns.values():
            if col.type is ColumnType.INTEGER:
                c, lo, hi = clamped_column(col.name), int(col.lower or 0), int(col.upper or 0)
                checks.append(f'"{c}" IS NULL OR "{c}" < {lo} OR "{c}" > {hi}')
        bad = con.execute(f'SELECT count(*) FROM "{name}" WHERE {" OR ".join(checks)}').fetchone()
        if bad[0]:
            raise DatabaseError(f"node database view {name} breaks its bounds: reload it")

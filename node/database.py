"""The node's research database, opened read-only and locked down.

External access (file reads, COPY, ATTACH, INSTALL, httpfs) is disabled and the configuration is
locked, so even a compiler bug could not make DuckDB read or write anything but this file.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from fedtre.catalog import Catalog
from node.errors import DatabaseError

META_TABLE = "_fedtre_meta"


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
            },
        )
        con.execute("SET lock_configuration = true")
        meta = dict(con.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    except duckdb.Error as exc:
        raise DatabaseError(f"cannot open node database {path}: {exc}") from exc
    if meta.get("catalog_version") != catalog.version:
        con.close()
        raise DatabaseError(
            f"node database {path} was built for catalog {meta.get('catalog_version')!r}, "
            f"this node runs catalog {catalog.version!r}: reload it with 'fedtre node load'"
        )
    return con


def read_meta(con) -> dict[str, str]:
    return dict(con.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())

"""Run differentially private SQL queries through SmartNoise SQL and report timings as JSON.

This script runs inside the SmartNoise virtualenv (see ``smartnoise_env.py``), never in the
project's own environment: SmartNoise SQL 1.0.10 needs ``opendp<0.15`` and ``pandas<3`` and
switches on an OpenDP feature flag globally.

Protocol: one JSON request on stdin::

    {"data_path": ".../patients.parquet", "table": "patients",
     "metadata": {"row_privacy": false, "max_ids": 1, "key": "person_id",
                  "columns": {"age": {"type": "int", "lower": 0, "upper": 110}, ...}},
     "queries": [{"name": "...", "sql": "SELECT ... FROM fedtre.patients ...", "epsilon": 1.0}],
     "repeats": 20, "reader": "duckdb"}

one JSON reply on stdout (``{"error": "..."}`` and exit code 1 on failure)::

    {"smartnoise_version": ..., "opendp_version": ..., "results": [{"name": ..., "seconds": [...],
     "columns": [...], "rows": [[[...], ...], ...], "epsilon_spent_per_run": ...,
     "delta_spent_per_run": ...}, ...]}

Tables are addressed in SQL as ``fedtre.<table>`` (collection ``fedtre``, schema ``fedtre``).
Reader ``duckdb`` loads the Parquet file into an in-memory DuckDB table and runs SmartNoise's
rewritten SQL there through a small :class:`DuckDBReader` shim; reader ``pandas`` loads it into
a pandas DataFrame and uses SmartNoise's own pandas reader (which copies it into SQLite).
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import json
import re
import sys
import time
import traceback
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

#: Collection and schema name used in SmartNoise metadata and in queries (``fedtre.<table>``).
SCHEMA = "fedtre"

#: Default delta passed to ``snsql.Privacy`` when a query does not give one.
DEFAULT_DELTA = 1e-6

#: Table-level SmartNoise options passed through from the simple metadata form.
_TABLE_OPTIONS = (
    "rows",
    "rows_exact",
    "row_privacy",
    "max_ids",
    "sample_max_ids",
    "clamp_counts",
    "clamp_columns",
    "use_dpsu",
    "censor_dims",
)

#: Defaults for table-level options: keep small groups and raw (possibly negative) counts.
_TABLE_DEFAULTS: dict[str, Any] = {
    "row_privacy": False,
    "max_ids": 1,
    "censor_dims": False,
    "clamp_counts": False,
}


def to_smartnoise_metadata(table: str, simple: dict[str, Any]) -> dict[str, Any]:
    """Convert the simple table description into SmartNoise's metadata dictionary.

    ``simple`` has optional table-level options (``row_privacy``, ``max_ids``, ``censor_dims``,
    ``clamp_counts``, ``sample_max_ids``, ...), an optional ``key`` naming the private-id column,
    and ``columns`` mapping column names to ``{"type": ..., "lower": ..., "upper": ...,
    "private_id": ...}``. The result is ``{"fedtre": {"fedtre": {table: {...}}}}``, with
    ``censor_dims`` and ``clamp_counts`` off unless ``simple`` says otherwise.
    """
    columns = simple.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise ValueError("metadata must have a non-empty 'columns' mapping")
    spec: dict[str, Any] = dict(_TABLE_DEFAULTS)
    for option in _TABLE_OPTIONS:
        if option in simple:
            spec[option] = simple[option]
    key = simple.get("key")
    if key is not None and key not in columns:
        raise ValueError(f"metadata key {key!r} is not among the columns")
    for name, column in columns.items():
        if name in _TABLE_OPTIONS:
            raise ValueError(f"column name {name!r} clashes with a SmartNoise table option")
        if "type" not in column:
            raise ValueError(f"column {name!r} has no 'type'")
        col = dict(column)
        if name == key:
            col["private_id"] = True
        spec[name] = col
    return {SCHEMA: {SCHEMA: {table: spec}}}


#: Column name the DuckDB shim uses for the per-row random sort key.
_RAND_COL = "__fedtre_rand"

#: SmartNoise's reservoir sampling: ``ROW_NUMBER() OVER (PARTITION BY key ORDER BY RANDOM())``.
_RANDOM_WINDOW = re.compile(
    r"ORDER\s+BY\s+RANDOM\s*\(\s*\)\s*\)\s*AS\s+\w+\s+FROM\s*\(", re.IGNORECASE
)
_RANDOM_CALL = re.compile(r"RANDOM\s*\(\s*\)", re.IGNORECASE)


def _matching_paren(sql: str, open_pos: int) -> int:
    """Return the index of the parenthesis closing the one at ``open_pos``.

    Skips over single-quoted string literals and double-quoted identifiers.
    """
    depth = 0
    i = open_pos
    while i < len(sql):
        ch = sql[i]
        if ch in "'\"":
            end = sql.find(ch, i + 1)
            while end != -1 and sql[end + 1 : end + 2] == ch:  # doubled quote is an escape
                end = sql.find(ch, end + 2)
            if end == -1:
                break
            i = end
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced parentheses in SQL: {sql}")


def rewrite_random_window_order(sql: str) -> str:
    """Make SmartNoise's per-key reservoir sampling acceptable to DuckDB.

    SmartNoise limits each private id to ``max_ids`` rows with ``ROW_NUMBER() OVER (PARTITION
    BY key ORDER BY RANDOM()) AS row_num FROM (subquery) AS alias``; DuckDB (2.x) refuses a
    volatile window ``ORDER BY``. This draws the random number once per row in a wrapping
    projection of the subquery and orders the window by that column, which samples the same
    way::

        ... ORDER BY __fedtre_rand ) AS row_num
        FROM ( SELECT *, RANDOM() AS __fedtre_rand FROM ( subquery ) AS __fedtre_src ) AS alias
    """
    while True:
        match = _RANDOM_WINDOW.search(sql)
        if match is None:
            break
        open_pos = match.end() - 1
        close_pos = _matching_paren(sql, open_pos)
        head = _RANDOM_CALL.sub(_RAND_COL, sql[match.start() : open_pos], count=1)
        sql = (
            sql[: match.start()]
            + head
            + f"( SELECT *, RANDOM() AS {_RAND_COL} FROM "
            + sql[open_pos : close_pos + 1]
            + " AS __fedtre_src )"
            + sql[close_pos + 1 :]
        )
    if re.search(r"ORDER\s+BY\s+RANDOM\s*\(", sql, re.IGNORECASE):
        raise ValueError(f"DuckDB shim cannot rewrite the random window order in: {sql}")
    return sql


def _make_duckdb_reader_class() -> type:
    """Build the DuckDB reader shim class (imports SmartNoise lazily)."""
    from snsql.sql.reader.base import SqlReader

    class DuckDBReader(SqlReader):
        """SmartNoise ``SqlReader`` over a DuckDB connection.

        SmartNoise has no DuckDB engine; its generic name matching and serializer produce SQL
        that DuckDB accepts except for the random window order of its reservoir sampling (see
        :func:`rewrite_random_window_order`). The shim fixes that, runs the query and returns
        the rows in SmartNoise's format (a tuple of column names followed by row tuples).
        """

        ENGINE = "DuckDB"

        def __init__(self, conn: Any, **kwargs: Any) -> None:
            """Wrap the DuckDB connection ``conn``; extra keyword arguments are ignored."""
            super().__init__(self.ENGINE)
            self.conn = conn

        def execute(self, query: str, *ignore: Any, accuracy: bool = False) -> list[Any]:
            """Run the SQL string ``query`` and return header plus rows."""
            if not isinstance(query, str):
                raise ValueError("Please pass strings to execute.")
            cursor = self.conn.execute(rewrite_random_window_order(query))
            if cursor.description is None:
                return []
            header = tuple(desc[0] for desc in cursor.description)
            return [header, *cursor.fetchall()]

    return DuckDBReader


def open_base_reader(reader: str, data_path: Path, table: str, sn_metadata: dict[str, Any]) -> Any:
    """Load the Parquet file with ``reader`` and return the SmartNoise (non-private) reader."""
    if reader == "duckdb":
        import duckdb

        conn = duckdb.connect(":memory:")
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
        conn.execute(
            f'CREATE TABLE "{SCHEMA}"."{table}" AS SELECT * FROM read_parquet(?)',
            [str(data_path)],
        )
        return _make_duckdb_reader_class()(conn)
    if reader == "pandas":
        import pandas as pd
        from snsql.sql.reader.pandas import PandasReader

        return PandasReader(pd.read_parquet(data_path), sn_metadata)
    raise ValueError(f"unknown reader {reader!r}; use 'duckdb' or 'pandas'")


def _jsonable(value: Any) -> Any:
    """Convert a value returned by SmartNoise (numpy scalar, Decimal, date, ...) to JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _version(package: str) -> str | None:
    """Return the installed version of ``package``, or ``None`` if it is not installed."""
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def run_query(
    base_reader: Any, sn_metadata: dict[str, Any], query: dict[str, Any], repeats: int
) -> dict[str, Any]:
    """Run one query ``repeats`` times and return its timings, rows and privacy cost.

    A SmartNoise ``PrivateReader`` with ``Privacy(epsilon, delta)`` from the query wraps
    ``base_reader``. Each repeat resets the odometer, so ``epsilon_spent_per_run`` is what
    SmartNoise's odometer recorded for one execution (SmartNoise spends ``epsilon`` per noisy
    statistic, so e.g. ``COUNT`` plus ``AVG`` costs several times ``epsilon``).
    ``privacy_cost_estimate`` is SmartNoise's own ``get_privacy_cost`` for the query, computed
    without running it, and ``mechanism_costs`` its (epsilon, delta) per rewritten column.
    ``seconds`` holds the wall time of each ``PrivateReader.execute`` call (parse, rewrite,
    exact query, noise, post-processing); ``engine_seconds`` the part of it spent in the
    underlying reader running the rewritten SQL (DuckDB, or SQLite for the pandas reader).
    """
    from snsql import Privacy
    from snsql.sql.private_reader import PrivateReader

    sql = query["sql"]
    epsilon = float(query["epsilon"])
    delta = float(query.get("delta", DEFAULT_DELTA))
    private_reader = PrivateReader(
        base_reader, sn_metadata, privacy=Privacy(epsilon=epsilon, delta=delta)
    )
    estimate = private_reader.get_privacy_cost(sql)
    mechanism_costs = private_reader._get_mechanism_costs(sql)  # per column, None if exact
    engine_seconds: list[float] = []
    inner_execute = base_reader.execute

    def timed_execute(query_string: str, *args: Any, **kwargs: Any) -> Any:
        """Run the reader's own ``execute``, recording its wall time in ``engine_seconds``."""
        t0 = time.perf_counter()
        try:
            return inner_execute(query_string, *args, **kwargs)
        finally:
            engine_seconds.append(time.perf_counter() - t0)

    seconds: list[float] = []
    all_rows: list[list[list[Any]]] = []
    columns: list[str] = []
    spent: tuple[float, float] = (0.0, 0.0)
    base_reader.execute = timed_execute  # instance attribute shadows the method
    try:
        for _ in range(repeats):
            private_reader.odometer.reset()
            start = time.perf_counter()
            result = private_reader.execute(sql)
            seconds.append(time.perf_counter() - start)
            spent = private_reader.odometer.spent
            columns = [str(c) for c in result[0]]
            all_rows.append([_jsonable(list(row)) for row in result[1:]])
    finally:
        del base_reader.execute
    return {
        "name": query.get("name", sql),
        "sql": sql,
        "epsilon": epsilon,
        "delta": delta,
        "seconds": seconds,
        "engine_seconds": engine_seconds,
        "columns": columns,
        "rows": all_rows,
        "epsilon_spent_per_run": _jsonable(spent[0]) if repeats else None,
        "delta_spent_per_run": _jsonable(spent[1]) if repeats else None,
        "privacy_cost_estimate": _jsonable(list(estimate)),
        "mechanism_costs": _jsonable(mechanism_costs),
    }


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Handle one request (see the module docstring) and return the reply dictionary."""
    data_path = Path(request["data_path"])
    if not data_path.exists():
        raise FileNotFoundError(f"data_path does not exist: {data_path}")
    table = str(request["table"])
    reader = str(request.get("reader", "duckdb"))
    repeats = int(request.get("repeats", 1))
    queries = request["queries"]
    if repeats < 0:
        raise ValueError("repeats must be >= 0")
    sn_metadata = to_smartnoise_metadata(table, request["metadata"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        base_reader = open_base_reader(reader, data_path, table, sn_metadata)
        load_seconds = time.perf_counter() - start
        results = [run_query(base_reader, sn_metadata, q, repeats) for q in queries]
    warning_texts = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return {
        "smartnoise_version": _version("smartnoise-sql"),
        "opendp_version": _version("opendp"),
        "duckdb_version": _version("duckdb"),
        "pandas_version": _version("pandas"),
        "reader": reader,
        "table": table,
        "metadata": sn_metadata,
        "load_seconds": load_seconds,
        "warnings": warning_texts,
        "results": results,
    }


def main() -> int:
    """Read the JSON request from stdin, write the JSON reply to stdout, return the exit code."""
    out = sys.stdout
    try:
        request = json.load(sys.stdin)
        # Anything SmartNoise or its dependencies print goes to stderr, keeping stdout JSON.
        with contextlib.redirect_stdout(sys.stderr):
            reply = run(request)
    except Exception as exc:  # every failure becomes a JSON error reply
        traceback.print_exc(file=sys.stderr)
        json.dump({"error": f"{type(exc).__name__}: {exc}"}, out)
        out.write("\n")
        out.flush()
        return 1
    json.dump(reply, out)
    out.write("\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

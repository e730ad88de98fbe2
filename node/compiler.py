"""Compile a validated ``QueryPlan`` into parameterised DuckDB SQL, and run it exactly.

Identifiers come only from the catalog (validated at start-up to ``[a-z][a-z0-9_]*``), numbers
in the SQL text only from the catalog's integer bounds and caps; every value the researcher
wrote travels as a bound parameter. The exact aggregates never leave this module except
into ``node.release``, which adds OpenDP noise before anything is returned.

Clamping: SUM reads the loader's copy of the column clamped to the catalog bounds
(``_clamped_<col>``), which the node re-checks when it opens the database; filters see the
recorded value.

Tiers act on rows: a project approved up to tier T reads, in every view and every cohort, only
the rows at the view's row level for T (``View.level_for``); rows holding a value above T do not
exist for it, and such values are not in the group domains.

Contribution bounding: the loader stores, per row level, ``_rank_<level>``: each person's rows
visible at that level numbered 1, 2, ... in a fixed order that depends only on the person's own
rows (NULL on rows above the level), and the flag ``_kept_<level>`` (``_rank_<level> <=
max_rows_per_person``). A query reads only rows whose flag is set, so no person contributes more
rows than the catalog allows; the loader stores rows in blocks by these flags, so the filter
costs (almost) nothing at query time. Cohorts read the same capped rows: for a project, a person's
rows in a view are the first ``cap`` of them in that order, wherever the view is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from fedtre.catalog import Catalog, Tier, Value, View
from fedtre.plan import (
    And,
    Cohort,
    Compare,
    InList,
    Not,
    Or,
    Predicate,
    QueryPlan,
)
from fedtre.statistics import Statistic, cells_for, statistics_for
from node.database import clamped_column, kept_column

LONG_LIST = 16  # IN lists longer than this are matched as one bound list (see _predicate_sql)
# The opted-out persons' ids, registered on the query's cursor as an Arrow table under a name no
# catalog identifier can take (those start with a letter): no copy of a long list per query.
EXCLUDED_TABLE = "_fedtre_excluded"
EXCLUDED = f"t.person_id NOT IN (SELECT id FROM {EXCLUDED_TABLE})"


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    params: tuple[Value | list[Value], ...]
    view: View
    group_by: tuple[str, ...]
    cells: tuple[tuple[Value, ...], ...]
    statistics: tuple[Statistic, ...]
    # The same query with opted-out persons removed (EXCLUDED_TABLE registered by run_exact).
    sql_excluding: str = ""


def compile_plan(plan: QueryPlan, catalog: Catalog, tier: Tier) -> CompiledQuery:
    """The SQL for ``plan`` as a project approved up to ``tier`` sees the data.

    The caller has checked that the plan names nothing above ``tier`` (``query_tier``).
    """
    view = catalog.views[plan.view]
    stats = [s for group in statistics_for(plan) for s in group]
    params: list[Value | list[Value]] = []
    select = [f't."{g}"' for g in plan.group_by]
    select += [_statistic_sql(s, view) for s in stats]
    where = [f't."{_kept(view, tier)}"']
    if plan.where is not None:
        where.append(_predicate_sql(plan.where, "t", catalog, tier, params, depth=0))
    group = " GROUP BY " + ", ".join(f't."{g}"' for g in plan.group_by) if plan.group_by else ""
    head = f'SELECT {", ".join(select)} FROM "{view.name}" AS t WHERE '
    sql = head + " AND ".join(where) + group
    # Opted-out persons (node.optouts) do not exist for the query: removed from the view read,
    # before any aggregate; a cohort only ever selects among the view's remaining persons.
    excluding = head + " AND ".join([where[0], EXCLUDED, *where[1:]]) + group
    cells = cells_for(plan, catalog, tier)
    return CompiledQuery(
        sql, tuple(params), view, plan.group_by, cells, tuple(stats), sql_excluding=excluding
    )


def _kept(view: View, tier: Tier) -> str:
    level = view.level_for(tier)
    if level is None:  # refused before compiling; never read a view above the approval
        raise ValueError(f"view {view.name} is above tier {tier.value}")
    return kept_column(level)


def _statistic_sql(stat: Statistic, view: View) -> str:
    if stat.kind == "count":
        return "COUNT(*)"
    if stat.kind == "count_persons":
        # A view with one row per person (enforced by the loader) counts persons as rows.
        return "COUNT(*)" if view.max_rows_per_person == 1 else "COUNT(DISTINCT t.person_id)"
    assert stat.column is not None
    # The loader stores a copy clamped to the catalog bounds; the node checks it at start-up.
    return f'SUM(t."{clamped_column(stat.column)}")'


def _predicate_sql(
    pred: Predicate,
    alias: str,
    catalog: Catalog,
    tier: Tier,
    params: list[Value | list[Value]],
    depth: int,
) -> str:
    match pred:
        case Compare(column, op, value):
            params.append(value)
            return f'{alias}."{column}" {op.value} ?'
        case InList(column, values, negated) if len(values) > LONG_LIST:
            # A long list as one bound list, matched by hash join: the same meaning (neither
            # the values nor the column are ever NULL), at a cost that does not grow with the
            # list's length times the rows (a 193-value NOT IN: 124 ms as constants, 9 ms so).
            params.append(list(values))
            return f'{alias}."{column}" {"NOT IN" if negated else "IN"} (SELECT unnest(?))'
        case InList(column, values, negated):
            params.extend(values)
            marks = ", ".join("?" for _ in values)
            return f'{alias}."{column}" {"NOT IN" if negated else "IN"} ({marks})'
        case And(items) | Or(items):
            joiner = " AND " if isinstance(pred, And) else " OR "
            parts = [_predicate_sql(p, alias, catalog, tier, params, depth) for p in items]
            return "(" + joiner.join(parts) + ")"
        case Not(item):
            return f"(NOT {_predicate_sql(item, alias, catalog, tier, params, depth)})"
        case Cohort(view_name, where, negated):
            sub = catalog.views[view_name]
            inner = f"c{depth + 1}"
            sql = (
                f'SELECT {inner}.person_id FROM "{sub.name}" AS {inner} '
                f'WHERE {inner}."{_kept(sub, tier)}"'
            )
            if where is not None:
                sql += " AND " + _predicate_sql(where, inner, catalog, tier, params, depth + 1)
            return f"{alias}.person_id {'NOT IN' if negated else 'IN'} ({sql})"
    raise TypeError(f"not a predicate: {type(pred).__name__}")


def excluded_table(ids: Sequence[int]) -> pa.Table:
    return pa.table({"id": pa.array(ids, type=pa.int64())})


def run_exact(
    con, compiled: CompiledQuery, excluded: Sequence[int] | pa.Table = ()
) -> list[list[int]]:
    """Run the compiled SQL; one list of exact values per statistic, one value per cell.

    Every cell of the group domains is present (zero where no rows), in the catalog's order;
    rows whose group values fall outside the public domain are not counted in any cell.
    ``excluded``: persons who do not exist for this query (opt-outs).
    """
    index = {cell: i for i, cell in enumerate(compiled.cells)}
    columns = [[0] * len(compiled.cells) for _ in compiled.statistics]
    k = len(compiled.group_by)
    if len(excluded):
        table = excluded if isinstance(excluded, pa.Table) else excluded_table(excluded)
        cursor = con.cursor()  # the registration is this cursor's own, gone with it
        try:
            cursor.register(EXCLUDED_TABLE, table)
            rows = cursor.execute(compiled.sql_excluding, list(compiled.params)).fetchall()
        finally:
            cursor.close()
    else:
        rows = con.execute(compiled.sql, list(compiled.params)).fetchall()
    for row in rows:
        i = index.get(tuple(row[:k]))
        if i is None:
            continue
        for j, value in enumerate(row[k:]):
            columns[j][i] = int(value or 0)
    return columns

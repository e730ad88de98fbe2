"""A plain-Python reference for what a fedtre query means, independent of ``node.compiler``.

Rows are read with ordinary DuckDB (``SELECT * FROM <view>``) into Python dicts; predicates are
evaluated row by row; aggregates are computed cell by cell over the full cross product of the
group columns' public domains. Nothing here calls the compiler or builds SQL from a plan.

Semantics (the specification the compiler must meet):

* a project approved up to tier T sees only the rows whose values all have a tier of at most T
  (value tiers from the catalog); every other row does not exist for it, in the main view and
  in cohorts alike, and values above T are not in the group domains;
* a query reads only visible rows ranked ``<= max_rows_per_person`` in the view's rank column
  for T's row level;
* ``person_id [NOT] IN (SELECT person_id FROM v WHERE p)`` keeps rows whose person has (has no)
  row of ``v`` matching ``p`` among the same capped, visible rows a query of ``v`` reads;
* COUNT(*) counts rows, COUNT(DISTINCT person_id) counts persons, SUM(col) sums values clamped
  to the column's [min, max], AVG(col) is released as (clamped sum, row count);
* every cell of the group domains is present, in catalog order, zero when empty; rows whose
  group values are outside the domains count in no cell.
"""

from __future__ import annotations

import itertools
import operator
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb

from fedtre.catalog import Catalog, Column, ColumnType, Tier, View
from fedtre.plan import (
    AggregateKind,
    And,
    Cohort,
    Compare,
    CompareOp,
    InList,
    Not,
    Or,
    Predicate,
    QueryPlan,
)

Row = dict[str, Any]

_OPS: dict[CompareOp, Callable[[Any, Any], bool]] = {
    CompareOp.EQ: operator.eq,
    CompareOp.NE: operator.ne,
    CompareOp.LT: operator.lt,
    CompareOp.LE: operator.le,
    CompareOp.GT: operator.gt,
    CompareOp.GE: operator.ge,
}


def read_rows(path: Path, catalog: Catalog) -> dict[str, list[Row]]:
    """Every row of every catalog view, as dicts, read with a plain read-only connection.

    DuckDB refuses a second in-process connection to a file that is already open with another
    configuration (the node's locked-down one), so the reference reads a private copy.
    """
    with tempfile.TemporaryDirectory(prefix="fedtre-ref-") as tmp:
        copy = Path(tmp) / "node.duckdb"
        shutil.copyfile(path, copy)
        con = duckdb.connect(str(copy), read_only=True)
        try:
            out: dict[str, list[Row]] = {}
            for name in catalog.views:
                cur = con.execute(f'SELECT * FROM "{name}"')
                cols = [d[0] for d in cur.description]
                out[name] = [dict(zip(cols, values, strict=True)) for values in cur.fetchall()]
            return out
        finally:
            con.close()


def domain_of(column: Column, tier: Tier = Tier.HIGHLY_SENSITIVE) -> tuple[Any, ...]:
    """The public values a GROUP BY on ``column`` returns, in catalog order, at ``tier``."""
    if column.type is ColumnType.BOOLEAN:
        values: tuple[Any, ...] = (False, True)
    elif column.type is ColumnType.INTEGER:
        assert column.lower is not None and column.upper is not None
        values = tuple(range(column.lower, column.upper + 1))
    else:
        values = tuple(column.domain)
    return tuple(v for v in values if column.value_tiers.get(v, Tier.GENERAL) <= tier)


def visible(row: Row, view: View, tier: Tier) -> bool:
    """Whether a row exists for a project approved up to ``tier``: none of its values has a
    value tier above it."""
    return all(
        col.value_tiers.get(row[col.name], Tier.GENERAL) <= tier for col in view.columns.values()
    )


def rank_of(row: Row, view: View, tier: Tier) -> int:
    levels = [level for level in view.row_levels if level <= tier]
    return row[f"_rank_{max(levels).value}"]


class Reference:
    def __init__(self, rows: dict[str, list[Row]], catalog: Catalog) -> None:
        self.rows = rows
        self.catalog = catalog
        # answers by (plan, capped, tier): several tests ask the same question of the same rows
        self._answers: dict[tuple[QueryPlan, bool, Tier], list[list[int]]] = {}

    @classmethod
    def from_db(cls, path: Path, catalog: Catalog) -> Reference:
        return cls(read_rows(path, catalog), catalog)

    # -- predicates ---------------------------------------------------------------------------

    def matches(
        self,
        pred: Predicate | None,
        row: Row,
        cohorts: dict[Cohort, set[int]],
        tier: Tier = Tier.HIGHLY_SENSITIVE,
    ) -> bool:
        if pred is None:
            return True
        if isinstance(pred, Compare):
            return _OPS[pred.op](row[pred.column], pred.value)
        if isinstance(pred, InList):
            value = row[pred.column]
            # ``==`` on the exact type: True must not match 1 and vice versa.
            found = any(type(value) is type(v) and value == v for v in pred.values)
            return found != pred.negated
        if isinstance(pred, And):
            return all(self.matches(p, row, cohorts, tier) for p in pred.items)
        if isinstance(pred, Or):
            return any(self.matches(p, row, cohorts, tier) for p in pred.items)
        if isinstance(pred, Not):
            return not self.matches(pred.item, row, cohorts, tier)
        if isinstance(pred, Cohort):
            members = self.cohort(pred, cohorts, tier)
            return (row["person_id"] in members) != pred.negated
        raise TypeError(f"not a predicate: {pred!r}")

    def cohort(
        self, pred: Cohort, cohorts: dict[Cohort, set[int]], tier: Tier = Tier.HIGHLY_SENSITIVE
    ) -> set[int]:
        """Persons with at least one visible row of the sub-view within the cap matching the
        sub-predicate."""
        view = self.catalog.views[pred.view]
        if pred not in cohorts:
            cohorts[pred] = {
                r["person_id"]
                for r in self.rows[pred.view]
                if visible(r, view, tier)
                and rank_of(r, view, tier) <= view.max_rows_per_person
                and self.matches(pred.where, r, cohorts, tier)
            }
        return cohorts[pred]

    def selected_rows(
        self, plan: QueryPlan, capped: bool = True, tier: Tier = Tier.HIGHLY_SENSITIVE
    ) -> list[Row]:
        view = self.catalog.views[plan.view]
        cap = view.max_rows_per_person
        cohorts: dict[Cohort, set[int]] = {}
        return [
            r
            for r in self.rows[plan.view]
            if visible(r, view, tier)
            and (not capped or rank_of(r, view, tier) <= cap)
            and self.matches(plan.where, r, cohorts, tier)
        ]

    # -- aggregates ---------------------------------------------------------------------------

    def cells(self, plan: QueryPlan, tier: Tier = Tier.HIGHLY_SENSITIVE) -> list[tuple[Any, ...]]:
        view = self.catalog.views[plan.view]
        domains = [domain_of(view.columns[g], tier) for g in plan.group_by]
        return list(itertools.product(*domains))

    def evaluate(
        self, plan: QueryPlan, capped: bool = True, tier: Tier = Tier.HIGHLY_SENSITIVE
    ) -> list[list[int]]:
        key = (plan, capped, tier)
        if key not in self._answers:
            self._answers[key] = self._evaluate(plan, capped, tier)
        return [list(stat) for stat in self._answers[key]]

    def _evaluate(self, plan: QueryPlan, capped: bool, tier: Tier) -> list[list[int]]:
        view = self.catalog.views[plan.view]
        cells = self.cells(plan, tier)
        buckets: dict[tuple[Any, ...], list[Row]] = {cell: [] for cell in cells}
        # Group values are matched by type as well: a boolean cell never takes an int.
        by_typed_key = {_typed(cell): cell for cell in cells}
        for row in self.selected_rows(plan, capped, tier):
            cell = by_typed_key.get(_typed(tuple(row[g] for g in plan.group_by)))
            if cell is not None:  # outside the public domains: counted in no cell
                buckets[cell].append(row)
        out: list[list[int]] = []
        for agg in plan.aggregates:
            if agg.kind is AggregateKind.COUNT:
                out.append([len(buckets[c]) for c in cells])
            elif agg.kind is AggregateKind.COUNT_PERSONS:
                out.append([len({r["person_id"] for r in buckets[c]}) for c in cells])
            else:
                assert agg.column is not None
                col = view.columns[agg.column]
                sums = [_clamped_sum((r[agg.column] for r in buckets[c]), col) for c in cells]
                out.append(sums)
                if agg.kind is AggregateKind.AVG:
                    out.append([len(buckets[c]) for c in cells])
        return out


def _typed(values: tuple[Any, ...]) -> tuple[tuple[type, Any], ...]:
    return tuple((type(v), v) for v in values)


def _clamped_sum(values: Iterable[int], col: Column) -> int:
    assert col.lower is not None and col.upper is not None
    return sum(min(max(int(v), col.lower), col.upper) for v in values)

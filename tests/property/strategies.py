"""Hypothesis strategies: SQL-ish noise, and valid fedtre queries built from the catalog.

``valid_queries(catalog)`` draws a ``Query``: the SQL text, and every literal value written in
it in the order it appears (IN lists never repeat a value), so tests can check that the values
travel only as bound parameters, in that order.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from fedtre.catalog import Catalog, Column, ColumnType, View
from fedtre.parse import MAX_COHORTS, MAX_RELEASED_VALUES

MAX_TEST_CELLS = 2_000  # the parser allows 10,000; fewer keeps the reference quick
MAX_COHORT_NESTING = 2


@dataclass(frozen=True)
class Query:
    sql: str
    values: tuple[Any, ...]
    view: str


# -- valid queries ----------------------------------------------------------------------------


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    return "'" + value + "'"


def _values(col: Column) -> st.SearchStrategy[Any]:
    if col.type is ColumnType.BOOLEAN:
        return st.booleans()
    if col.type is ColumnType.CATEGORY:
        return st.sampled_from(col.domain)
    assert col.lower is not None and col.upper is not None
    near_bounds = st.integers(col.lower - 3, col.upper + 3)
    # Mostly values near the bounds; now and then the widest literal the parser accepts.
    return st.one_of(near_bounds, near_bounds, near_bounds, st.integers(-(10**12) + 1, 10**12 - 1))


def _column_ref(draw: st.DrawFn, view: View, name: str) -> str:
    return draw(st.sampled_from([name, name.upper(), f"{view.name}.{name}"]))


@st.composite
def _comparison(draw: st.DrawFn, view: View) -> tuple[str, list[Any]]:
    col = view.columns[draw(st.sampled_from(sorted(view.columns)))]
    ref = _column_ref(draw, view, col.name)
    values = _values(col)
    kinds = ["compare", "in"] + (["between"] if col.type is ColumnType.INTEGER else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "compare":
        if col.type is ColumnType.INTEGER:
            op = draw(st.sampled_from(["=", "<>", "!=", "<", "<=", ">", ">="]))
        else:
            op = draw(st.sampled_from(["=", "<>", "!="]))
        value = draw(values)
        if draw(st.booleans()):
            return f"{ref} {op} {_literal(value)}", [value]
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        return f"{_literal(value)} {flipped} {ref}", [value]
    if kind == "in":
        items = draw(st.lists(values, min_size=1, max_size=4, unique=True))
        negated = draw(st.sampled_from(["", "NOT ", "prefix"]))
        listed = ", ".join(_literal(v) for v in items)
        if negated == "prefix":
            return f"NOT {ref} IN ({listed})", items
        return f"{ref} {negated}IN ({listed})", items
    low, high = draw(values), draw(values)
    negated = draw(st.sampled_from(["", "NOT "]))
    return f"{ref} {negated}BETWEEN {_literal(low)} AND {_literal(high)}", [low, high]


@st.composite
def _cohort(draw: st.DrawFn, catalog: Catalog, view: View, nesting: int) -> tuple[str, list[Any]]:
    sub = catalog.views[draw(st.sampled_from(sorted(catalog.views)))]
    negated = draw(st.sampled_from(["", "NOT "]))
    sql = f"SELECT person_id FROM {sub.name}"
    values: list[Any] = []
    if draw(st.booleans()):
        where, values = draw(predicates(catalog, sub, depth=1, nesting=nesting + 1))
        sql += f" WHERE {where}"
    return f"person_id {negated}IN ({sql})", values


@st.composite
def predicates(
    draw: st.DrawFn, catalog: Catalog, view: View, depth: int = 2, nesting: int = 0
) -> tuple[str, list[Any]]:
    options = ["leaf", "leaf"]
    if depth > 0:
        options += ["and", "or", "not"]
    if nesting < MAX_COHORT_NESTING:
        options.append("cohort")
    kind = draw(st.sampled_from(options))
    if kind == "leaf":
        return draw(_comparison(view))
    if kind == "cohort":
        return draw(_cohort(catalog, view, nesting))
    if kind == "not":
        inner, values = draw(predicates(catalog, view, depth - 1, nesting))
        return f"NOT ({inner})", values
    parts = draw(st.lists(predicates(catalog, view, depth - 1, nesting), min_size=2, max_size=3))
    joiner = " AND " if kind == "and" else " OR "
    sql = joiner.join(f"({p})" if draw(st.booleans()) else p for p, _ in parts)
    # The whole is parenthesised, so its meaning never depends on the caller's precedence.
    values = [v for _, vs in parts for v in vs]
    return f"({sql})", values


def valid_queries(catalog: Catalog) -> st.SearchStrategy[Query]:
    """Queries the parser accepts: within its limits on cohorts and released values."""
    return _queries(catalog).filter(
        lambda q: (
            q.sql.count("SELECT person_id") <= MAX_COHORTS
            and _released_values(q, catalog) <= MAX_RELEASED_VALUES
        )
    )


def _released_values(query: Query, catalog: Catalog) -> int:
    # the grouping's cells (from the query's own GROUP BY) times its statistics
    view = catalog.views[query.view]
    groups = query.sql.split(" GROUP BY ")[1].split(", ") if " GROUP BY " in query.sql else []
    cells = math.prod(len(view.columns[g].group_domain or ()) for g in groups)
    statistics = query.sql.count("COUNT(") + query.sql.count("SUM(") + 2 * query.sql.count("AVG(")
    return cells * statistics


@st.composite
def _queries(draw: st.DrawFn, catalog: Catalog) -> Query:
    view = catalog.views[draw(st.sampled_from(sorted(catalog.views)))]
    groupable = sorted(n for n, c in view.columns.items() if c.group_domain is not None)
    group = draw(st.lists(st.sampled_from(groupable), unique=True, max_size=3))
    while group and math.prod(len(view.columns[g].group_domain or ()) for g in group) > (
        MAX_TEST_CELLS
    ):
        group.pop()
    numeric = sorted(n for n, c in view.columns.items() if c.type is ColumnType.INTEGER)
    n_aggs = draw(st.integers(1, 3))
    aggregates = []
    for i in range(n_aggs):
        kind = draw(st.sampled_from(["COUNT(*)", "COUNT(DISTINCT person_id)", "SUM", "AVG"]))
        if kind in ("SUM", "AVG"):
            kind = f"{kind}({draw(st.sampled_from(numeric))})"
        aggregates.append(f"{kind} AS a{i}")
    items = draw(st.permutations([*group, *aggregates]))
    sql = f"SELECT {', '.join(items)} FROM {view.name}"
    values: list[Any] = []
    if draw(st.booleans()):
        where, values = draw(predicates(catalog, view))
        sql += f" WHERE {where}"
    if group:
        sql += " GROUP BY " + ", ".join(draw(st.permutations(group)))
    return Query(sql, tuple(values), view.name)


# -- noise ------------------------------------------------------------------------------------

KEYWORDS = [
    "SELECT", "FROM", "WHERE", "GROUP", "BY", "AND", "OR", "NOT", "IN", "BETWEEN", "SYMMETRIC",
    "COUNT", "DISTINCT", "SUM", "AVG", "MAX", "AS", "IS", "NULL", "LIKE", "CASE", "WHEN",
    "THEN", "END", "UNION", "ALL", "JOIN", "ON", "USING", "LIMIT", "ORDER", "HAVING", "WITH",
    "EXISTS", "ANY", "TRUE", "FALSE", "CAST", "TABLESAMPLE", "PIVOT", "QUALIFY", "VALUES",
    "ROLLUP", "CUBE", "OVER", "FILTER", "COPY", "ATTACH", "PRAGMA", "INSTALL", "read_csv",
]  # fmt: skip
PUNCTUATION = [
    "(", ")", "*", ",", ";", ".", "=", "<>", "!=", "<", "<=", ">", ">=", "-", "+", "||", "::",
    "[", "]", "{", "}", "?", "$1", ":a", "%", "'", '"', "`", "--", "/*", "*/", "\n", "\t",
]  # fmt: skip
CATALOG_NAMES = [
    "patients", "conditions", "visits", "person_id", "_rank", "sex", "age", "age_band",
    "ethnicity", "condition_group", "setting", "year", "visit_type", "mental_health",
    "length_of_stay", "_fedtre_meta",
]  # fmt: skip

identifiers = st.one_of(
    st.sampled_from(CATALOG_NAMES),
    st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=600),
    st.text(min_size=1, max_size=40).map(lambda s: '"' + s.replace('"', '""') + '"'),
)
literals = st.one_of(
    st.integers(-(10**15), 10**15).map(str),
    st.sampled_from(["1.5", "1e3", "0x10", "01", "1_000", "²", "٣", "NULL", "TRUE"]),
    st.sampled_from(["male", "depression", "85+", "0-17", "x"]).map(lambda s: f"'{s}'"),
    st.text(max_size=60).map(lambda s: "'" + s.replace("'", "''") + "'"),
)
fragments = st.lists(
    st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(PUNCTUATION), identifiers, literals),
    max_size=30,
).map(" ".join)


@st.composite
def sqlish(draw: st.DrawFn) -> str:
    """Fragments, often behind a plausible prefix so that the parser gets past FROM."""
    prefix = draw(
        st.sampled_from(
            [
                "",
                "SELECT COUNT(*) FROM patients WHERE ",
                "SELECT sex, COUNT(*) FROM patients GROUP BY ",
                "SELECT ",
                "SELECT COUNT(*) FROM conditions WHERE person_id IN (SELECT person_id FROM ",
            ]
        )
    )
    return prefix + draw(fragments)

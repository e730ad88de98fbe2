"""Parse the researcher's SQL subset into a validated ``QueryPlan``.

The accepted language (everything else is refused with a plain-words reason)::

    SELECT <group columns>, <aggregates>
    FROM <view>
    [WHERE <predicates on declared columns>
           [AND person_id [NOT] IN (SELECT person_id FROM <view> [WHERE ...])]]
    [GROUP BY <group columns>]

Aggregates: ``COUNT(*)``, ``COUNT(DISTINCT person_id)``, ``SUM(col)``, ``AVG(col)``.
Predicates: ``=``, ``<>``/``!=``, ``<``, ``<=``, ``>``, ``>=``, ``[NOT] IN (...)``, ``BETWEEN``,
``AND``, ``OR``, ``NOT``, parentheses. Literals must belong to the column's public domain (for
categories) or be whole numbers (for integer columns).

sqlglot builds the syntax tree; this module walks it and accepts only the node types above.
Refusal messages quote only what the researcher wrote or what the catalog publishes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from fedtre.catalog import PERSON_ID, Catalog, Column, ColumnType, Tier, Value, View
from fedtre.errors import QueryRefused, Refusal
from fedtre.plan import (
    Aggregate,
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
    cohort_views,
    referenced_columns,
)

MAX_SQL_CHARS = 10_000
MAX_AGGREGATES = 16
MAX_GROUP_COLUMNS = 4
MAX_CELLS = 10_000
# Noisy values one answer may hold (cells × statistics; a mean is two statistics). Drawing the
# noise is most of the work of a wide answer, so this bounds how long any answer can take, and
# lets a node's answer slot cover every query.
MAX_RELEASED_VALUES = 20_000
MAX_IN_VALUES = 256
MAX_PREDICATE_NODES = 200
MAX_COHORT_DEPTH = 3
MAX_COHORTS = 8  # cohort sub-queries in one query, at any depth: bounds the work of an answer

_COMPARE: dict[type[exp.Expression], CompareOp] = {
    exp.EQ: CompareOp.EQ,
    exp.NEQ: CompareOp.NE,
    exp.LT: CompareOp.LT,
    exp.LTE: CompareOp.LE,
    exp.GT: CompareOp.GT,
    exp.GTE: CompareOp.GE,
}
_SELECT_ARGS_ALLOWED = {"expressions", "from_", "from", "where", "group"}


def _shown(text: str, limit: int = 40) -> str:
    """Researcher text quoted in a refusal: printable and short."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "…"


def _refuse(message: str, refusal: Refusal = Refusal.UNSUPPORTED_QUERY) -> QueryRefused:
    return QueryRefused(refusal, message)


def parse_query(sql: str, catalog: Catalog) -> QueryPlan:
    """Parse and validate; raises ``QueryRefused`` with a clear reason for anything else."""
    statement = _single_statement(sql)
    parser = _Parser(catalog)
    plan = parser.query(statement)
    return plan


def query_tier(plan: QueryPlan, catalog: Catalog) -> Tier:
    """The highest sensitivity tier a plan names: its views, columns and the values it writes.

    This decides only what a query may name. What it reads is decided on rows: a project
    approved up to tier T never sees rows holding a value above T (``node.compiler``), so
    grouping on a column returns only the values at or below T, and no complement, negation or
    difference can reach the rows above it.
    """
    views = {plan.view} | cohort_views(plan.where)
    tiers = [catalog.views[v].tier for v in views]
    view = catalog.views[plan.view]
    for name in plan.group_by:
        tiers.append(view.columns[name].tier)
    for agg in plan.aggregates:
        if agg.column is not None:
            tiers.append(view.columns[agg.column].tier)
    for vname, cname in referenced_columns(plan.where, plan.view):
        tiers.append(catalog.views[vname].columns[cname].tier)
    tiers.extend(_value_tiers(plan.where, plan.view, catalog))
    return max(tiers)


def _value_tiers(pred: Predicate | None, view: str, catalog: Catalog) -> list[Tier]:
    match pred:
        case Compare(column, _, value):
            return [catalog.views[view].columns[column].tier_of(value)]
        case InList(column, values, _):
            col = catalog.views[view].columns[column]
            return [col.tier_of(v) for v in values]
        case And(items) | Or(items):
            return [t for p in items for t in _value_tiers(p, view, catalog)]
        case Not(item):
            return _value_tiers(item, view, catalog)
        case Cohort(sub_view, where, _):
            return _value_tiers(where, sub_view, catalog)
    return []


def _single_statement(sql: str) -> exp.Select:
    if not isinstance(sql, str) or not sql.strip():
        raise _refuse("The query is empty.", Refusal.INVALID_REQUEST)
    if len(sql) > MAX_SQL_CHARS:
        raise _refuse(f"The query is longer than {MAX_SQL_CHARS} characters.", Refusal.TOO_LARGE)
    if any(not (ch.isprintable() or ch in "\n\r\t") for ch in sql):
        raise _refuse("The query contains control characters.", Refusal.INVALID_REQUEST)
    try:
        tokens = sqlglot.tokenize(sql, read="duckdb")
        statements = sqlglot.parse(sql, read="duckdb")
    except (ParseError, TokenError, RecursionError):
        raise _refuse("The query is not valid SQL.", Refusal.INVALID_REQUEST) from None
    if any(tok.comments for tok in tokens) or _has_comments(statements):
        raise _refuse("Comments are not allowed in queries.")
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise _refuse("Send exactly one SELECT statement.")
    statement = statements[0]
    if not isinstance(statement, exp.Select):
        kind = type(statement).__name__.upper()
        raise _refuse(f"Only SELECT queries are allowed (this query is {kind}).")
    return statement


def _has_comments(statements: Sequence[Any]) -> bool:
    return any(node.comments for s in statements if s is not None for node in s.walk())


class _Parser:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.predicate_nodes = 0
        self.cohorts = 0

    def query(self, select: exp.Select) -> QueryPlan:
        self._only_allowed_clauses(select)
        view = self._from(select)
        group_by = self._group_by(select, view)
        aggregates: list[Aggregate] = []
        selected_groups: list[str] = []
        for item in select.expressions:
            alias = None
            node = item
            if isinstance(item, exp.Alias):
                alias = item.alias
                node = item.this
            if isinstance(node, exp.Star):
                raise _refuse("SELECT * is not allowed: ask for aggregates.")
            if isinstance(node, exp.Column):
                name = self._column_name(node, view)
                if name not in group_by:
                    raise _refuse(
                        f"Column '{name}' is selected without being grouped: listing raw values "
                        "is not allowed. Add it to GROUP BY or use it inside an aggregate."
                    )
                if alias is not None and alias != name:
                    raise _refuse("Group columns cannot be renamed.")
                selected_groups.append(name)
            else:
                aggregates.append(self._aggregate(node, alias, view, len(aggregates)))
        if not aggregates:
            raise _refuse(
                "Select at least one aggregate: COUNT(*), COUNT(DISTINCT person_id), "
                "SUM(column) or AVG(column)."
            )
        if len(aggregates) > MAX_AGGREGATES:
            raise _refuse(f"At most {MAX_AGGREGATES} aggregates per query.", Refusal.TOO_LARGE)
        if sorted(selected_groups) != sorted(group_by) or len(set(selected_groups)) != len(
            selected_groups
        ):
            raise _refuse("Select each GROUP BY column exactly once.")
        names = [a.alias for a in aggregates] + selected_groups
        if len(set(names)) != len(names):
            raise _refuse("Output column names must be distinct.")
        where = self._where(select, view, depth=0)
        cells = math.prod(len(view.columns[g].group_domain or ()) for g in group_by)
        values = cells * sum(2 if a.kind is AggregateKind.AVG else 1 for a in aggregates)
        if values > MAX_RELEASED_VALUES:
            raise _refuse(
                f"This query would release {values:,} noisy values; at most "
                f"{MAX_RELEASED_VALUES:,} per query (cells × aggregates, a mean counting twice). "
                "Group by fewer columns or ask for fewer aggregates.",
                Refusal.TOO_LARGE,
            )
        return QueryPlan(view.name, tuple(selected_groups), tuple(aggregates), where)

    def _only_allowed_clauses(self, select: exp.Select) -> None:
        for key, value in select.args.items():
            if value in (None, [], False) or key in _SELECT_ARGS_ALLOWED:
                continue
            clause = {
                "joins": "JOIN",
                "distinct": "SELECT DISTINCT",
                "order": "ORDER BY",
                "limit": "LIMIT",
                "offset": "OFFSET",
                "having": "HAVING",
                "with": "WITH",
                "with_": "WITH",
                "qualify": "QUALIFY",
                "windows": "WINDOW",
                "laterals": "LATERAL",
                "sample": "SAMPLE",
                "into": "INTO",
            }.get(key, key.upper())
            raise _refuse(f"{clause} is not supported in fedtre queries.")

    def _from(self, select: exp.Select) -> View:
        from_ = select.args.get("from_") or select.args.get("from")
        if from_ is None:
            raise _refuse("The query needs FROM <view>.")
        table = from_.this
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise _refuse("FROM must name one research view, not a function or sub-query.")
        if table.args.get("db") or table.args.get("catalog"):
            raise _refuse("Name the view without a schema or database prefix.")
        if table.alias:
            raise _refuse("Table aliases are not supported.")
        attached = [k for k, v in table.args.items() if k != "this" and v not in (None, [], False)]
        if attached:
            raise _refuse(
                "FROM must name one view with nothing attached to it (no sampling, pivots, "
                "hints or time travel)."
            )
        return self._view(table.name)

    def _view(self, name: str) -> View:
        view = self.catalog.view(name.lower())
        if view is None:
            known = ", ".join(sorted(self.catalog.views))
            raise _refuse(
                f"Unknown view '{_shown(name)}'. Available views: {known}.", Refusal.UNKNOWN_VIEW
            )
        return view

    def _group_by(self, select: exp.Select, view: View) -> tuple[str, ...]:
        group = select.args.get("group")
        if group is None:
            return ()
        if group.args.get("rollup") or group.args.get("cube") or group.args.get("grouping_sets"):
            raise _refuse("ROLLUP, CUBE and GROUPING SETS are not supported.")
        names: list[str] = []
        cells = 1
        for node in group.expressions:
            if not isinstance(node, exp.Column):
                raise _refuse("GROUP BY accepts column names only.")
            name = self._column_name(node, view)
            domain = view.columns[name].group_domain
            if domain is None:
                raise _refuse(
                    f"Column '{name}' has too many possible values to group by.",
                    Refusal.TOO_LARGE,
                )
            if name in names:
                raise _refuse(f"Column '{name}' appears twice in GROUP BY.")
            names.append(name)
            cells *= len(domain)
        if len(names) > MAX_GROUP_COLUMNS:
            raise _refuse(f"Group by at most {MAX_GROUP_COLUMNS} columns.", Refusal.TOO_LARGE)
        if cells > MAX_CELLS:
            raise _refuse(
                f"The grouping has more than {MAX_CELLS} cells; group by fewer columns.",
                Refusal.TOO_LARGE,
            )
        return tuple(names)

    def _column_name(self, node: exp.Column, view: View) -> str:
        if node.args.get("db") or node.args.get("catalog"):
            raise _refuse("Column names cannot carry a schema prefix.")
        if node.table and node.table.lower() != view.name:
            raise _refuse(
                f"Column prefix '{_shown(node.table)}' does not name the view '{view.name}'."
            )
        if isinstance(node.this, exp.Star):
            raise _refuse("SELECT * is not allowed: ask for aggregates.")
        name = node.name.lower()
        if name == PERSON_ID:
            raise _refuse(
                "The person_id column can only be used in COUNT(DISTINCT person_id) or in a cohort "
                "filter "
                "'person_id IN (SELECT person_id FROM <view> WHERE ...)'."
            )
        if name not in view.columns:
            known = ", ".join(view.columns)
            raise _refuse(
                f"Unknown column '{_shown(node.name)}' in view '{view.name}'. Columns: {known}.",
                Refusal.UNKNOWN_COLUMN,
            )
        return name

    def _aggregate(self, node: exp.Expression, alias: str | None, view: View, i: int) -> Aggregate:
        if isinstance(node, exp.Count):
            arg = node.this
            if isinstance(arg, exp.Star):
                return Aggregate(AggregateKind.COUNT, alias or "count")
            if isinstance(arg, exp.Distinct):
                cols = arg.expressions
                if (
                    len(cols) == 1
                    and isinstance(cols[0], exp.Column)
                    and cols[0].name.lower() == PERSON_ID
                    and (not cols[0].table or cols[0].table.lower() == view.name)
                ):
                    return Aggregate(AggregateKind.COUNT_PERSONS, alias or "persons")
                raise _refuse("COUNT(DISTINCT ...) is only supported as COUNT(DISTINCT person_id).")
            raise _refuse("Use COUNT(*) to count rows or COUNT(DISTINCT person_id) for people.")
        kinds: dict[type[exp.Expression], AggregateKind] = {
            exp.Sum: AggregateKind.SUM,
            exp.Avg: AggregateKind.AVG,
        }
        kind = kinds.get(type(node))
        if kind is None:
            if isinstance(node, exp.Func | exp.AggFunc):
                fname = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
                raise _refuse(
                    f"Function {_shown(fname)} is not supported. Aggregates: COUNT(*), "
                    "COUNT(DISTINCT person_id), SUM(column), AVG(column)."
                )
            raise _refuse("Each selected item must be a group column or an aggregate.")
        arg = node.this
        if not isinstance(arg, exp.Column):
            raise _refuse(f"{kind.name}(...) takes one column name.")
        name = self._column_name(arg, view)
        if view.columns[name].type is not ColumnType.INTEGER:
            raise _refuse(f"{kind.name} needs a numeric column; '{name}' is not numeric.")
        return Aggregate(kind, alias or f"{kind.value}_{name}", name)

    def _where(self, select: exp.Select, view: View, depth: int) -> Predicate | None:
        where = select.args.get("where")
        if where is None:
            return None
        return self._predicate(where.this, view, depth)

    def _predicate(self, node: exp.Expression, view: View, depth: int) -> Predicate:
        self.predicate_nodes += 1
        if self.predicate_nodes > MAX_PREDICATE_NODES:
            raise _refuse("The WHERE clause is too complex.", Refusal.TOO_LARGE)
        if isinstance(node, exp.Paren):
            return self._predicate(node.this, view, depth)
        if isinstance(node, exp.And):
            return And(tuple(self._predicate(n, view, depth) for n in _flatten(node, exp.And)))
        if isinstance(node, exp.Or):
            return Or(tuple(self._predicate(n, view, depth) for n in _flatten(node, exp.Or)))
        if isinstance(node, exp.Not):
            inner = node.this
            if isinstance(inner, exp.In):
                return self._in(inner, view, depth, negated=True)
            return Not(self._predicate(inner, view, depth))
        if isinstance(node, exp.In):
            return self._in(node, view, depth, negated=False)
        if isinstance(node, exp.Between):
            col = self._predicate_column(node.this, view)
            self._ordered(col, "BETWEEN")
            low = self._literal(node.args["low"], col)
            high = self._literal(node.args["high"], col)
            if node.args.get("symmetric"):
                low, high = sorted((low, high))
            return And(
                (Compare(col.name, CompareOp.GE, low), Compare(col.name, CompareOp.LE, high))
            )
        op = _COMPARE.get(type(node))
        if op is not None:
            left, right = node.this, node.expression
            if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
                left, right = right, left
                op = _flip(op)
            col = self._predicate_column(left, view)
            if op not in (CompareOp.EQ, CompareOp.NE):
                self._ordered(col, op.value)
            return Compare(col.name, op, self._literal(right, col))
        raise _refuse(
            "The WHERE clause supports comparisons, IN, BETWEEN, AND, OR and NOT on declared "
            "columns, and person_id IN (SELECT person_id FROM <view> ...) cohorts."
        )

    def _in(self, node: exp.In, view: View, depth: int, negated: bool) -> Predicate:
        subquery = node.args.get("query")
        if subquery is not None:
            return self._cohort(node.this, subquery, view, depth, negated)
        if node.args.get("unnest") or node.args.get("field"):
            raise _refuse("IN accepts a list of values or a person_id cohort sub-query.")
        col = self._predicate_column(node.this, view)
        values = node.expressions
        if not values:
            raise _refuse("IN needs at least one value.")
        if len(values) > MAX_IN_VALUES:
            raise _refuse(f"IN lists take at most {MAX_IN_VALUES} values.", Refusal.TOO_LARGE)
        literals = tuple(dict.fromkeys(self._literal(v, col) for v in values))
        return InList(col.name, literals, negated)

    def _cohort(
        self, left: exp.Expression, subquery: exp.Expression, view: View, depth: int, negated: bool
    ) -> Cohort:
        if not (
            isinstance(left, exp.Column)
            and left.name.lower() == PERSON_ID
            and (not left.table or left.table.lower() == view.name)
        ):
            raise _refuse("Sub-queries are only allowed as person_id IN (SELECT person_id ...).")
        self.cohorts += 1
        if self.cohorts > MAX_COHORTS:
            raise _refuse(f"At most {MAX_COHORTS} cohort sub-queries per query.", Refusal.TOO_LARGE)
        if depth + 1 > MAX_COHORT_DEPTH:
            raise _refuse(
                f"Cohort sub-queries nest at most {MAX_COHORT_DEPTH} deep.", Refusal.TOO_LARGE
            )
        inner = subquery.this if isinstance(subquery, exp.Subquery) else subquery
        if not isinstance(inner, exp.Select):
            raise _refuse("A cohort must be a single SELECT person_id FROM <view> sub-query.")
        for key, value in inner.args.items():
            if value in (None, [], False):
                continue
            if key not in {"expressions", "from_", "from", "where"}:
                raise _refuse("A cohort sub-query may only have SELECT person_id, FROM and WHERE.")
        sub_view = self._from(inner)
        cols = inner.expressions
        if not (
            len(cols) == 1
            and isinstance(cols[0], exp.Column)
            and cols[0].name.lower() == PERSON_ID
            and (not cols[0].table or cols[0].table.lower() == sub_view.name)
        ):
            raise _refuse("A cohort sub-query must select exactly person_id.")
        where = self._where(inner, sub_view, depth + 1)
        return Cohort(sub_view.name, where, negated)

    def _predicate_column(self, node: exp.Expression, view: View) -> Column:
        if not isinstance(node, exp.Column):
            raise _refuse("Conditions must compare a column with a literal value.")
        return view.columns[self._column_name(node, view)]

    def _ordered(self, col: Column, op: str) -> None:
        if col.type is not ColumnType.INTEGER:
            raise _refuse(f"'{op}' needs a numeric column; '{col.name}' is a category.")

    def _literal(self, node: exp.Expression, col: Column) -> Value:
        if isinstance(node, exp.Paren):
            node = node.this
        if col.type is ColumnType.BOOLEAN:
            if isinstance(node, exp.Boolean):
                return bool(node.this)
            raise _refuse(f"Compare '{col.name}' with TRUE or FALSE.", Refusal.INVALID_VALUE)
        if col.type is ColumnType.INTEGER:
            sign = 1
            if isinstance(node, exp.Neg):
                sign, node = -1, node.this
            if isinstance(node, exp.Literal) and not node.is_string:
                text = node.this
                if text.isdigit() and len(text) <= 12:
                    return sign * int(text)
            raise _refuse(
                f"Compare '{col.name}' with a whole number (at most 12 digits).",
                Refusal.INVALID_VALUE,
            )
        if isinstance(node, exp.Literal) and node.is_string:
            value = node.this
            if value in col.domain:
                return value
            allowed = ", ".join(f"'{v}'" for v in col.domain)
            raise _refuse(
                f"'{_shown(value)}' is not a value of '{col.name}'. Values: {allowed}.",
                Refusal.INVALID_VALUE,
            )
        raise _refuse(f"Compare '{col.name}' with a quoted value.", Refusal.INVALID_VALUE)


def _flatten(node: exp.Expression, kind: type[exp.Expression]) -> list[exp.Expression]:
    out: list[exp.Expression] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, kind):
            stack.append(current.expression)
            stack.append(current.this)
        elif isinstance(current, exp.Paren) and isinstance(current.this, kind):
            stack.append(current.this)
        else:
            out.append(current)
    return out


def _flip(op: CompareOp) -> CompareOp:
    return {
        CompareOp.LT: CompareOp.GT,
        CompareOp.LE: CompareOp.GE,
        CompareOp.GT: CompareOp.LT,
        CompareOp.GE: CompareOp.LE,
    }.get(op, op)

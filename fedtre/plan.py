"""The query plan: what a researcher asked for, as frozen values, never as text.

A plan is produced by ``fedtre.parse`` from the SQL subset and validated against the catalog.
Nodes compile plans into SQL with identifiers taken from their own catalog; the researcher's text
is never executed. ``canonical()`` gives a stable JSON-able form used for fingerprints (so a
retried query id can be checked against what was first asked) and for the wire.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from fedtre.catalog import Value


class AggregateKind(Enum):
    COUNT = "count"  # COUNT(*): rows, each person contributing at most the view's row cap
    COUNT_PERSONS = "count_persons"  # COUNT(DISTINCT person_id)
    SUM = "sum"  # SUM(col), values clamped to the catalog bounds
    AVG = "avg"  # AVG(col): released as a noisy sum and a noisy count


class CompareOp(Enum):
    EQ = "="
    NE = "<>"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="


@dataclass(frozen=True)
class Aggregate:
    kind: AggregateKind
    alias: str
    column: str | None = None


@dataclass(frozen=True)
class Compare:
    column: str
    op: CompareOp
    value: Value


@dataclass(frozen=True)
class InList:
    column: str
    values: tuple[Value, ...]
    negated: bool = False


@dataclass(frozen=True)
class And:
    items: tuple[Predicate, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Predicate, ...]


@dataclass(frozen=True)
class Not:
    item: Predicate


@dataclass(frozen=True)
class Cohort:
    """``person_id [NOT] IN (SELECT person_id FROM view [WHERE ...])``: a semi-join on the unit."""

    view: str
    where: Predicate | None
    negated: bool = False


Predicate = Union[Compare, InList, And, Or, Not, Cohort]  # noqa: UP007 (used at runtime)


@dataclass(frozen=True)
class QueryPlan:
    view: str
    group_by: tuple[str, ...]
    aggregates: tuple[Aggregate, ...]
    where: Predicate | None = None

    def canonical(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "group_by": list(self.group_by),
            "aggregates": [
                {"kind": a.kind.value, "alias": a.alias, "column": a.column}
                for a in self.aggregates
            ],
            "where": _canonical_predicate(self.where),
        }

    def fingerprint(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _canonical_predicate(pred: Predicate | None) -> Any:
    match pred:
        case None:
            return None
        case Compare(column, op, value):
            return {"compare": [column, op.value, value]}
        case InList(column, values, negated):
            return {"in": [column, list(values), negated]}
        case And(items):
            return {"and": [_canonical_predicate(p) for p in items]}
        case Or(items):
            return {"or": [_canonical_predicate(p) for p in items]}
        case Not(item):
            return {"not": _canonical_predicate(item)}
        case Cohort(view, where, negated):
            return {"cohort": [view, _canonical_predicate(where), negated]}
    raise TypeError(f"not a predicate: {type(pred).__name__}")


def referenced_columns(pred: Predicate | None, view: str) -> set[tuple[str, str]]:
    """(view, column) pairs a predicate reads, including those inside cohort sub-queries."""
    match pred:
        case None:
            return set()
        case Compare(column, _, _) | InList(column, _, _):
            return {(view, column)}
        case And(items) | Or(items):
            return set().union(*(referenced_columns(p, view) for p in items))
        case Not(item):
            return referenced_columns(item, view)
        case Cohort(sub_view, where, _):
            return referenced_columns(where, sub_view)
    raise TypeError(f"not a predicate: {type(pred).__name__}")


def cohort_views(pred: Predicate | None) -> set[str]:
    """Views a predicate reaches through cohort sub-queries."""
    match pred:
        case Cohort(view, where, _):
            return {view} | cohort_views(where)
        case And(items) | Or(items):
            return set().union(*(cohort_views(p) for p in items))
        case Not(item):
            return cohort_views(item)
    return set()


def fingerprint(project_id: str, plan: QueryPlan, units: int) -> str:
    """The query plan's hash (with its project and cost): what a retry of a query id must
    match at a trust, and what release records and audit reconciliation name a query by."""
    text = json.dumps(
        {"project": project_id, "plan": plan.canonical(), "units": units}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()

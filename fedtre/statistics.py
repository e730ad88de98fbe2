"""What a query releases and what each part costs, from the plan and the catalog alone: the
statistics behind each aggregate, the cells, each statistic's sensitivity and its ε share.

One entry per aggregate kind, used by the node (``node.release`` builds an OpenDP measurement for
every planned statistic) and by the researcher's client (``fedtre query --explain`` shows the
cost and the expected error before anything is spent), so both see the same numbers.

Sensitivities, under add/remove-one-person neighbours after the node's contribution bounding:

* ``count``: a person has at most ``cap`` rows in total, so the vector moves by at most ``cap``
  in L1 norm;
* ``count_persons``: a person is in at most ``min(cap, cells)`` cells, once each;
* ``sum``: at most ``cap`` rows, each clamped to [lower, upper]: ``cap * max(|lower|, |upper|)``.

The requested ε is split into equal integer shares across the aggregates; an AVG's share is
split between its sum and its count to minimise the variance of their ratio, using only the
catalog (sum sensitivity S, count sensitivity C, and the midpoint m of the bounds as a prior
guess of the mean): ε_sum ∝ S^(2/3), ε_count ∝ (m·C)^(2/3).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fedtre.catalog import Catalog, Tier, Value, View
from fedtre.dp import split_units, split_units_weighted
from fedtre.errors import InternalError
from fedtre.plan import Aggregate, AggregateKind, QueryPlan


@dataclass(frozen=True)
class Statistic:
    """One exact column the SQL computes: ``count``, ``count_persons`` or ``sum`` of a column."""

    kind: str
    column: str | None = None


@dataclass(frozen=True)
class StatisticShare:
    statistic: Statistic
    sensitivity: int  # L1 over the whole vector
    epsilon_units: int


@dataclass(frozen=True)
class AggregateShares:
    aggregate: Aggregate
    statistics: tuple[StatisticShare, ...]
    lower: int | None  # SUM and AVG: the catalog bounds values are clamped to
    upper: int | None


def statistics_for(plan: QueryPlan) -> list[list[Statistic]]:
    """The exact statistics behind each aggregate, in plan order (AVG = sum and count)."""
    out: list[list[Statistic]] = []
    for agg in plan.aggregates:
        match agg.kind:
            case AggregateKind.COUNT:
                out.append([Statistic("count")])
            case AggregateKind.COUNT_PERSONS:
                out.append([Statistic("count_persons")])
            case AggregateKind.SUM:
                out.append([Statistic("sum", agg.column)])
            case AggregateKind.AVG:
                out.append([Statistic("sum", agg.column), Statistic("count")])
    return out


def cells_for(plan: QueryPlan, catalog: Catalog, tier: Tier) -> tuple[tuple[Value, ...], ...]:
    """Every cell of the answer, in order, as a project approved up to ``tier`` sees the
    domains (values above its tier are not in them)."""
    view = catalog.views[plan.view]
    domains = [view.columns[g].group_domain_at(tier) or () for g in plan.group_by]
    return tuple(itertools.product(*domains)) if plan.group_by else ((),)


def sensitivity(stat: Statistic, view: View, cells: int) -> int:
    cap = view.max_rows_per_person
    if stat.kind == "count":
        return cap
    if stat.kind == "count_persons":
        return min(cap, cells)
    if stat.kind == "sum":
        assert stat.column is not None
        return cap * view.columns[stat.column].magnitude
    raise InternalError(f"unknown statistic {stat.kind}")


def epsilon_shares(
    plan: QueryPlan, view: View, cells: int, epsilon_units: int
) -> tuple[AggregateShares, ...]:
    """Split ``epsilon_units`` exactly over the plan's statistics, with their sensitivities.
    Refuses (``INVALID_EPSILON``) when ε is too small to give every statistic a share."""
    per_aggregate = statistics_for(plan)
    agg_shares = split_units(epsilon_units, len(per_aggregate))
    out = []
    for agg, stats, share in zip(plan.aggregates, per_aggregate, agg_shares, strict=True):
        items = tuple(
            StatisticShare(stat, sensitivity(stat, view, cells), units)
            for stat, units in zip(stats, _split(stats, share, view, cells), strict=True)
        )
        col = view.columns[agg.column] if agg.column else None
        out.append(
            AggregateShares(agg, items, col.lower if col else None, col.upper if col else None)
        )
    return tuple(out)


def _split(stats: list[Statistic], share: int, view: View, cells: int) -> list[int]:
    if len(stats) == 1:
        return [share]
    total, count = stats  # AVG
    assert total.column is not None
    col = view.columns[total.column]
    midpoint = max(1.0, (abs(col.lower or 0) + abs(col.upper or 0)) / 2)
    weights = [
        sensitivity(total, view, cells) ** (2 / 3),
        (midpoint * sensitivity(count, view, cells)) ** (2 / 3),
    ]
    return split_units_weighted(share, weights)

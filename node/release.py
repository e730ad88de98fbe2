"""Differentially private release of exact aggregates, through OpenDP only.

Each statistic (one value per cell) is released with one OpenDP discrete Laplace measurement
over the whole vector. Sensitivities come from the catalog alone, under add/remove-one-person
neighbours, after the compiler's contribution bounding:

* ``count``: a person has at most ``cap`` rows in total, so the vector moves by at most ``cap``
  in L1 norm;
* ``count_persons``: a person is in at most ``min(cap, cells)`` cells, once each;
* ``sum``: at most ``cap`` rows, each clamped to [lower, upper]: ``cap * max(|lower|, |upper|)``.

The requested ε is split into equal integer shares across the aggregates; an AVG's share is
split between its sum and its count to minimise the variance of their ratio, using only the
catalog (sum sensitivity S, count sensitivity C, and the midpoint m of the bounds as a prior
guess of the mean): ε_sum ∝ S^(2/3), ε_count ∝ (m·C)^(2/3). OpenDP's own privacy map checks
every measurement against its share before it is used.

Two steps, so that the cost is fixed before the data is touched: ``plan_release`` decides the
split, the sensitivities and builds every OpenDP measurement from the plan and the catalog alone
(and refuses an impossible split); only then does the node read data, and ``release`` applies
the planned measurements to the exact values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import opendp.prelude as dp

from fedtre.catalog import View
from fedtre.dp import (
    DISCRETE_LAPLACE,
    discrete_laplace_std,
    split_units,
    split_units_weighted,
    units_to_epsilon,
)
from fedtre.errors import InternalError
from fedtre.plan import Aggregate, QueryPlan
from fedtre.result import ReleasedAggregate, ReleasedStatistic
from node.compiler import Statistic, statistics_for

dp.enable_features("contrib")

MECHANISM = DISCRETE_LAPLACE
_DOMAIN = dp.vector_domain(dp.atom_domain(T=dp.i64))
_METRIC = dp.l1_distance(T=dp.i64)


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


@functools.lru_cache(maxsize=1024)
def laplace_measurement(l1: int, epsilon_units: int):
    """The OpenDP measurement for this sensitivity and ε share, with its scale (built once per
    pair: a measurement is an immutable function of these two integers).

    The scale starts at l1/ε and is nudged up until OpenDP's privacy map confirms the loss is
    within the share, so float rounding can never make a release cost more than was debited.
    """
    epsilon = units_to_epsilon(epsilon_units)
    scale = l1 / epsilon
    for _ in range(64):
        meas = dp.m.make_laplace(_DOMAIN, _METRIC, scale=scale)
        if meas.map(l1) <= epsilon:
            return meas, scale
        scale = math.nextafter(scale, math.inf)
    raise InternalError("could not calibrate the Laplace scale")


@dataclass(frozen=True)
class PlannedStatistic:
    statistic: Statistic
    sensitivity: int
    epsilon_units: int
    scale: float
    measurement: Any  # the OpenDP measurement, checked against its share


@dataclass(frozen=True)
class PlannedAggregate:
    aggregate: Aggregate
    statistics: tuple[PlannedStatistic, ...]
    lower: int | None
    upper: int | None


@dataclass(frozen=True)
class ReleasePlan:
    """The cost of a query and how it is spent, fixed before any data is read."""

    aggregates: tuple[PlannedAggregate, ...]
    epsilon_units: int

    @property
    def statistics(self) -> tuple[PlannedStatistic, ...]:
        return tuple(s for a in self.aggregates for s in a.statistics)


def _shares(stats: list[Statistic], share: int, view: View, cells: int) -> list[int]:
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


def plan_release(plan: QueryPlan, view: View, cells: int, epsilon_units: int) -> ReleasePlan:
    """Split ``epsilon_units`` (exactly) over the plan's statistics and build each measurement.

    Refuses (``INVALID_EPSILON``) when ε is too small to give every statistic a share.
    """
    per_aggregate = statistics_for(plan)
    agg_shares = split_units(epsilon_units, len(per_aggregate))
    planned: list[PlannedAggregate] = []
    for agg, stats, share in zip(plan.aggregates, per_aggregate, agg_shares, strict=True):
        items = []
        for stat, stat_share in zip(stats, _shares(stats, share, view, cells), strict=True):
            l1 = sensitivity(stat, view, cells)
            meas, scale = laplace_measurement(l1, stat_share)
            items.append(PlannedStatistic(stat, l1, stat_share, scale, meas))
        col = view.columns[agg.column] if agg.column else None
        planned.append(
            PlannedAggregate(
                agg, tuple(items), col.lower if col else None, col.upper if col else None
            )
        )
    return ReleasePlan(tuple(planned), epsilon_units)


def release(rplan: ReleasePlan, exact: list[list[int]]) -> tuple[ReleasedAggregate, ...]:
    """Noise every exact statistic with its planned measurement (one vector per statistic)."""
    if len(exact) != len(rplan.statistics):
        raise InternalError("the exact values do not match the release plan")
    out: list[ReleasedAggregate] = []
    position = 0
    for planned in rplan.aggregates:
        released = []
        for item in planned.statistics:
            noisy = item.measurement(exact[position])
            position += 1
            released.append(
                ReleasedStatistic(
                    kind=item.statistic.kind,
                    values=tuple(int(v) for v in noisy),
                    sensitivity=item.sensitivity,
                    noise_scale=item.scale,
                    noise_std=discrete_laplace_std(item.scale),
                    epsilon_units=item.epsilon_units,
                    mechanism=MECHANISM,
                )
            )
        out.append(
            ReleasedAggregate(
                alias=planned.aggregate.alias,
                kind=planned.aggregate.kind,
                column=planned.aggregate.column,
                statistics=tuple(released),
                lower=planned.lower,
                upper=planned.upper,
            )
        )
    return tuple(out)

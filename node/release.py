"""Differentially private release of exact aggregates, through OpenDP only.

Each statistic (one value per cell) is released with one OpenDP discrete Laplace measurement
over the whole vector, with the sensitivity and ε share that ``fedtre.statistics`` gives from the
plan and the catalog alone. OpenDP's own privacy map checks every measurement against its share
before it is used.

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
from fedtre.dp import DISCRETE_LAPLACE, discrete_laplace_std, units_to_epsilon
from fedtre.errors import InternalError
from fedtre.plan import Aggregate, QueryPlan
from fedtre.result import ReleasedAggregate, ReleasedStatistic
from fedtre.statistics import Statistic, epsilon_shares

dp.enable_features("contrib")

MECHANISM = DISCRETE_LAPLACE
_DOMAIN = dp.vector_domain(dp.atom_domain(T=dp.i64))
_METRIC = dp.l1_distance(T=dp.i64)


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


def plan_release(plan: QueryPlan, view: View, cells: int, epsilon_units: int) -> ReleasePlan:
    """Split ``epsilon_units`` (exactly) over the plan's statistics and build each measurement.

    Refuses (``INVALID_EPSILON``) when ε is too small to give every statistic a share.
    """
    planned = []
    for agg in epsilon_shares(plan, view, cells, epsilon_units):
        items = []
        for share in agg.statistics:
            meas, scale = laplace_measurement(share.sensitivity, share.epsilon_units)
            items.append(
                PlannedStatistic(
                    share.statistic, share.sensitivity, share.epsilon_units, scale, meas
                )
            )
        planned.append(PlannedAggregate(agg.aggregate, tuple(items), agg.lower, agg.upper))
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

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
"""

from __future__ import annotations

import math

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
from fedtre.plan import QueryPlan
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


def laplace_measurement(l1: int, epsilon_units: int):
    """The OpenDP measurement for this sensitivity and ε share, with its scale.

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


def release_statistic(
    kind: str, values: list[int], l1: int, epsilon_units: int
) -> ReleasedStatistic:
    meas, scale = laplace_measurement(l1, epsilon_units)
    noisy = meas(values)
    return ReleasedStatistic(
        kind=kind,
        values=tuple(int(v) for v in noisy),
        sensitivity=l1,
        noise_scale=scale,
        noise_std=discrete_laplace_std(scale),
        epsilon_units=epsilon_units,
        mechanism=MECHANISM,
    )


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


def release(
    plan: QueryPlan, view: View, cells: int, exact: list[list[int]], epsilon_units: int
) -> tuple[ReleasedAggregate, ...]:
    """Noise every exact statistic; the shares add up exactly to ``epsilon_units``."""
    per_aggregate = statistics_for(plan)
    agg_shares = split_units(epsilon_units, len(per_aggregate))
    out: list[ReleasedAggregate] = []
    position = 0
    for agg, stats, share in zip(plan.aggregates, per_aggregate, agg_shares, strict=True):
        released: list[ReleasedStatistic] = []
        for stat, stat_share in zip(stats, _shares(stats, share, view, cells), strict=True):
            l1 = sensitivity(stat, view, cells)
            released.append(release_statistic(stat.kind, exact[position], l1, stat_share))
            position += 1
        col = view.columns[agg.column] if agg.column else None
        out.append(
            ReleasedAggregate(
                alias=agg.alias,
                kind=agg.kind,
                column=agg.column,
                statistics=tuple(released),
                lower=col.lower if col else None,
                upper=col.upper if col else None,
            )
        )
    return tuple(out)

"""Combine the trusts' released answers into one federated estimate per aggregate and cell.

Pure post-processing of noisy values: no I/O, no noise drawn, nothing from ``node``.

* COUNT, COUNT(DISTINCT person_id), SUM: the estimate is the sum of the trusts' noisy values.
  Its error is a sum of independent discrete Laplace variables, so the interval is
  ``fedtre.dp.sum_interval`` over the trusts' noise scales: it covers the truth with at least
  the stated probability (exact distribution, numerically conservative). A count cannot be
  negative and neither can a sum of values clamped to non-negative bounds, so such estimates and
  interval ends are raised to 0 (ends above 0 are kept; coverage can only grow).
* AVG: the ratio of the summed noisy sums to the summed noisy counts, kept within the column's
  bounds, with the approximate (delta method) interval of ``fedtre.dp.ratio_estimate`` using
  the combined standard deviations sqrt(Σ std²). Not available when the summed count is <= 0.

Output rules act on the noisy combined values only, in this order:

1. suppression: a COUNT / COUNT(DISTINCT) whose combined noisy value is below ``suppress_below``
   is shown as "< N", and a mean whose combined noisy count of observations is below it as
   "< N obs"; a suppressed estimate carries no value and no interval. Thresholds compare the
   unrounded, unclipped combined value. Sums are never suppressed.
2. clipping at 0 (counts, and sums of non-negative values), as above;
3. rounding: counts and sums to the nearest multiple of ``round_to`` (halves go up); the interval
   is widened outward to multiples (low end down, high end up) so it still covers the truth
   whenever the unrounded one did. Means are not rounded; they are shown with one decimal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedtre.catalog import Value
from fedtre.dp import (
    DISCRETE_LAPLACE,
    Interval,
    ratio_estimate,
    ratio_std_error,
    sum_halfwidth,
)
from fedtre.errors import InternalError
from fedtre.plan import AggregateKind
from fedtre.result import NodeResult, ReleasedAggregate

_STATISTICS: dict[AggregateKind, tuple[str, ...]] = {
    AggregateKind.COUNT: ("count",),
    AggregateKind.COUNT_PERSONS: ("count_persons",),
    AggregateKind.SUM: ("sum",),
    AggregateKind.AVG: ("sum", "count"),
}
_COUNTS = (AggregateKind.COUNT, AggregateKind.COUNT_PERSONS)


class CombineError(InternalError):
    """The answers do not fit together (a bug or a misbehaving node). ``mismatch`` names what
    differs; the message never carries values."""

    def __init__(self, mismatch: str, message: str | None = None) -> None:
        super().__init__(message or f"the trusts' answers do not fit together: {mismatch}")
        self.mismatch = mismatch


@dataclass(frozen=True)
class OutputRules:
    suppress_below: int = 0  # 0 = off. Noisy combined counts below it are shown as "< N"
    round_to: int = 1  # 1 = off. Counts and sums are rounded to the nearest multiple

    def __post_init__(self) -> None:
        for name, value, least in (
            ("suppress_below", self.suppress_below, 0),
            ("round_to", self.round_to, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a whole number of at least {least}")


@dataclass(frozen=True)
class CombinedEstimate:
    available: bool  # False when not estimable (a mean whose combined noisy count <= 0)
    suppressed: bool
    value: float | None  # None when suppressed or not available
    low: float | None
    high: float | None
    display: str  # "1,235", "< 10", "< 10 obs", "12.3", "n/a"
    std_error: float | None = None  # of the estimate: the noise's, for counts and sums


@dataclass(frozen=True)
class CombinedColumn:
    alias: str
    kind: AggregateKind
    column: str | None
    estimates: tuple[CombinedEstimate, ...]  # one per cell


@dataclass(frozen=True)
class Combined:
    view: str
    catalog_version: str
    reference_date: str  # the date every covered trust computed ages at
    group_by: tuple[str, ...]
    cells: tuple[tuple[Value, ...], ...]
    columns: tuple[CombinedColumn, ...]
    covered: tuple[str, ...]  # node ids of the trusts whose answers were combined, sorted
    epsilon_units: int  # what the query cost at each trust (each spent it from its own budget)
    notes: tuple[str, ...]


def combine(
    results: Sequence[NodeResult], rules: OutputRules, confidence: float = 0.95
) -> Combined:
    """One estimate per aggregate and cell from the answers of the trusts that answered."""
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    check_fit(results)
    first = results[0]
    columns = tuple(
        CombinedColumn(
            alias=agg.alias,
            kind=agg.kind,
            column=agg.column,
            estimates=_combine_aggregate(
                [r.aggregates[a] for r in results], len(first.cells), rules, confidence
            ),
        )
        for a, agg in enumerate(first.aggregates)
    )
    covered = tuple(sorted(r.node_id for r in results))
    return Combined(
        view=first.view,
        catalog_version=first.catalog_version,
        reference_date=first.reference_date,
        group_by=first.group_by,
        cells=first.cells,
        columns=columns,
        covered=covered,
        epsilon_units=first.epsilon_units,
        notes=_notes(rules, confidence, first),
    )


def check_fit(results: Sequence[NodeResult]) -> None:
    """Raise ``CombineError`` unless the answers are of one query, shaped the same way, from
    distinct trusts, with noise whose interval arithmetic is known."""
    if not results:
        raise CombineError("no answers", "there are no answers to combine")
    first = results[0]
    if len({r.node_id for r in results}) != len(results):
        raise CombineError("trust", "the same trust answered more than once")
    for r in results:
        for mismatch, same in (
            ("query id", r.query_id == first.query_id),
            ("project", r.project_id == first.project_id),
            ("view", r.view == first.view),
            ("catalog version", r.catalog_version == first.catalog_version),
            ("reference date", r.reference_date == first.reference_date),
            ("grouping", r.group_by == first.group_by),
            ("cells", r.cells == first.cells),
            ("epsilon", r.epsilon_units == first.epsilon_units),
            ("aggregates", len(r.aggregates) == len(first.aggregates)),
        ):
            if not same:
                raise CombineError(mismatch)
        for agg, ref in zip(r.aggregates, first.aggregates, strict=True):
            _check_aggregate(agg, ref, len(first.cells))


def _check_aggregate(agg: ReleasedAggregate, ref: ReleasedAggregate, cells: int) -> None:
    for mismatch, same in (
        ("alias", agg.alias == ref.alias),
        ("kind", agg.kind is ref.kind),
        ("column", agg.column == ref.column),
        ("bounds", (agg.lower, agg.upper) == (ref.lower, ref.upper)),
        ("statistics", tuple(s.kind for s in agg.statistics) == _STATISTICS[agg.kind]),
    ):
        if not same:
            raise CombineError(mismatch)
    if agg.kind is AggregateKind.AVG and (agg.lower is None or agg.upper is None):
        raise CombineError("bounds")
    for stat, ref_stat in zip(agg.statistics, ref.statistics, strict=True):
        if stat.epsilon_units != ref_stat.epsilon_units:
            raise CombineError("epsilon")
        if stat.mechanism != DISCRETE_LAPLACE:
            raise CombineError("mechanism")
        if not (math.isfinite(stat.noise_scale) and stat.noise_scale > 0):
            raise CombineError("noise scale")
        if not (math.isfinite(stat.noise_std) and stat.noise_std > 0):
            raise CombineError("noise std")
        if len(stat.values) != cells:
            raise CombineError("cells")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in stat.values):
            raise CombineError("values")


def _combine_aggregate(
    per_trust: list[ReleasedAggregate], cells: int, rules: OutputRules, confidence: float
) -> tuple[CombinedEstimate, ...]:
    ref = per_trust[0]
    if ref.kind is AggregateKind.AVG:
        assert ref.lower is not None and ref.upper is not None
        sums = [sum(a.statistics[0].values[c] for a in per_trust) for c in range(cells)]
        counts = [sum(a.statistics[1].values[c] for a in per_trust) for c in range(cells)]
        sum_std = math.sqrt(sum(a.statistics[0].noise_std ** 2 for a in per_trust))
        count_std = math.sqrt(sum(a.statistics[1].noise_std ** 2 for a in per_trust))
        return tuple(
            _mean(s, sum_std, n, count_std, ref.lower, ref.upper, rules, confidence)
            for s, n in zip(sums, counts, strict=True)
        )
    k = sum_halfwidth([a.statistics[0].noise_scale for a in per_trust], confidence)
    std = math.sqrt(sum(a.statistics[0].noise_std ** 2 for a in per_trust))
    totals = [sum(a.statistics[0].values[c] for a in per_trust) for c in range(cells)]
    is_count = ref.kind in _COUNTS
    # A count is never negative; nor is a sum of values clamped to [lower >= 0, upper].
    floor_zero = is_count or (ref.lower is not None and ref.lower >= 0)
    ceil_zero = not is_count and ref.upper is not None and ref.upper <= 0
    return tuple(_total(v, k, std, is_count, floor_zero, ceil_zero, rules) for v in totals)


def _total(
    value: int,
    k: int,
    std: float,
    is_count: bool,
    floor_zero: bool,
    ceil_zero: bool,
    rules: OutputRules,
) -> CombinedEstimate:
    if is_count and _below(value, rules):
        return _suppressed(f"< {rules.suppress_below:,}", available=True)
    low, high = value - k, value + k
    if floor_zero:
        value, low, high = max(value, 0), max(low, 0), max(high, 0)
    if ceil_zero:
        value, low, high = min(value, 0), min(low, 0), min(high, 0)
    m = rules.round_to
    if m > 1:
        value = (value + m // 2) // m * m  # nearest multiple, halves up
        low = low // m * m
        high = -(-high // m) * m
    return CombinedEstimate(True, False, value, low, high, f"{value:,}", std)


def _mean(
    total: int,
    sum_std: float,
    count: int,
    count_std: float,
    lower: int,
    upper: int,
    rules: OutputRules,
    confidence: float,
) -> CombinedEstimate:
    available = count > 0
    if _below(count, rules):
        return _suppressed(f"< {rules.suppress_below:,} obs", available=available)
    mean, interval = ratio_estimate(total, sum_std, count, count_std, lower, upper, confidence)
    if mean is None:
        return CombinedEstimate(False, False, None, None, None, "n/a")
    assert isinstance(interval, Interval)
    se = ratio_std_error(mean, sum_std, count, count_std)
    return CombinedEstimate(True, False, mean, interval.low, interval.high, f"{mean:,.1f}", se)


def _below(value: int, rules: OutputRules) -> bool:
    return rules.suppress_below > 0 and value < rules.suppress_below


def _suppressed(display: str, available: bool) -> CombinedEstimate:
    return CombinedEstimate(available, True, None, None, None, display)


def _notes(rules: OutputRules, confidence: float, first: NodeResult) -> tuple[str, ...]:
    kinds = {a.kind for a in first.aggregates}
    notes = [
        "values are sums over the covered trusts of differentially private estimates "
        "(discrete Laplace noise at each trust); means are ratios of the summed noisy sums "
        "to the summed noisy counts",
    ]
    if rules.suppress_below > 0 and kinds & {*_COUNTS, AggregateKind.AVG}:
        n = f"{rules.suppress_below:,}"
        notes.append(
            f"counts below {n} are shown as '< {n}' and means of fewer than {n} "
            f"observations as '< {n} obs' (judged on the noisy combined values, before rounding)"
        )
    if rules.round_to > 1 and kinds & {*_COUNTS, AggregateKind.SUM}:
        m = f"{rules.round_to:,}"
        notes.append(
            f"counts and sums are rounded to the nearest {m}; their intervals are widened "
            f"outward to multiples of {m}"
        )
    if kinds & {*_COUNTS, AggregateKind.SUM}:
        notes.append("counts (and sums of values that cannot be negative) are shown from 0 up")
    notes.append(
        f"intervals: {confidence * 100:g}%, exact and conservative for counts and sums; "
        "approximate (delta method) for means"
    )
    return tuple(notes)

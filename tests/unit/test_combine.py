"""The coordinator's combine step: sums of noisy answers, intervals, output rules, validation."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Sequence

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.combine import CombineError, OutputRules, combine
from fedtre.dp import (
    DISCRETE_LAPLACE,
    count_interval,
    discrete_laplace_std,
    ratio_estimate,
    sum_halfwidth,
    sum_interval,
)
from fedtre.plan import AggregateKind
from fedtre.render import estimates
from fedtre.result import NodeResult, ReleasedAggregate, ReleasedStatistic

SEXES = ("female", "male", "unknown")
CELLS = tuple((s,) for s in SEXES)
OFF = OutputRules()


def _stat(kind: str, values: Sequence[int], scale: float = 10.0, units: int = 50_000):
    return ReleasedStatistic(
        kind=kind,
        values=tuple(values),
        sensitivity=1,
        noise_scale=scale,
        noise_std=discrete_laplace_std(scale),
        epsilon_units=units,
        mechanism=DISCRETE_LAPLACE,
    )


def _count(values, scale=10.0, alias="n", kind=AggregateKind.COUNT):
    stat_kind = "count" if kind is AggregateKind.COUNT else "count_persons"
    return ReleasedAggregate(alias, kind, None, (_stat(stat_kind, values, scale),))


def _sum(values, scale=10.0, alias="s", lower=0, upper=180):
    return ReleasedAggregate(
        alias, AggregateKind.SUM, "length_of_stay", (_stat("sum", values, scale),), lower, upper
    )


def _avg(sums, counts, sum_scale=180.0, count_scale=10.0, alias="m", lower=0, upper=180):
    return ReleasedAggregate(
        alias,
        AggregateKind.AVG,
        "length_of_stay",
        (_stat("sum", sums, sum_scale, 30_000), _stat("count", counts, count_scale, 20_000)),
        lower,
        upper,
    )


def _result(node_id: str, *aggregates: ReleasedAggregate, cells=CELLS, **changes) -> NodeResult:
    base = NodeResult(
        query_id="q-1",
        node_id=node_id,
        project_id="study",
        view="visits" if any(a.column for a in aggregates) else "patients",
        catalog_version="1.0.0",
        reference_date="2025-03-31",
        group_by=("sex",),
        cells=cells,
        aggregates=aggregates,
        epsilon_units=50_000 * len(aggregates),
        released_at="2025-01-01T00:00:00.000+00:00",
    )
    return dataclasses.replace(base, **changes)


# -- values and intervals ------------------------------------------------------------------------


def test_counts_and_sums_add_with_the_exact_interval_of_the_sum():
    results = [
        _result("a", _count([100, 200, 30], 10.0), _sum([900, 50, 7], 40.0)),
        _result("b", _count([110, 5, 1], 10.0), _sum([1000, 60, 9], 40.0)),
        _result("c", _count([120, 20, 2], 12.5), _sum([1100, 70, 11], 55.0)),
    ]
    out = combine(results, OFF)
    count, total = out.columns
    k = sum_halfwidth([10.0, 10.0, 12.5])
    assert [e.value for e in count.estimates] == [330, 225, 33]
    assert count.estimates[0].low == sum_interval(330, [10.0, 10.0, 12.5]).low == 330 - k
    assert count.estimates[0].high == 330 + k
    assert [e.value for e in total.estimates] == [3000, 180, 27]
    k_sum = sum_halfwidth([40.0, 40.0, 55.0])
    assert (total.estimates[0].low, total.estimates[0].high) == (3000 - k_sum, 3000 + k_sum)
    assert out.covered == ("a", "b", "c") and out.cells == CELLS and out.epsilon_units == 100_000
    assert [e.display for e in count.estimates] == ["330", "225", "33"]
    assert all(e.available and not e.suppressed for c in out.columns for e in c.estimates)


def test_counts_never_go_below_zero_and_their_intervals_are_clipped():
    out = combine([_result("a", _count([-40, 3, 0])), _result("b", _count([-30, 4, 0]))], OFF)
    k = sum_halfwidth([10.0, 10.0])
    low_cell, small, zero = out.columns[0].estimates
    assert (low_cell.value, low_cell.low, low_cell.high) == (0, 0, max(-70 + k, 0))
    assert (small.value, small.low, small.high) == (7, max(7 - k, 0), 7 + k)
    assert (zero.value, zero.low, zero.high) == (0, 0, k)


def test_sums_of_nonnegative_values_are_clipped_at_zero_and_others_are_not():
    nonneg = combine([_result("a", _sum([-50, 5, 5])), _result("b", _sum([-60, 5, 5]))], OFF)
    assert nonneg.columns[0].estimates[0].value == 0
    assert nonneg.columns[0].estimates[0].low == 0
    signed = [
        _result("a", _sum([-50, 5, 5], lower=-10, upper=10)),
        _result("b", _sum([-60, 5, 5], lower=-10, upper=10)),
    ]
    est = combine(signed, OFF).columns[0].estimates[0]
    assert est.value == -110 and est.low == -110 - sum_halfwidth([10.0, 10.0])


def test_means_are_ratios_of_summed_sums_and_counts():
    results = [
        _result("a", _avg([300, 1000, 0], [30, 50, 0])),
        _result("b", _avg([250, 800, 5], [20, 40, -3], sum_scale=360.0)),
    ]
    (col,) = combine(results, OFF).columns
    est = col.estimates[0]
    assert est.value == pytest.approx(550 / 50)
    sum_std = math.sqrt(discrete_laplace_std(180.0) ** 2 + discrete_laplace_std(360.0) ** 2)
    count_std = math.sqrt(2) * discrete_laplace_std(10.0)
    mean, interval = ratio_estimate(550, sum_std, 50, count_std, 0, 180)
    assert interval is not None
    assert (est.value, est.low, est.high) == (mean, interval.low, interval.high)
    assert est.display == "11.0"
    assert col.estimates[1].value == pytest.approx(1800 / 90)
    unavailable = col.estimates[2]  # noisy counts add to -3: no estimate
    assert not unavailable.available and not unavailable.suppressed
    assert (unavailable.value, unavailable.low, unavailable.display) == (None, None, "n/a")


def test_means_stay_within_the_column_bounds():
    results = [
        _result("a", _avg([5000, -50, 0], [3, 4, 1])),
        _result("b", _avg([10, 0, 0], [1, 1, 1])),
    ]
    values = [e.value for e in combine(results, OFF).columns[0].estimates]
    assert values == [180, 0, 0]


def test_one_trust_gives_what_the_node_renders():
    result = _result(
        "a",
        _count([500, 77, 40], 10.0),
        _count([140, 400, 90], 26.0, alias="p", kind=AggregateKind.COUNT_PERSONS),
        _sum([9000, 1230, 600], 180.0),
        _avg([900, 4000, 10], [90, 100, 7]),
    )
    combined = combine([result], OFF)
    for agg, column in zip(result.aggregates, combined.columns, strict=True):
        for cell, est in enumerate(column.estimates):
            node = estimates(agg, cell)
            assert node.interval is not None and node.interval.low >= 0  # nothing to clip
            assert (est.value, est.low, est.high) == (
                node.value,
                node.interval.low,
                node.interval.high,
            )
    assert count_interval(500, 10.0) == sum_interval(500, [10.0])


def test_one_trust_negative_count_is_the_rendered_one_raised_to_zero():
    result = _result("a", _count([-5, 3, 900], 10.0))
    for cell, est in enumerate(combine([result], OFF).columns[0].estimates):
        node = estimates(result.aggregates[0], cell)
        assert node.interval is not None and node.value is not None
        assert est.value == max(node.value, 0)
        assert (est.low, est.high) == (max(node.interval.low, 0), max(node.interval.high, 0))


# -- output rules --------------------------------------------------------------------------------


def test_suppression_judges_the_combined_noisy_value_not_each_trust():
    rules = OutputRules(suppress_below=10)
    out = combine([_result("a", _count([6, 4, 50])), _result("b", _count([5, 5, -45]))], rules)
    eleven, nine, five = out.columns[0].estimates
    assert not eleven.suppressed and eleven.value == 11  # each trust alone is below 10
    assert nine.suppressed and nine.display == "< 10" and nine.available
    assert (nine.value, nine.low, nine.high) == (None, None, None)
    assert five.suppressed  # 50 at one trust, but the combined noisy value is 5
    assert any("below 10" in note for note in out.notes)


def test_threshold_is_applied_before_rounding():
    rules = OutputRules(suppress_below=10, round_to=5)
    out = combine([_result("a", _count([9, 10, 12]))], rules)
    nine, ten, twelve = out.columns[0].estimates
    assert nine.suppressed  # 9 would round to 10, but is judged as 9
    assert not ten.suppressed and ten.value == 10
    assert twelve.value == 10 and twelve.display == "10"


def test_means_are_suppressed_by_their_noisy_count_and_sums_never():
    rules = OutputRules(suppress_below=10)
    results = [
        _result("a", _avg([60, 500, 50], [6, 50, -20]), _sum([1, 2, 3])),
        _result("b", _avg([30, 500, 0], [3, 50, 0]), _sum([1, 2, 3])),
    ]
    mean, total = combine(results, rules).columns
    few, many, negative = mean.estimates
    assert few.suppressed and few.available and few.display == "< 10 obs" and few.value is None
    assert not many.suppressed and many.value == pytest.approx(10.0)
    assert negative.suppressed and not negative.available and negative.display == "< 10 obs"
    assert not any(e.suppressed for e in total.estimates)


def test_rounding_goes_to_the_nearest_multiple_and_widens_the_interval_outward():
    rules = OutputRules(round_to=5)
    out = combine([_result("a", _count([1234, 1232, 1235]), _avg([10, 10, 10], [3, 3, 3]))], rules)
    k = sum_halfwidth([10.0])
    counts, mean = out.columns
    assert [e.value for e in counts.estimates] == [1235, 1230, 1235]
    first = counts.estimates[0]
    assert first.low == (1234 - k) // 5 * 5 and first.high == -(-(1234 + k) // 5) * 5
    assert first.display == "1,235"
    assert mean.estimates[0].value == pytest.approx(10 / 3)  # means are not rounded
    assert mean.estimates[0].display == "3.3"
    assert any("nearest 5" in note for note in out.notes)


@given(
    st.lists(st.integers(-500, 10**6), min_size=1, max_size=4),
    st.integers(1, 1000),
    st.sampled_from([AggregateKind.COUNT, AggregateKind.SUM]),
)
def test_rounded_intervals_contain_the_unrounded_ones(values, multiple, kind):
    make = _count if kind is AggregateKind.COUNT else _sum
    results = [_result(f"t{i}", make([v, 0, 0])) for i, v in enumerate(values)]
    plain = combine(results, OFF).columns[0].estimates[0]
    rounded = combine(results, OutputRules(round_to=multiple)).columns[0].estimates[0]
    assert plain.value is not None and plain.low is not None and plain.high is not None
    assert rounded.value is not None and rounded.low is not None and rounded.high is not None
    assert rounded.low <= plain.low and rounded.high >= plain.high
    assert rounded.low % multiple == rounded.high % multiple == rounded.value % multiple == 0
    assert abs(rounded.value - plain.value) <= multiple / 2


def test_notes_say_what_was_applied():
    rules = OutputRules(suppress_below=10, round_to=5)
    notes = combine([_result("b", _count([1, 2, 3])), _result("a", _count([1, 2, 3]))], rules)
    text = "\n".join(notes.notes)
    assert notes.covered == ("a", "b")
    assert "counts below 10 are shown as '< 10'" in text
    assert "rounded to the nearest 5" in text
    assert "intervals: 95%, exact and conservative for counts and sums" in text
    plain = "\n".join(combine([_result("a", _count([1, 2, 3]))], OFF).notes)
    assert "rounded" not in plain and "below" not in plain


@pytest.mark.parametrize(("suppress", "multiple"), [(-1, 1), (0, 0), (True, 1), (0, 2.5)])
def test_output_rules_refuse_nonsense(suppress, multiple):
    with pytest.raises(ValueError):
        OutputRules(suppress_below=suppress, round_to=multiple)


# -- answers that do not fit together ------------------------------------------------------------


def _good() -> NodeResult:
    return _result("b", _count([1, 2, 3]), _sum([4, 5, 6]))


def _swap_aggregate(r: NodeResult, index: int, **changes) -> NodeResult:
    aggs = list(r.aggregates)
    aggs[index] = dataclasses.replace(aggs[index], **changes)
    return dataclasses.replace(r, aggregates=tuple(aggs))


def _swap_statistic(r: NodeResult, **changes) -> NodeResult:
    stat = dataclasses.replace(r.aggregates[0].statistics[0], **changes)
    return _swap_aggregate(r, 0, statistics=(stat,))


@pytest.mark.parametrize(
    ("mismatch", "change"),
    [
        ("query id", lambda r: dataclasses.replace(r, query_id="q-2")),
        ("project", lambda r: dataclasses.replace(r, project_id="other")),
        ("view", lambda r: dataclasses.replace(r, view="conditions")),
        ("catalog version", lambda r: dataclasses.replace(r, catalog_version="1.0.1")),
        ("reference date", lambda r: dataclasses.replace(r, reference_date="2031-06-30")),
        ("grouping", lambda r: dataclasses.replace(r, group_by=("age_band",))),
        ("cells", lambda r: dataclasses.replace(r, cells=(("female",), ("male",), ("x",)))),
        ("epsilon", lambda r: dataclasses.replace(r, epsilon_units=1)),
        ("aggregates", lambda r: dataclasses.replace(r, aggregates=r.aggregates[:1])),
        ("alias", lambda r: _swap_aggregate(r, 0, alias="m")),
        ("kind", lambda r: _swap_aggregate(r, 0, kind=AggregateKind.COUNT_PERSONS)),
        ("column", lambda r: _swap_aggregate(r, 1, column="age")),
        ("bounds", lambda r: _swap_aggregate(r, 1, upper=110)),
        ("epsilon", lambda r: _swap_statistic(r, epsilon_units=7)),
        ("mechanism", lambda r: _swap_statistic(r, mechanism="gaussian")),
        ("noise scale", lambda r: _swap_statistic(r, noise_scale=float("nan"))),
        ("noise std", lambda r: _swap_statistic(r, noise_std=0.0)),
        ("cells", lambda r: _swap_statistic(r, values=(1, 2))),
        ("values", lambda r: _swap_statistic(r, values=(1, 2.5, 3))),
        ("trust", lambda r: dataclasses.replace(r, node_id="a")),
    ],
)
def test_answers_that_do_not_fit_together_are_refused(mismatch, change):
    first = _result("a", _count([1, 2, 3]), _sum([4, 5, 6]))
    with pytest.raises(CombineError) as info:
        combine([first, change(_good())], OFF)
    assert info.value.mismatch == mismatch
    message = str(info.value)
    assert mismatch in message or mismatch == "trust"
    for leaked in ("q-2", "other", "1.0.1", "gaussian", "age_band", "x", "2.5", "7"):
        assert leaked not in message


def test_statistics_must_match_the_aggregate_kind():
    bad = _result(
        "a", ReleasedAggregate("n", AggregateKind.COUNT, None, (_stat("sum", [1, 2, 3]),))
    )
    with pytest.raises(CombineError) as info:
        combine([bad], OFF)
    assert info.value.mismatch == "statistics"


def test_nothing_to_combine_is_refused():
    with pytest.raises(CombineError):
        combine([], OFF)


def test_combine_error_is_an_internal_error():
    from fedtre.errors import InternalError

    assert issubclass(CombineError, InternalError)


def test_the_coordinator_combine_step_does_not_import_node():
    code = (
        "import sys, coordinator.combine; "
        "bad = [m for m in sys.modules if m == 'node' or m.startswith('node.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- exact in, exact out ---------------------------------------------------------------------------

TRUST_VISITS = {
    "a": [  # (person_id, sex, length_of_stay): several rows per person
        (1, "female", 3),
        (1, "female", 10),
        (2, "male", 0),
        (3, "unknown", 7),
        (3, "unknown", 2),
        (4, "female", 40),
    ],
    "b": [(11, "female", 5), (12, "male", 1), (12, "male", 30), (13, "male", 4)],  # no "unknown"
    "c": [(21, "male", 100), (22, "female", 0), (22, "female", 0), (23, "unknown", 12)],
}
EXACT_SQL = """
    SELECT d.sex, COUNT(v.person_id), COUNT(DISTINCT v.person_id),
           COALESCE(SUM(v.length_of_stay), 0)
    FROM (SELECT UNNEST(?) AS sex, generate_subscripts(?, 1) AS pos) d
    LEFT JOIN visits v ON v.sex = d.sex
    GROUP BY d.sex, d.pos ORDER BY d.pos
"""


def _exact(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int, int, int]]:
    return con.execute(EXACT_SQL, [list(SEXES), list(SEXES)]).fetchall()


def _table(rows: list[tuple[int, str, int]]) -> pa.Table:
    ids, sexes, stays = zip(*rows, strict=True)
    return pa.table({"person_id": list(ids), "sex": list(sexes), "length_of_stay": list(stays)})


def _exact_node_result(node_id: str, visits: pa.Table) -> NodeResult:
    con = duckdb.connect()
    con.register("visits", visits)
    rows = _exact(con)
    con.close()
    rows_n = [r[1] for r in rows]
    persons = [r[2] for r in rows]
    sums = [r[3] for r in rows]
    return _result(
        node_id,
        _count(rows_n, 3.0),
        _count(persons, 7.0, alias="p", kind=AggregateKind.COUNT_PERSONS),
        _sum(sums, 90.0),
        _avg(sums, rows_n, 45.0, 5.0),
    )


def test_exact_answers_combine_to_the_pooled_exact_answer():
    """With zero noise in the values (any nominal scale), combining the trusts' exact answers
    gives the exact answer over the union of their tables (persons are disjoint across trusts)."""
    tables = {node: _table(rows) for node, rows in TRUST_VISITS.items()}
    results = [_exact_node_result(node, table) for node, table in tables.items()]
    assert results[1].aggregates[0].statistics[0].values[2] == 0  # empty at trust b

    pooled = duckdb.connect()
    pooled.register("visits", pa.concat_tables(tables.values()))
    truth = _exact(pooled)
    means = pooled.execute(
        "SELECT d.sex, AVG(v.length_of_stay) FROM (SELECT UNNEST(?) AS sex) d "
        "LEFT JOIN visits v USING (sex) GROUP BY d.sex",
        [list(SEXES)],
    ).fetchall()
    pooled.close()
    mean_truth = dict(means)

    out = combine(results, OFF)
    rows_n, persons, total, mean = out.columns
    assert out.cells == CELLS
    for j, (sex, n, p, s) in enumerate(truth):
        assert out.cells[j] == (sex,)
        assert rows_n.estimates[j].value == n
        assert persons.estimates[j].value == p
        assert total.estimates[j].value == s
        assert mean.estimates[j].value == pytest.approx(mean_truth[sex], abs=1e-9, rel=1e-9)
    assert [t[1] for t in truth] == [6, 5, 3]  # the tables are what they say

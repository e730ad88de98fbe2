"""Coverage of the reported 95% intervals, through the full node engine.

2,000 releases of one query, each with a fresh query id (so fresh noise and a real debit), are
compared with the exact answer the node computes before noising. ``count_interval`` is exact
for the discrete Laplace (smallest k with P(|X| <= k) >= 0.95), so the true coverage p* is a
little above 95%; the 2,000-release proportion has sd ≈ 0.49%, and 93.5-96.5% is about ±3 sd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtre.catalog import Tier
from fedtre.dp import count_interval, discrete_laplace_halfwidth, discrete_laplace_tail
from fedtre.parse import parse_query
from node.compiler import compile_plan, run_exact
from node.database import open_research_db
from node.engine import NodeEngine
from node.ledger import NODE_SCOPE, project_scope
from tests.conftest import FIXTURE_PERSONS, request

RELEASES = 2_000
EPSILON = 0.05
UNITS = 50_000


def _exact(node_db, catalog, sql: str) -> list[list[int]]:
    con = open_research_db(node_db, catalog)
    try:
        return run_exact(
            con, compile_plan(parse_query(sql, catalog), catalog, Tier.HIGHLY_SENSITIVE)
        )
    finally:
        con.close()


def _release_many(node_config_factory, sql: str, prefix: str):
    eng = NodeEngine(node_config_factory(total_epsilon=1000.0, max_epsilon_per_query=EPSILON))
    try:
        results = [
            eng.answer(request(sql, EPSILON, query_id=f"{prefix}-{i}")) for i in range(RELEASES)
        ]
        # every release was a real, separately debited query
        assert eng.ledger.spent(project_scope("study")) == RELEASES * UNITS
        assert eng.ledger.spent(NODE_SCOPE) == RELEASES * UNITS
        assert len(eng.ledger.releases()) == RELEASES
    finally:
        eng.close()
    return results


def _expected_coverage(scale: float) -> float:
    return 1 - discrete_laplace_tail(scale, discrete_laplace_halfwidth(scale))


def test_count_star_interval_coverage(node_config_factory, node_db, catalog):
    sql = "SELECT COUNT(*) AS n FROM patients"
    ((truth,),) = _exact(node_db, catalog, sql)
    assert truth == FIXTURE_PERSONS  # one row per person: plain COUNT(*) is the truth

    results = _release_many(node_config_factory, sql, "cov-count")
    (stat,) = results[0].aggregates[0].statistics
    assert stat.sensitivity == 1
    assert stat.noise_scale >= 20
    covered = 0
    errors = []
    for r in results:
        (s,) = r.aggregates[0].statistics
        assert s.noise_scale == stat.noise_scale
        (value,) = s.values
        interval = count_interval(value, s.noise_scale)
        covered += interval.low <= truth <= interval.high
        errors.append(value - truth)
    rate = covered / RELEASES
    assert 0.935 <= rate <= 0.965, f"coverage {rate:.2%} (p* = {_expected_coverage(20):.2%})"

    err = np.asarray(errors, dtype=np.float64)
    assert abs(err.mean()) < 5 * stat.noise_std / math.sqrt(RELEASES)
    assert abs(err.std(ddof=1) / stat.noise_std - 1) < 0.10  # rel. sd of the sd ≈ 2.5% here
    assert len(set(errors)) > 100  # fresh noise every time


def test_grouped_distinct_persons_interval_coverage(node_config_factory, node_db, catalog):
    sql = (
        "SELECT condition_group, COUNT(DISTINCT person_id) AS persons FROM conditions "
        "GROUP BY condition_group"
    )
    (truth,) = _exact(node_db, catalog, sql)
    results = _release_many(node_config_factory, sql, "cov-persons")
    cells = [c[0] for c in results[0].cells]
    assert len(cells) == len(truth) == 13
    (stat,) = results[0].aggregates[0].statistics
    assert stat.kind == "count_persons"
    assert stat.sensitivity == 13  # min(cap 25, 13 cells)
    assert stat.noise_scale >= 20
    depression = cells.index("depression")
    assert truth[depression] > 0

    hits = np.zeros(len(cells), dtype=int)
    for r in results:
        (s,) = r.aggregates[0].statistics
        for j, (value, exact) in enumerate(zip(s.values, truth, strict=True)):
            interval = count_interval(value, s.noise_scale)
            hits[j] += interval.low <= exact <= interval.high
    rate = hits[depression] / RELEASES
    assert 0.935 <= rate <= 0.965, f"depression cell coverage {rate:.2%}"
    # pooled over the 13 cells (independent noise per cell): 26,000 trials, sd ≈ 0.14%
    p_star = _expected_coverage(stat.noise_scale)
    pooled = hits.sum() / (RELEASES * len(cells))
    se = math.sqrt(p_star * (1 - p_star) / (RELEASES * len(cells)))
    assert abs(pooled - p_star) < 4.5 * se, f"pooled coverage {pooled:.3%}, p* {p_star:.3%}"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT visit_type, AVG(length_of_stay) AS los FROM visits GROUP BY visit_type",
        "SELECT COUNT(*) AS n, SUM(age) AS s, COUNT(DISTINCT person_id) AS p FROM patients",
    ],
)
def test_shares_add_up_and_scales_follow_them(engine, sql):
    result = engine.answer(request(sql, 0.1, query_id="shares"))
    statistics = [s for a in result.aggregates for s in a.statistics]
    assert sum(s.epsilon_units for s in statistics) == result.epsilon_units == 100_000
    for s in statistics:
        nominal = s.sensitivity / (s.epsilon_units / 1_000_000)
        assert nominal <= s.noise_scale <= nominal * (1 + 1e-12)

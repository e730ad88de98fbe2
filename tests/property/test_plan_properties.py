"""Properties of valid queries: values travel as parameters, plans are stable, answers are right."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedtre.catalog import Tier, load_catalog
from fedtre.parse import parse_query, query_tier
from node.compiler import compile_plan, run_exact
from tests.property.strategies import Query, valid_queries

CATALOG = load_catalog()  # strategies are built at import time, before fixtures exist
FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES_OK)
@given(query=valid_queries(CATALOG))
def test_values_travel_only_as_parameters(query: Query, catalog):
    plan = parse_query(query.sql, catalog)
    assert plan.view == query.view
    compiled = compile_plan(plan, catalog, Tier.HIGHLY_SENSITIVE)
    assert "'" not in compiled.sql
    for value in query.values:
        if isinstance(value, str):
            assert value not in compiled.sql
    assert [(type(v), v) for v in compiled.params] == [(type(v), v) for v in query.values]
    assert compiled.sql.count("?") == len(compiled.params)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES_OK)
@given(query=valid_queries(CATALOG))
def test_plans_are_canonical_and_stable(query: Query, catalog):
    first, second = parse_query(query.sql, catalog), parse_query(query.sql, catalog)
    assert first == second
    assert first.fingerprint() == second.fingerprint()
    text = json.dumps(first.canonical(), sort_keys=True)
    assert json.loads(text) == first.canonical()


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(query=valid_queries(CATALOG), tier=st.sampled_from(Tier))
def test_exact_answers_equal_the_reference(
    query: Query, tier: Tier, catalog, research_con, reference
):
    plan = parse_query(query.sql, catalog)
    assume(query_tier(plan, catalog) <= tier)
    got = run_exact(research_con, compile_plan(plan, catalog, tier))
    assert got == reference.evaluate(plan, tier=tier), query.sql

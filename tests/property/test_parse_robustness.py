"""``parse_query`` on any text returns a plan or refuses with a short message, nothing else."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedtre.catalog import Catalog
from fedtre.errors import QueryRefused
from fedtre.parse import parse_query
from fedtre.plan import QueryPlan
from tests.property.strategies import sqlish

MAX_MESSAGE = 400
LONG_NAME = "x" * 500

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def _quiet_sqlglot():
    # sqlglot logs a warning for every statement it falls back to parsing as a Command.
    logger = logging.getLogger("sqlglot")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _plan_or_short_refusal(sql: str, catalog: Catalog) -> None:
    try:
        plan = parse_query(sql, catalog)
    except QueryRefused as exc:
        assert exc.message and len(exc.message) <= MAX_MESSAGE, (len(exc.message), sql[:200])
        assert str(exc) == exc.message
    else:
        assert isinstance(plan, QueryPlan)


@SETTINGS
@given(sql=st.text(max_size=300))
def test_arbitrary_text(sql, catalog):
    _plan_or_short_refusal(sql, catalog)


@SETTINGS
@given(sql=sqlish())
@example(sql=f"SELECT COUNT(*) FROM patients WHERE {LONG_NAME} = 1")
@example(sql=f"SELECT COUNT(*) FROM {LONG_NAME}")
def test_sql_like_fragments(sql, catalog):
    _plan_or_short_refusal(sql, catalog)


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT COUNT(*) FROM {LONG_NAME}",
        f"SELECT COUNT(*) FROM patients WHERE {LONG_NAME} = 1",
        f"SELECT COUNT(*) FROM patients WHERE {LONG_NAME}.sex = 'male'",
        f'SELECT COUNT(*) FROM "{LONG_NAME}"',
    ],
    ids=["view", "column", "column_prefix", "quoted_view"],
)
def test_refusal_message_is_bounded_for_long_identifiers(sql, catalog):
    """Refusals quote the researcher's identifiers; like literals (cut at 40 characters) they
    must be shortened, so a message stays readable and bounded."""
    with pytest.raises(QueryRefused) as caught:
        parse_query(sql, catalog)
    assert len(caught.value.message) <= MAX_MESSAGE


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) FROM patients WHERE " + "(" * 3000 + "sex = 'male'" + ")" * 3000,
        "SELECT COUNT(*) FROM patients WHERE " + "NOT " * 3000 + "sex = 'male'",
        "SELECT COUNT(*) FROM patients WHERE age = " + "-" * 3000 + "1",
        "SELECT COUNT(*) FROM patients WHERE " + " OR ".join(["sex = 'male'"] * 400),
        "SELECT COUNT(*) FROM patients WHERE age IN (" + ", ".join(map(str, range(300))) + ")",
        "SELECT COUNT(*) FROM patients WHERE sex = 'male' " + "x" * 10_001,
        "SELECT COUNT(*) FROM patients WHERE sex = 'ma\x00le'",
    ],
    ids=["parens", "nots", "negations", "wide_or", "long_in", "too_long", "control_char"],
)
def test_pathological_inputs_are_refused(sql, catalog):
    with pytest.raises(QueryRefused) as caught:
        parse_query(sql, catalog)
    assert len(caught.value.message) <= MAX_MESSAGE


def test_unknown_function_is_named_in_refusal(catalog):
    """Refusals quote what the researcher wrote: the function's own name, not sqlglot's
    internal node name for functions it does not know."""
    with pytest.raises(QueryRefused) as caught:
        parse_query("SELECT my_udf(age) FROM patients", catalog)
    assert "my_udf" in caught.value.message.lower()
    assert "ANONYMOUS" not in caught.value.message

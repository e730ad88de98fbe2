"""THREATS.md "Malformed input" and the query-language refusals, through the node engine.

Each bad input must be refused with a clear, data-free message, be audited, spend no ε, and
leave the node answering the next good query.
"""

from __future__ import annotations

import math

import pytest

from fedtre.audit.log import read_audit
from fedtre.errors import UserError
from fedtre.request import QueryRequest
from node.ledger import NODE_SCOPE, project_scope
from tests.conftest import request

GOOD = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"

BAD_SQL = {
    # injection and DuckDB escapes
    "read_csv": ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "unsupported_query"),
    "read_csv_in_where": (
        "SELECT COUNT(*) FROM patients WHERE sex IN (SELECT * FROM read_csv('/etc/passwd'))",
        "unsupported_query",
    ),
    "copy": ("COPY patients TO '/tmp/out.csv'", "unsupported_query"),
    "attach": ("ATTACH '/tmp/other.duckdb' AS other", "unsupported_query"),
    "install": ("INSTALL httpfs", "unsupported_query"),
    "load": ("LOAD httpfs", "unsupported_query"),
    "set": ("SET enable_external_access = true", "unsupported_query"),
    "pragma": ("PRAGMA database_list", "unsupported_query"),
    "several_statements": (
        "SELECT COUNT(*) FROM patients; DROP TABLE patients",
        "unsupported_query",
    ),
    "line_comment": ("SELECT COUNT(*) FROM patients -- WHERE sex = 'male'", "unsupported_query"),
    "block_comment": ("SELECT COUNT(*) /* hidden */ FROM patients", "unsupported_query"),
    "drop": ("DROP TABLE patients", "unsupported_query"),
    "create": ("CREATE TABLE x AS SELECT 1", "unsupported_query"),
    "string_escape": (
        "SELECT COUNT(*) FROM patients WHERE sex = 'male'' OR ''1''=''1'",
        "invalid_value",
    ),
    # the query language
    "select_star": ("SELECT * FROM patients", "unsupported_query"),
    "raw_column": ("SELECT age FROM patients", "unsupported_query"),
    "person_id_output": (
        "SELECT person_id, COUNT(*) FROM patients GROUP BY person_id",
        "unsupported_query",
    ),
    "join": ("SELECT COUNT(*) FROM patients JOIN visits USING (person_id)", "unsupported_query"),
    "union": (
        "SELECT COUNT(*) FROM patients UNION SELECT COUNT(*) FROM visits",
        "unsupported_query",
    ),
    "function": ("SELECT COUNT(*) FROM patients WHERE lower(sex) = 'male'", "unsupported_query"),
    "max": ("SELECT MAX(age) FROM patients", "unsupported_query"),
    "order_by": (
        "SELECT sex, COUNT(*) FROM patients GROUP BY sex ORDER BY sex",
        "unsupported_query",
    ),
    "limit": ("SELECT COUNT(*) FROM patients LIMIT 1", "unsupported_query"),
    "having": (
        "SELECT sex, COUNT(*) FROM patients GROUP BY sex HAVING COUNT(*) > 5",
        "unsupported_query",
    ),
    "with": ("WITH p AS (SELECT * FROM patients) SELECT COUNT(*) FROM p", "unsupported_query"),
    "unknown_view": ("SELECT COUNT(*) FROM lab_results", "unknown_view"),
    "internal_table": ("SELECT COUNT(*) FROM _fedtre_meta", "unknown_view"),
    "schema_prefix": ("SELECT COUNT(*) FROM main.patients", "unsupported_query"),
    "unknown_column": ("SELECT COUNT(*) FROM patients WHERE postcode = 'AB1'", "unknown_column"),
    "rank_column": ("SELECT COUNT(*) FROM conditions WHERE _rank = 1", "unknown_column"),
    "tier_rank_column": (
        "SELECT COUNT(*) FROM conditions WHERE _rank_mental_health IS NULL",
        "unsupported_query",
    ),
    "high_cardinality_group": (
        "SELECT visit_type, mental_health, length_of_stay, year, COUNT(*) FROM visits "
        "GROUP BY visit_type, mental_health, length_of_stay, year",
        "too_large",
    ),
    "value_outside_domain": ("SELECT COUNT(*) FROM patients WHERE sex = 'alien'", "invalid_value"),
    "float_for_integer": ("SELECT COUNT(*) FROM patients WHERE age > 1.5", "invalid_value"),
    "count_column": ("SELECT COUNT(age) FROM patients", "unsupported_query"),
    "sum_category": ("SELECT SUM(sex) FROM patients", "unsupported_query"),
    "no_aggregate": ("SELECT sex FROM patients GROUP BY sex", "unsupported_query"),
    # malformed input
    "empty": ("", "invalid_request"),
    "whitespace": ("   \n\t ", "invalid_request"),
    "random_bytes": ("\x8f\x00\x13garbage\x7f\x01", "invalid_request"),
    "not_sql": ("please give me everyone's diagnoses", "invalid_request"),
    "control_characters": ("SELECT COUNT(*) FROM patients\x1b[2J", "invalid_request"),
    "log_injection": (
        "SELECT COUNT(*) FROM patients WHERE sex = 'x'\n"
        '{"event": "query.released", "query_id": "forged"}',
        None,
    ),
    "very_long": (
        "SELECT COUNT(*) FROM patients WHERE " + " OR ".join(["age = 1"] * 2000),
        "too_large",
    ),
    "huge_in_list": (
        "SELECT COUNT(*) FROM patients WHERE age IN ("
        + ", ".join(str(i % 100) for i in range(1000))
        + ")",
        "too_large",
    ),
    "deep_nesting": (
        "SELECT COUNT(*) FROM patients WHERE " + "(" * 300 + "age = 1" + ")" * 300,
        None,
    ),
    "many_cohorts": (
        "SELECT COUNT(*) FROM patients WHERE "
        + " OR ".join(
            f"person_id IN (SELECT person_id FROM visits WHERE year = {y})"
            for y in range(2000, 2009)
        ),
        "too_large",
    ),
    "many_released_values": (
        "SELECT condition_group, setting, year, COUNT(*) AS a, COUNT(DISTINCT person_id) AS b, "
        "AVG(year) AS c, AVG(year) AS d, AVG(year) AS e FROM conditions "
        "GROUP BY condition_group, setting, year",
        "too_large",
    ),
    "deep_cohorts": (
        "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM conditions "
        "WHERE person_id IN (SELECT person_id FROM visits WHERE person_id IN (SELECT person_id "
        "FROM patients WHERE person_id IN (SELECT person_id FROM patients))))",
        "too_large",
    ),
}


def _spent(engine):
    return engine.ledger.spent(project_scope("study")), engine.ledger.spent(NODE_SCOPE)


def _assert_refused_without_spend(engine, req: QueryRequest, refusal: str | None):
    before = _spent(engine)
    with pytest.raises(UserError) as info:
        engine.answer(req)
    if refusal is not None:
        assert info.value.refusal.value == refusal, info.value.message
    message = info.value.message
    assert message and len(message) < 400
    assert message[0].isupper() or message[0] in "'ε"
    assert "Traceback" not in message and "duckdb" not in message.lower()
    assert _spent(engine) == before
    log = read_audit(engine.config.audit_path)
    mine = [r for r in log if r.get("query_id") == str(req.query_id)[:128]]
    assert [r["event"] for r in mine][-2:] == ["query.received", "query.refused"]
    assert mine[-1]["reason"] == message
    assert not [r for r in log if r.get("query_id") == "forged"]  # no forged audit entries
    # still serving
    ok = engine.answer(request(GOOD, 0.01, query_id=f"after-{len(log)}"))
    assert len(ok.cells) == 3


@pytest.mark.parametrize("name", sorted(BAD_SQL))
def test_bad_sql_refused_nothing_spent(engine, name):
    sql, refusal = BAD_SQL[name]
    _assert_refused_without_spend(engine, request(sql, 0.1, query_id=f"bad-{name}"), refusal)


@pytest.mark.parametrize(
    ("epsilon", "refusal"),
    [
        (0.0, "invalid_epsilon"),
        (-1.0, "invalid_epsilon"),
        (math.nan, "invalid_epsilon"),
        (math.inf, "invalid_epsilon"),
        (-math.inf, "invalid_epsilon"),
        (1e300, "invalid_epsilon"),
        (1e-12, "invalid_epsilon"),
        (2.0, "out_of_scope"),  # above the project's per-query cap of 1.0
        ("0.5", "invalid_epsilon"),
        (True, "invalid_epsilon"),
        (None, "invalid_epsilon"),
    ],
)
def test_bad_epsilon_refused_nothing_spent(engine, epsilon, refusal):
    req = QueryRequest("eps-1", "study", GOOD, epsilon, "test")  # type: ignore[arg-type]
    _assert_refused_without_spend(engine, req, refusal)


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"query_id": ""}, "invalid_request"),
        ({"query_id": "a" * 500}, "invalid_request"),
        ({"query_id": "id\nwith newline"}, "invalid_request"),
        ({"query_id": None}, "invalid_request"),
        ({"project_id": ""}, "invalid_request"),
        ({"project_id": "nope"}, "unknown_project"),
        ({"project_id": "STUDY; DROP"}, "invalid_request"),
        ({"sql": None}, "invalid_request"),
    ],
)
def test_bad_fields_refused_nothing_spent(engine, fields, refusal):
    base = {"query_id": "f-1", "project_id": "study", "sql": GOOD, "epsilon": 0.1}
    base.update(fields)
    req = QueryRequest(caller="test", **base)  # type: ignore[arg-type]
    _assert_refused_without_spend(engine, req, refusal)


def test_researcher_cannot_supply_bounds_or_sensitivity(engine):
    # There is no field for them; in SQL they are refused as functions.
    sql = "SELECT SUM(LEAST(age, 1000000)) FROM patients"
    _assert_refused_without_spend(engine, request(sql, 0.1, query_id="bounds"), None)


def test_out_of_scope_view_and_tier(node_config_factory):
    from node.engine import NodeEngine

    eng = NodeEngine(node_config_factory(views=("patients",), max_tier="mental_health"))
    try:
        _assert_refused_without_spend(
            eng, request("SELECT COUNT(*) FROM visits", 0.1, query_id="v1"), "out_of_scope"
        )
        cohort = (
            "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM conditions)"
        )
        _assert_refused_without_spend(eng, request(cohort, 0.1, query_id="v2"), "out_of_scope")
    finally:
        eng.close()
    eng = NodeEngine(node_config_factory(max_tier="mental_health"))
    try:
        for i, sql in enumerate(
            [
                "SELECT COUNT(*) FROM conditions WHERE condition_group = 'self_harm'",
                "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id "
                "FROM conditions WHERE condition_group IN ('depression', 'eating_disorder'))",
                "SELECT COUNT(*) FROM conditions WHERE condition_group NOT IN ('self_harm')",
            ]
        ):
            _assert_refused_without_spend(eng, request(sql, 0.1, query_id=f"t{i}"), "out_of_scope")
        # Grouping is not refused: the groups above the approval are simply not in the domain.
        grouped = eng.answer(
            request("SELECT condition_group, COUNT(*) FROM conditions GROUP BY condition_group")
        )
        groups = [cell[0] for cell in grouped.cells]
        assert "self_harm" not in groups and "eating_disorder" not in groups
        assert len(groups) == 11
    finally:
        eng.close()
    eng = NodeEngine(node_config_factory(max_tier="general"))
    try:  # a view above the approval cannot be named at all, not even in a cohort
        for i, sql in enumerate(
            [
                "SELECT COUNT(*) FROM conditions",
                "SELECT COUNT(*) FROM patients WHERE person_id NOT IN "
                "(SELECT person_id FROM conditions)",
                "SELECT mental_health, COUNT(*) FROM visits GROUP BY mental_health",
            ]
        ):
            _assert_refused_without_spend(eng, request(sql, 0.1, query_id=f"g{i}"), "out_of_scope")
    finally:
        eng.close()


def test_refusal_messages_never_depend_on_data(node_config_factory, engine):
    """The same bad query gets the same message whatever the data and budget state."""
    sql = "SELECT COUNT(*) FROM patients WHERE sex = 'alien'"
    messages = set()
    for i in range(3):
        with pytest.raises(UserError) as info:
            engine.answer(request(sql, 0.1, query_id=f"same-{i}"))
        messages.add(info.value.message)
        engine.answer(request(GOOD, 0.1, query_id=f"spend-{i}"))
    assert len(messages) == 1

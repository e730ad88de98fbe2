"""The exact (pre-noise) answer of every query equals an independent reference implementation.

``run_exact(compile_plan(parse_query(sql)))`` against the node database must equal
``tests.spec.reference`` evaluated row by row over the same data read with plain DuckDB.
"""

from __future__ import annotations

from collections import Counter

import pytest

from fedtre.catalog import Tier
from fedtre.errors import QueryRefused
from fedtre.parse import parse_query, query_tier
from node.compiler import compile_plan, run_exact
from tests.spec.reference import Reference, visible

DEPRESSION_COHORT = "SELECT person_id FROM conditions WHERE condition_group = 'depression'"

QUERIES = {
    # every aggregate kind, no GROUP BY
    "count_rows": "SELECT COUNT(*) AS n FROM conditions",
    "count_persons": "SELECT COUNT(DISTINCT person_id) AS p FROM conditions",
    "count_persons_patients": "SELECT COUNT(DISTINCT person_id) FROM patients",
    "sum_clamped": "SELECT SUM(length_of_stay) AS s FROM visits",
    "avg": "SELECT AVG(age) AS a FROM patients",
    "sum_year": "SELECT SUM(year) FROM conditions",
    # several aggregates in one query
    "all_aggregates": (
        "SELECT COUNT(*) AS n, COUNT(DISTINCT person_id) AS p, SUM(length_of_stay) AS s, "
        "AVG(length_of_stay) AS a, AVG(year) AS y FROM visits"
    ),
    # GROUP BY 1, 2 and 3 columns; boolean and integer group columns
    "group_sex": "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
    "group_age_integer": "SELECT age, COUNT(*) AS n FROM patients GROUP BY age",
    "group_boolean": (
        "SELECT mental_health, COUNT(*) AS n, COUNT(DISTINCT person_id) AS p "
        "FROM visits GROUP BY mental_health"
    ),
    "group_year_integer": (
        "SELECT year, COUNT(*) AS n, COUNT(DISTINCT person_id) AS p FROM conditions GROUP BY year"
    ),
    "group_two": (
        "SELECT sex, age_band, COUNT(*) AS n, AVG(age) AS a FROM patients GROUP BY sex, age_band"
    ),
    "group_two_select_order_differs": (
        "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY sex, age_band"
    ),
    "group_three_with_boolean": (
        "SELECT visit_type, mental_health, year, COUNT(*) AS n, SUM(length_of_stay) AS s "
        "FROM visits GROUP BY visit_type, mental_health, year"
    ),
    "group_outside_domain": (
        "SELECT length_of_stay, COUNT(*) AS n, SUM(length_of_stay) AS s FROM visits "
        "GROUP BY length_of_stay"
    ),
    "group_three_conditions": (
        "SELECT condition_group, setting, year, COUNT(DISTINCT person_id) AS p "
        "FROM conditions GROUP BY condition_group, setting, year"
    ),
    # every comparison operator
    "op_eq": "SELECT COUNT(*) FROM patients WHERE sex = 'female'",
    "op_ne": "SELECT COUNT(*) FROM patients WHERE sex <> 'female'",
    "op_ne_bang": "SELECT ethnicity, COUNT(*) FROM patients WHERE sex != 'male' GROUP BY ethnicity",
    "op_lt": "SELECT COUNT(*) FROM patients WHERE age < 30",
    "op_le": "SELECT COUNT(*) FROM patients WHERE age <= 30",
    "op_gt": "SELECT sex, COUNT(*) FROM patients WHERE age > 64 GROUP BY sex",
    "op_ge": "SELECT COUNT(*), SUM(length_of_stay) FROM visits WHERE length_of_stay >= 3",
    "op_literal_first": "SELECT COUNT(*) FROM conditions WHERE 2015 > year",
    "op_negative_literal": "SELECT COUNT(*) FROM patients WHERE age > -1",
    "op_boolean": "SELECT visit_type, COUNT(*) FROM visits WHERE mental_health = TRUE "
    "GROUP BY visit_type",
    "op_boolean_false": "SELECT COUNT(*) FROM visits WHERE mental_health <> TRUE",
    # IN / NOT IN / BETWEEN
    "in_list": (
        "SELECT condition_group, COUNT(*) FROM conditions "
        "WHERE condition_group IN ('depression', 'anxiety', 'bipolar') GROUP BY condition_group"
    ),
    "not_in_list": (
        "SELECT setting, COUNT(*) FROM conditions WHERE setting NOT IN ('inpatient', 'unknown') "
        "GROUP BY setting"
    ),
    "in_integers": "SELECT COUNT(*) FROM visits WHERE length_of_stay IN (0, 1, 2, 3)",
    # lists longer than node.compiler.LONG_LIST are matched as one bound list
    "in_long_list": "SELECT sex, COUNT(*) FROM patients WHERE age IN ("
    + ", ".join(str(a) for a in range(0, 120, 3))
    + ") GROUP BY sex",
    "not_in_long_list_in_cohort": "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT "
    "person_id FROM conditions WHERE year NOT IN ("
    + ", ".join(str(y) for y in range(1995, 2025, 2))
    + ", 2040, 2041, 2042))",
    "between": "SELECT age_band, COUNT(*) FROM patients WHERE age BETWEEN 18 AND 24 "
    "GROUP BY age_band",
    "not_between": "SELECT COUNT(*) FROM conditions WHERE year NOT BETWEEN 2005 AND 2020",
    # OR / NOT / nested parentheses
    "or": "SELECT COUNT(*) FROM patients WHERE sex = 'male' OR age >= 80",
    "not": "SELECT COUNT(*) FROM patients WHERE NOT (sex = 'male' AND age < 40)",
    "nested_parens": (
        "SELECT sex, COUNT(*) AS n, AVG(age) AS a FROM patients "
        "WHERE ((sex = 'female' AND (age < 25 OR age > 70)) OR (NOT (ethnicity IN ('white', "
        "'asian')) AND age_band <> '85+')) GROUP BY sex"
    ),
    "precedence": "SELECT COUNT(*) FROM patients WHERE sex = 'male' OR sex = 'female' AND age > 50",
    # cohorts (semi-joins on person_id)
    "cohort": f"SELECT sex, COUNT(*) FROM patients WHERE person_id IN ({DEPRESSION_COHORT}) "
    "GROUP BY sex",
    "cohort_not_in": (
        f"SELECT age_band, COUNT(*) FROM patients WHERE person_id NOT IN ({DEPRESSION_COHORT}) "
        "GROUP BY age_band"
    ),
    "cohort_not_outside": (
        f"SELECT COUNT(*) FROM patients WHERE NOT (person_id IN ({DEPRESSION_COHORT}))"
    ),
    "cohort_no_where": (
        "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM visits)"
    ),
    "cohort_on_capped_view": (
        "SELECT mental_health, COUNT(*), COUNT(DISTINCT person_id), AVG(length_of_stay) "
        "FROM visits WHERE person_id IN (SELECT person_id FROM conditions "
        "WHERE condition_group IN ('anxiety', 'psychosis') AND year >= 2010) "
        "GROUP BY mental_health"
    ),
    "cohort_nested_two_deep": (
        "SELECT sex, COUNT(*) FROM patients WHERE person_id IN ("
        "SELECT person_id FROM visits WHERE mental_health = TRUE AND person_id IN ("
        "SELECT person_id FROM conditions WHERE condition_group = 'bipolar')) GROUP BY sex"
    ),
    "cohort_same_view": (
        "SELECT condition_group, COUNT(*) FROM conditions WHERE person_id IN ("
        "SELECT person_id FROM conditions WHERE condition_group = 'self_harm') "
        "GROUP BY condition_group"
    ),
    "cohort_or_and_mix": (
        "SELECT visit_type, COUNT(*) FROM visits WHERE (year >= 2020 AND person_id IN ("
        "SELECT person_id FROM patients WHERE sex = 'female')) OR person_id NOT IN ("
        "SELECT person_id FROM conditions WHERE condition_group <> 'other') GROUP BY visit_type"
    ),
    "two_cohorts": (
        f"SELECT COUNT(DISTINCT person_id) FROM patients WHERE person_id IN ({DEPRESSION_COHORT})"
        " AND person_id IN (SELECT person_id FROM conditions WHERE condition_group = 'anxiety')"
    ),
    # filters that match nothing: every cell is still there, zero, in domain order
    "empty_filter": "SELECT sex, age_band, COUNT(*), SUM(age) FROM patients WHERE age > 200 "
    "GROUP BY sex, age_band",
    "empty_contradiction": (
        "SELECT condition_group, COUNT(DISTINCT person_id) FROM conditions "
        "WHERE year < 2000 AND year > 2020 GROUP BY condition_group"
    ),
    "empty_between_reversed": "SELECT COUNT(*) FROM visits WHERE year BETWEEN 2020 AND 2000",
    "empty_cohort": (
        "SELECT visit_type, COUNT(*) FROM visits WHERE person_id IN "
        "(SELECT person_id FROM patients WHERE age > 500) GROUP BY visit_type"
    ),
    # case and qualification do not change the meaning
    "qualified_columns": (
        "SELECT visits.visit_type, COUNT(*) FROM visits WHERE visits.year = 2018 "
        "GROUP BY visits.visit_type"
    ),
    "upper_case": "select SEX, count(*) from PATIENTS where AGE >= 40 group by SEX",
}


@pytest.mark.parametrize("sql", QUERIES.values(), ids=QUERIES.keys())
def test_exact_answer_equals_reference(sql, catalog, run_sql, reference: Reference):
    plan = parse_query(sql, catalog)
    assert run_sql(sql) == reference.evaluate(plan)


@pytest.mark.parametrize("sql", QUERIES.values(), ids=QUERIES.keys())
def test_exact_answer_at_the_mental_health_tier_equals_reference(
    sql, catalog, run_sql, reference: Reference
):
    """The same queries for a project approved up to mental health: highly sensitive rows do
    not exist for it (queries naming them are refused before they run)."""
    plan = parse_query(sql, catalog)
    if query_tier(plan, catalog) > Tier.MENTAL_HEALTH:
        return
    assert run_sql(sql, Tier.MENTAL_HEALTH) == reference.evaluate(plan, tier=Tier.MENTAL_HEALTH)


def test_queries_are_not_trivial(catalog, reference: Reference):
    """Guard the table above: most queries must have some non-zero cell in the fixture."""
    nonzero = [
        name
        for name, sql in QUERIES.items()
        if any(v for stat in reference.evaluate(parse_query(sql, catalog)) for v in stat)
    ]
    empty = {name for name in QUERIES if name.startswith("empty_")}
    assert set(QUERIES) - set(nonzero) == empty


def test_cells_cover_the_full_domain_in_catalog_order(catalog, research_con):
    sql = "SELECT sex, age_band, COUNT(*) FROM patients WHERE age > 200 GROUP BY sex, age_band"
    compiled = compile_plan(parse_query(sql, catalog), catalog, Tier.HIGHLY_SENSITIVE)
    view = catalog.views["patients"]
    expected = [(s, a) for s in view.columns["sex"].domain for a in view.columns["age_band"].domain]
    assert list(compiled.cells) == expected
    assert run_exact(research_con, compiled) == [[0] * 27]


def test_integer_group_cells_are_the_whole_range(catalog, run_sql, reference):
    sql = "SELECT year, COUNT(*) FROM conditions GROUP BY year"
    compiled = compile_plan(parse_query(sql, catalog), catalog, Tier.HIGHLY_SENSITIVE)
    assert [c[0] for c in compiled.cells] == list(range(1990, 2031))
    counts = run_sql(sql)[0]
    assert len(counts) == 41
    # The fixture's years are a strict subset of the domain, so some cells must be zero.
    assert 0 in counts and sum(counts) > 0


def test_sum_clamps_to_the_catalog_bounds(catalog, run_sql, reference):
    los = [r["length_of_stay"] for r in reference.rows["visits"] if r["_rank_general"] <= 10]
    assert max(los) > 180, "fixture must have stays over the bound to exercise clamping"
    assert run_sql("SELECT SUM(length_of_stay) FROM visits") == [[sum(min(v, 180) for v in los)]]


def test_average_is_clamped_sum_and_row_count(run_sql):
    (s,), (n,) = run_sql("SELECT AVG(length_of_stay) FROM visits")
    assert [[s]] == run_sql("SELECT SUM(length_of_stay) FROM visits")
    assert [[n]] == run_sql("SELECT COUNT(*) FROM visits")


def test_rows_outside_the_group_domain_count_in_no_cell(run_sql, reference):
    capped = [r for r in reference.rows["visits"] if r["_rank_general"] <= 10]
    outside = [r for r in capped if r["length_of_stay"] > 180]
    assert outside, "fixture must have stays outside the group domain 0..180"
    (counts, _sums) = run_sql(
        "SELECT length_of_stay, COUNT(*), SUM(length_of_stay) FROM visits GROUP BY length_of_stay"
    )
    assert len(counts) == 181
    assert sum(counts) == len(capped) - len(outside)


# -- the row cap -------------------------------------------------------------------------------


def _rows_per_person(reference: Reference, view: str) -> Counter[int]:
    return Counter(r["person_id"] for r in reference.rows[view])


def test_conditions_cap_is_exercised(catalog, run_sql, reference):
    cap = catalog.views["conditions"].max_rows_per_person
    assert cap == 25
    per_person = _rows_per_person(reference, "conditions")
    over = {p: n for p, n in per_person.items() if n > cap}
    assert over, "the fixture must have persons over the conditions cap"
    uncapped = sum(per_person.values())
    capped = sum(min(n, cap) for n in per_person.values())
    assert capped < uncapped
    assert run_sql("SELECT COUNT(*) FROM conditions") == [[capped]]
    sql = "SELECT condition_group, COUNT(*) FROM conditions GROUP BY condition_group"
    plan = parse_query(sql, catalog)
    assert reference.evaluate(plan) != reference.evaluate(plan, capped=False)
    assert run_sql(sql) == reference.evaluate(plan)


def test_rows_beyond_the_cap_at_every_level_are_not_stored(reference, catalog):
    """A person's rows beyond the cap exist for no query: not counted, not in cohorts, and not
    stored, so one person's records cannot stretch the work (and time) of a query."""
    for name, view in catalog.views.items():
        cap = view.max_rows_per_person
        per_person = Counter(r["person_id"] for r in reference.rows[name])
        assert max(per_person.values()) <= cap * len(view.row_levels)
        for row in reference.rows[name]:
            ranks = [row[f"_rank_{level.value}"] for level in view.row_levels]
            assert any(r is not None and r <= cap for r in ranks)


def test_cohort_reads_the_capped_rows(run_sql, reference, catalog):
    """A cohort on a view reads the rows a query of that view reads: each person's first
    ``cap`` visible rows."""
    cap = catalog.views["conditions"].max_rows_per_person
    capped: dict[tuple[str, int], set[int]] = {}
    stored: dict[tuple[str, int], set[int]] = {}
    for r in reference.rows["conditions"]:
        key = (r["condition_group"], r["year"])
        stored.setdefault(key, set()).add(r["person_id"])
        if r["_rank_highly_sensitive"] <= cap:
            capped.setdefault(key, set()).add(r["person_id"])
    differing = sorted(k for k in stored if stored[k] != capped.get(k, set()))
    assert differing, "fixture has no person whose only stored rows of a kind lie beyond the cap"
    for group, year in differing[:5]:
        sql = (
            "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM conditions "
            f"WHERE condition_group = '{group}' AND year = {year})"
        )
        assert run_sql(sql) == [[len(capped.get((group, year), set()))]], sql


@pytest.mark.parametrize("view", ["patients", "conditions", "visits"])
def test_rank_is_a_permutation_per_person_at_every_row_level(view, reference, catalog):
    """At each row level, each person's visible rows are numbered 1..n; rows above the level
    have no rank there."""
    for level in catalog.views[view].row_levels:
        ranks: dict[int, list[int]] = {}
        for row in reference.rows[view]:
            rank = row[f"_rank_{level.value}"]
            assert (rank is None) == (not visible(row, catalog.views[view], level))
            if rank is not None:
                ranks.setdefault(row["person_id"], []).append(rank)
        assert ranks
        for person, values in ranks.items():
            assert sorted(values) == list(range(1, len(values) + 1)), person


def test_patients_has_one_row_per_person(reference):
    persons = [r["person_id"] for r in reference.rows["patients"]]
    assert len(persons) == len(set(persons)) == 3000


# -- SQL the parser accepts must mean what it says ---------------------------------------------


def test_between_symmetric_means_either_order(catalog, run_sql):
    """DuckDB's ``BETWEEN SYMMETRIC 50 AND 10`` is ``BETWEEN 10 AND 50``; fedtre must either
    refuse it or honour it, not silently read it as the (empty) ``BETWEEN 50 AND 10``."""
    sql = "SELECT COUNT(*) FROM patients WHERE age BETWEEN SYMMETRIC 50 AND 10"
    try:
        got = run_sql(sql)
    except QueryRefused:
        return
    assert got == run_sql("SELECT COUNT(*) FROM patients WHERE age BETWEEN 10 AND 50")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) FROM patients TABLESAMPLE 10%",
        "SELECT COUNT(*) FROM patients USING SAMPLE 10 PERCENT (bernoulli)",
        "SELECT COUNT(*) FROM patients WHERE person_id IN "
        "(SELECT person_id FROM conditions TABLESAMPLE 1 ROWS)",
        "SELECT COUNT(*) FROM patients PIVOT (COUNT(*) FOR sex IN ('male'))",
        "SELECT COUNT(*) FROM patients AT (VERSION => 1)",
    ],
    ids=["tablesample", "using_sample", "tablesample_in_cohort", "pivot", "at_version"],
)
def test_clauses_on_the_view_are_refused_not_ignored(sql, catalog):
    """A clause the plan cannot represent must be refused: the compiled query would silently
    drop it and answer a different question from the one asked."""
    with pytest.raises(QueryRefused):
        parse_query(sql, catalog)


def test_the_tier_filter_is_exercised(run_sql, reference):
    """The fixture holds highly sensitive diagnoses, so a mental-health project sees fewer
    condition rows, and its condition groups leave out the highly sensitive ones."""
    assert any(r["condition_group"] == "self_harm" for r in reference.rows["conditions"])
    (everything,) = run_sql("SELECT COUNT(*) FROM conditions")[0]
    (visible_mh,) = run_sql("SELECT COUNT(*) FROM conditions", Tier.MENTAL_HEALTH)[0]
    assert visible_mh < everything
    grouped = "SELECT condition_group, COUNT(*) FROM conditions GROUP BY condition_group"
    assert len(run_sql(grouped)[0]) == 13
    assert len(run_sql(grouped, Tier.MENTAL_HEALTH)[0]) == 11

"""A tiny hand-made OMOP extract, loaded with the real loader, with answers worked out by hand.

Eight persons; this test's catalog sets the federation's reference date to 2024-12-31, so ages
are simply 2024 - year of birth. Person 6 has 30 condition rows, all in 2010, over the cap of 25.

    person  sex      born  age  band   ethnicity    conditions (group, year, linked visit)
    1       female   1990  34   25-34  white        depression 2020 (v101), anxiety 2021
    2       male     1960  64   55-64  asian        depression 2019 (v201), diabetes 2018 (v202)
    3       female   2010  14   0-17   white        bipolar 2022
    4       male     1940  84   75-84  black        depression 2015 x2, hypertension 2015 (v401)
    5       unknown  1930  94   85+    mixed_other  -           (race 0, Hispanic ethnicity)
    6       female   1985  39   35-44  white        10 x depression, 20 x asthma, all 2010
    7       male     2000  24   18-24  unknown      unmapped concept 2023 -> other
    8       female   1970  54   45-54  mixed_other  psychosis 2024 (v801), self-harm 2024

    visit  person  type        start       end         stay  mental_health
    101    1       inpatient   2020-01-10  2020-01-15  5     true  (depression)
    102    1       outpatient  2022-06-01  2022-06-01  0     false
    201    2       outpatient  2019-05-05  2019-05-05  0     true  (depression)
    202    2       inpatient   2018-02-01  2018-08-30  210   false (diabetes); clamped to 180
    401    4       emergency   2015-04-04  2015-04-05  1     false (hypertension)
    501    5       community   2023-01-01  2023-01-01  0     false
    801    8       emergency   2024-02-01  2024-02-03  2     true  (psychosis)
    802    8       other       2024-03-01  2024-03-01  0     false
"""

from __future__ import annotations

import csv
import datetime as dt
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from fedtre.catalog import Catalog, Tier, parse_catalog
from fedtre.parse import parse_query
from node.compiler import compile_plan, run_exact
from node.database import open_research_db
from node.loader import load_omop
from tests.spec.reference import Reference

FEMALE, MALE = 8532, 8507
WHITE, ASIAN, BLACK, OTHER_RACE, HISPANIC = 8527, 8515, 8516, 8557, 38003563
DEPRESSION, DEPRESSION_RECURRENT, ANXIETY, BIPOLAR = 440383, 432285, 442077, 436665
PSYCHOSIS, SELF_HARM, DIABETES, HYPERTENSION, ASTHMA = 436073, 4303690, 201826, 320128, 317009
UNMAPPED = 99999999
INPATIENT, OUTPATIENT, EMERGENCY, COMMUNITY = 9201, 9202, 9203, 581476

PERSONS = [
    # person_id, gender, year, month, day, race, ethnicity
    (1, FEMALE, 1990, 6, 15, WHITE, 0),
    (2, MALE, 1960, 1, 1, ASIAN, 0),
    (3, FEMALE, 2010, 12, 31, WHITE, 0),
    (4, MALE, 1940, 3, 3, BLACK, 0),
    (5, 0, 1930, 5, 5, 0, HISPANIC),
    (6, FEMALE, 1985, 7, 7, WHITE, 0),
    (7, MALE, 2000, 1, 1, 0, 0),
    (8, FEMALE, 1970, 2, 2, OTHER_RACE, 0),
]

VISITS = [
    # visit_occurrence_id, person_id, visit_concept_id, start, end
    (101, 1, INPATIENT, "2020-01-10", "2020-01-15"),
    (102, 1, OUTPATIENT, "2022-06-01", "2022-06-01"),
    (201, 2, OUTPATIENT, "2019-05-05", "2019-05-05"),
    (202, 2, INPATIENT, "2018-02-01", "2018-08-30"),
    (401, 4, EMERGENCY, "2015-04-04", "2015-04-05"),
    (501, 5, COMMUNITY, "2023-01-01", "2023-01-01"),
    (801, 8, EMERGENCY, "2024-02-01", "2024-02-03"),
    (802, 8, 0, "2024-03-01", "2024-03-01"),
]


def _conditions() -> list[tuple[int, int, int, str, int | None]]:
    rows: list[tuple[int, int, str, int | None]] = [
        # person_id, condition_concept_id, start, visit_occurrence_id
        (1, DEPRESSION, "2020-01-10", 101),
        (1, ANXIETY, "2021-03-01", None),
        (2, DEPRESSION_RECURRENT, "2019-05-05", 201),
        (2, DIABETES, "2018-02-01", 202),
        (3, BIPOLAR, "2022-09-09", None),
        (4, DEPRESSION, "2015-04-04", None),
        (4, DEPRESSION, "2015-06-01", None),
        (4, HYPERTENSION, "2015-04-04", 401),
        (7, UNMAPPED, "2023-05-05", None),
        (8, PSYCHOSIS, "2024-02-01", 801),
        (8, SELF_HARM, "2024-05-01", None),
    ]
    for i in range(30):
        concept = DEPRESSION if i < 10 else ASTHMA
        rows.append((6, concept, f"2010-{1 + i % 12:02d}-{1 + i:02d}", None))
    return [(1000 + i, *row) for i, row in enumerate(rows)]


def _write(path: Path, header: list[str], rows: list[tuple[object, ...]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


@pytest.fixture(scope="module")
def tiny_catalog() -> Catalog:
    """The shipped catalog with the reference date this test's ages were worked out at."""
    data = tomllib.loads(resources.files("fedtre").joinpath("data/catalog.toml").read_text())
    data["reference_date"] = dt.date(2024, 12, 31)
    return parse_catalog(data)


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory: pytest.TempPathFactory, tiny_catalog: Catalog) -> Path:
    catalog = tiny_catalog
    src = tmp_path_factory.mktemp("tiny-omop")
    _write(
        src / "person.csv",
        [
            "person_id",
            "gender_concept_id",
            "year_of_birth",
            "month_of_birth",
            "day_of_birth",
            "race_concept_id",
            "ethnicity_concept_id",
        ],
        PERSONS,
    )
    _write(
        src / "condition_occurrence.csv",
        [
            "condition_occurrence_id",
            "person_id",
            "condition_concept_id",
            "condition_start_date",
            "visit_occurrence_id",
        ],
        _conditions(),
    )
    _write(
        src / "visit_occurrence.csv",
        [
            "visit_occurrence_id",
            "person_id",
            "visit_concept_id",
            "visit_start_date",
            "visit_end_date",
        ],
        VISITS,
    )
    _write(
        src / "observation_period.csv",
        ["person_id", "observation_period_start_date", "observation_period_end_date"],
        [(p[0], "2000-01-01", "2024-12-31") for p in PERSONS],
    )
    out = tmp_path_factory.mktemp("tiny-node") / "node.duckdb"
    report = load_omop(src, out, catalog)
    assert report.persons == 8
    assert report.conditions == 41
    assert report.visits == 8
    assert report.reference_date.isoformat() == "2024-12-31"
    assert report.persons_over_cap == {"conditions": 1, "visits": 0}
    return out


@pytest.fixture(scope="module")
def tiny_run(tiny_db: Path, tiny_catalog: Catalog):
    con = open_research_db(tiny_db, tiny_catalog)

    def run(sql: str) -> list[list[int]]:
        plan = parse_query(sql, tiny_catalog)
        return run_exact(con, compile_plan(plan, tiny_catalog, Tier.HIGHLY_SENSITIVE))

    yield run
    con.close()


@pytest.fixture(scope="module")
def tiny_reference(tiny_db: Path, tiny_catalog: Catalog) -> Reference:
    return Reference.from_db(tiny_db, tiny_catalog)


HAND_COMPUTED = {
    "depression_persons_by_sex": (
        "SELECT sex, COUNT(DISTINCT person_id) AS n FROM patients WHERE person_id IN "
        "(SELECT person_id FROM conditions WHERE condition_group = 'depression') GROUP BY sex",
        [[2, 2, 0]],  # female: 1, 6; male: 2, 4; unknown: none
    ),
    "persons_per_condition_group": (
        "SELECT condition_group, COUNT(DISTINCT person_id) FROM conditions "
        "GROUP BY condition_group",
        # depression anxiety psychosis bipolar self_harm eating adhd dementia diabetes
        # hypertension asthma copd other
        [[4, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1]],
    ),
    "condition_rows_capped": (
        "SELECT COUNT(*) FROM conditions",
        [[36]],  # 2 + 2 + 1 + 3 + min(30, 25) + 1 + 2; uncapped it would be 41
    ),
    "capped_person_year": (
        "SELECT COUNT(*), COUNT(DISTINCT person_id) FROM conditions WHERE year = 2010",
        [[25], [1]],
    ),
    "capped_person_via_cohort": (
        "SELECT COUNT(*) FROM conditions WHERE person_id IN "
        "(SELECT person_id FROM conditions WHERE condition_group = 'asthma')",
        [[25]],
    ),
    "setting_outside_asthma_cohort": (
        "SELECT setting, COUNT(*) FROM conditions WHERE person_id NOT IN "
        "(SELECT person_id FROM conditions WHERE condition_group = 'asthma') GROUP BY setting",
        [[2, 1, 2, 0, 6]],  # inpatient outpatient emergency community unknown
    ),
    "visits_by_type_and_mental_health": (
        "SELECT visit_type, mental_health, COUNT(*) FROM visits GROUP BY visit_type, mental_health",
        [[1, 1, 1, 1, 1, 1, 1, 0, 1, 0]],
    ),
    "length_of_stay_clamped": (
        "SELECT SUM(length_of_stay) AS s, AVG(length_of_stay) AS a FROM visits",
        [[188], [188], [8]],  # 5 + 0 + 0 + min(210, 180) + 1 + 0 + 2 + 0
    ),
    "age_bands": (
        "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band",
        [[1, 1, 1, 1, 1, 1, 0, 1, 1]],
    ),
    "ethnicity": (
        "SELECT ethnicity, COUNT(*), SUM(age) FROM patients GROUP BY ethnicity",
        # white asian black mixed_other unknown
        [[3, 1, 1, 2, 1], [34 + 14 + 39, 64, 84, 94 + 54, 24]],
    ),
    "total_age": ("SELECT SUM(age), AVG(age) FROM patients", [[407], [407], [8]]),
    "mental_health_visit_and_depression": (
        "SELECT sex, COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM visits "
        "WHERE mental_health = TRUE AND person_id IN (SELECT person_id FROM conditions "
        "WHERE condition_group = 'depression')) GROUP BY sex",
        [[1, 1, 0]],
    ),
    "no_conditions": (
        "SELECT sex, COUNT(*) FROM patients WHERE person_id NOT IN "
        "(SELECT person_id FROM conditions) GROUP BY sex",
        [[0, 0, 1]],
    ),
    "nothing_matches": (
        "SELECT mental_health, COUNT(*), SUM(length_of_stay) FROM visits WHERE year < 1990 "
        "GROUP BY mental_health",
        [[0, 0], [0, 0]],
    ),
}


@pytest.mark.parametrize(("sql", "expected"), HAND_COMPUTED.values(), ids=HAND_COMPUTED.keys())
def test_hand_computed_answers(sql, expected, tiny_run, tiny_reference, catalog):
    assert tiny_run(sql) == expected
    assert tiny_reference.evaluate(parse_query(sql, catalog)) == expected


def test_loaded_views_match_the_hand_made_rows(tiny_reference):
    patients = {r["person_id"]: r for r in tiny_reference.rows["patients"]}
    assert {
        p: (r["sex"], r["age"], r["age_band"], r["ethnicity"]) for p, r in patients.items()
    } == {
        1: ("female", 34, "25-34", "white"),
        2: ("male", 64, "55-64", "asian"),
        3: ("female", 14, "0-17", "white"),
        4: ("male", 84, "75-84", "black"),
        5: ("unknown", 94, "85+", "mixed_other"),
        6: ("female", 39, "35-44", "white"),
        7: ("male", 24, "18-24", "unknown"),
        8: ("female", 54, "45-54", "mixed_other"),
    }
    visits = sorted(
        (r["person_id"], r["visit_type"], r["mental_health"], r["length_of_stay"], r["year"])
        for r in tiny_reference.rows["visits"]
    )
    assert visits == [
        (1, "inpatient", True, 5, 2020),
        (1, "outpatient", False, 0, 2022),
        (2, "inpatient", False, 210, 2018),
        (2, "outpatient", True, 0, 2019),
        (4, "emergency", False, 1, 2015),
        (5, "community", False, 0, 2023),
        (8, "emergency", True, 2, 2024),
        (8, "other", False, 0, 2024),
    ]
    ranks = sorted(
        r["_rank_highly_sensitive"]
        for r in tiny_reference.rows["conditions"]
        if r["person_id"] == 6
    )
    assert ranks == list(range(1, 26))  # the 5 rows beyond the cap of 25 are not stored

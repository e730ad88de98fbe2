"""Unit tests for the synthetic OMOP CDM generator (fedtre.synthetic)."""

from __future__ import annotations

import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fedtre import synthetic
from fedtre.synthetic import SyntheticSummary, generate

REFERENCE = datetime.date(2025, 3, 31)
TABLES = ("person", "observation_period", "visit_occurrence", "condition_occurrence")
COLUMNS = {
    "person": [
        "person_id",
        "gender_concept_id",
        "year_of_birth",
        "month_of_birth",
        "day_of_birth",
        "race_concept_id",
        "ethnicity_concept_id",
        "person_source_value",
    ],
    "observation_period": [
        "observation_period_id",
        "person_id",
        "observation_period_start_date",
        "observation_period_end_date",
        "period_type_concept_id",
    ],
    "visit_occurrence": [
        "visit_occurrence_id",
        "person_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_end_date",
        "visit_type_concept_id",
    ],
    "condition_occurrence": [
        "condition_occurrence_id",
        "person_id",
        "condition_concept_id",
        "condition_start_date",
        "condition_type_concept_id",
        "visit_occurrence_id",
    ],
}
DATE_COLUMNS = {
    "observation_period_start_date",
    "observation_period_end_date",
    "visit_start_date",
    "visit_end_date",
    "condition_start_date",
}
TARGET_PREVALENCE = {
    "depression": 0.30,
    "anxiety": 0.25,
    "psychosis": 0.07,
    "bipolar": 0.04,
    "self_harm": 0.06,
    "eating_disorder": 0.02,
    "adhd": 0.05,
    "dementia": 0.05,
    "diabetes": 0.08,
    "hypertension": 0.14,
    "asthma": 0.10,
    "copd": 0.03,
}
LARGE = 20_000


def read_tables(directory: Path, fmt: str = "parquet") -> dict[str, pa.Table]:
    if fmt == "parquet":
        return {name: pq.read_table(directory / f"{name}.parquet") for name in TABLES}
    return {name: pacsv.read_csv(directory / f"{name}.csv") for name in TABLES}


def connect(directory: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name in TABLES:
        con.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{directory / name}.parquet')"
        )
    con.execute(
        "CREATE VIEW mapping AS SELECT * FROM read_csv("
        f"'{synthetic.CONDITION_GROUPS_CSV}', header = true)"
    )
    return con


def scalar(con: duckdb.DuckDBPyConnection, sql: str) -> object:
    row = con.execute(sql).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSummary]:
    """20,000 persons written in several chunks (so chunk boundaries are exercised too)."""
    directory = tmp_path_factory.mktemp("large")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "CHUNK_PERSONS", 7_000)
        summary = generate(directory, LARGE, seed=7, reference_date=REFERENCE)
    return directory, summary


@pytest.fixture(scope="module")
def con(large: tuple[Path, SyntheticSummary]) -> duckdb.DuckDBPyConnection:
    return connect(large[0])


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_tables(tmp_path: Path) -> None:
    generate(tmp_path / "a", 2_000, seed=3)
    generate(tmp_path / "b", 2_000, seed=3)
    a, b = read_tables(tmp_path / "a"), read_tables(tmp_path / "b")
    for name in TABLES:
        assert a[name].equals(b[name]), name
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (
            tmp_path / "b" / f"{name}.parquet"
        ).read_bytes()


def test_same_seed_gives_identical_csv(tmp_path: Path) -> None:
    generate(tmp_path / "a", 500, seed=3, fmt="csv")
    generate(tmp_path / "b", 500, seed=3, fmt="csv")
    for name in TABLES:
        first = (tmp_path / "a" / f"{name}.csv").read_bytes()
        assert first == (tmp_path / "b" / f"{name}.csv").read_bytes(), name


def test_different_seed_gives_different_tables(tmp_path: Path) -> None:
    generate(tmp_path / "a", 2_000, seed=3)
    generate(tmp_path / "b", 2_000, seed=4)
    a, b = read_tables(tmp_path / "a"), read_tables(tmp_path / "b")
    for name in TABLES:
        assert not a[name].equals(b[name]), name


def test_csv_and_parquet_hold_the_same_rows(tmp_path: Path) -> None:
    generate(tmp_path / "p", 1_000, seed=5, fmt="parquet")
    generate(tmp_path / "c", 1_000, seed=5, fmt="csv")
    parquet, csv = read_tables(tmp_path / "p"), read_tables(tmp_path / "c", "csv")
    for name in TABLES:
        assert parquet[name].to_pylist() == csv[name].cast(parquet[name].schema).to_pylist()


# --- schema ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_files_and_columns(tmp_path: Path, fmt: str) -> None:
    generate(tmp_path, 300, seed=1, fmt=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{t}.{fmt}" for t in TABLES)
    tables = read_tables(tmp_path, fmt)
    for name in TABLES:
        assert tables[name].column_names == COLUMNS[name]


def test_parquet_types() -> None:
    for name, schema in synthetic._SCHEMAS.items():
        assert schema.names == COLUMNS[name]
        for field in schema:
            expected = pa.date32() if field.name in DATE_COLUMNS else pa.int64()
            if field.name == "person_source_value":
                expected = pa.string()
            assert field.type == expected, (name, field.name)


def test_parquet_file_schema(tmp_path: Path) -> None:
    generate(tmp_path, 300, seed=1)
    for name, table in read_tables(tmp_path).items():
        assert table.schema.equals(synthetic._SCHEMAS[name]), name


def test_csv_layout(tmp_path: Path) -> None:
    generate(tmp_path, 200, seed=1, fmt="csv")
    lines = (tmp_path / "condition_occurrence.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS["condition_occurrence"])
    date = lines[1].split(",")[3]
    assert datetime.date.fromisoformat(date).isoformat() == date
    person = (tmp_path / "person.csv").read_text().splitlines()
    assert person[1].split(",")[0] == "1"
    assert person[1].split(",")[-1] == "S0000000001"


def test_creates_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er"
    summary = generate(str(target), 10)
    assert summary.out_dir == target
    assert (target / "person.parquet").exists()


def test_summary_counts_rows(tmp_path: Path) -> None:
    summary = generate(tmp_path, 1_000, seed=2)
    tables = read_tables(tmp_path)
    assert summary.persons == tables["person"].num_rows == 1_000
    assert summary.condition_rows == tables["condition_occurrence"].num_rows
    assert summary.visit_rows == tables["visit_occurrence"].num_rows
    assert tables["observation_period"].num_rows == 1_000
    assert summary.seconds >= 0


def test_single_person(tmp_path: Path) -> None:
    summary = generate(tmp_path, 1, seed=0)
    assert summary.persons == 1
    assert summary.visit_rows >= 1


def test_progress_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "CHUNK_PERSONS", 400)
    messages: list[str] = []
    generate(tmp_path, 1_000, progress=messages.append)
    assert messages[:3] == ["persons 400/1,000", "persons 800/1,000", "persons 1,000/1,000"]
    assert len(messages) == 4
    assert all(isinstance(m, str) and m for m in messages)


def test_chunk_boundaries_keep_ids_contiguous(large: tuple[Path, SyntheticSummary]) -> None:
    person = pq.read_table(large[0] / "person.parquet")
    assert person["person_id"].to_pylist() == list(range(1, LARGE + 1))


# --- integrity ---------------------------------------------------------------------------------


def test_ids_are_unique(con: duckdb.DuckDBPyConnection) -> None:
    for table, column in [
        ("person", "person_id"),
        ("observation_period", "observation_period_id"),
        ("visit_occurrence", "visit_occurrence_id"),
        ("condition_occurrence", "condition_occurrence_id"),
    ]:
        assert scalar(con, f"SELECT count(*) - count(DISTINCT {column}) FROM {table}") == 0


def test_rows_refer_to_existing_persons(con: duckdb.DuckDBPyConnection) -> None:
    for table in ("observation_period", "visit_occurrence", "condition_occurrence"):
        sql = f"SELECT count(*) FROM {table} WHERE person_id NOT IN (SELECT person_id FROM person)"
        assert scalar(con, sql) == 0, table
    assert scalar(con, "SELECT count(DISTINCT person_id) FROM observation_period") == LARGE


def test_linked_visits_belong_to_the_same_person(con: duckdb.DuckDBPyConnection) -> None:
    linked = """
        SELECT c.person_id AS c_person, v.person_id AS v_person,
               c.condition_start_date, v.visit_start_date, v.visit_occurrence_id AS vid
        FROM condition_occurrence c
        LEFT JOIN visit_occurrence v USING (visit_occurrence_id)
        WHERE c.visit_occurrence_id IS NOT NULL
    """
    assert scalar(con, f"SELECT count(*) FROM ({linked}) WHERE vid IS NULL") == 0
    assert scalar(con, f"SELECT count(*) FROM ({linked}) WHERE c_person <> v_person") == 0
    mismatched = f"SELECT count(*) FROM ({linked}) WHERE condition_start_date <> visit_start_date"
    assert scalar(con, mismatched) == 0


def test_share_of_diagnoses_without_visit(con: duckdb.DuckDBPyConnection) -> None:
    share = scalar(
        con, "SELECT avg((visit_occurrence_id IS NULL)::DOUBLE) FROM condition_occurrence"
    )
    assert isinstance(share, float)
    assert 0.25 < share < 0.35


def test_visit_dates(con: duckdb.DuckDBPyConnection) -> None:
    backwards = "SELECT count(*) FROM visit_occurrence WHERE visit_end_date < visit_start_date"
    assert scalar(con, backwards) == 0
    non_inpatient = """
        SELECT count(*) FROM visit_occurrence
        WHERE visit_concept_id <> 9201 AND visit_end_date <> visit_start_date
    """
    assert scalar(con, non_inpatient) == 0
    concepts = con.execute("SELECT DISTINCT visit_concept_id FROM visit_occurrence").fetchall()
    assert {c for (c,) in concepts} == {9201, 9202, 9203, 581476}


def test_dates_within_observation_and_life(con: duckdb.DuckDBPyConnection) -> None:
    birth = "make_date(p.year_of_birth, p.month_of_birth, p.day_of_birth)"
    assert scalar(con, f"SELECT count(*) FROM person p WHERE {birth} > DATE '{REFERENCE}'") == 0
    checks = {
        "observation_period": ("observation_period_start_date", "observation_period_end_date"),
        "visit_occurrence": ("visit_start_date", "visit_end_date"),
        "condition_occurrence": ("condition_start_date", "condition_start_date"),
    }
    for table, (start, end) in checks.items():
        sql = f"""
            SELECT count(*) FROM {table} t
            JOIN person p USING (person_id)
            JOIN observation_period o USING (person_id)
            WHERE t.{start} < {birth} OR t.{end} > DATE '{REFERENCE}'
               OR t.{start} < DATE '2000-01-01' OR t.{end} < t.{start}
               OR t.{start} < o.observation_period_start_date
               OR t.{end} > o.observation_period_end_date
        """
        assert scalar(con, sql) == 0, table


def test_ages_and_birth_dates(con: duckdb.DuckDBPyConnection) -> None:
    ages = con.execute(
        f"SELECT date_diff('year', make_date(year_of_birth, month_of_birth, day_of_birth), "
        f"DATE '{REFERENCE}') FROM person"
    ).fetchall()
    values = [a for (a,) in ages]
    assert min(values) >= 0
    assert max(values) <= 101
    share = {
        "child": sum(a < 18 for a in values) / len(values),
        "working": sum(18 <= a < 65 for a in values) / len(values),
        "older": sum(a >= 65 for a in values) / len(values),
    }
    assert 0.08 < share["child"] < 0.30
    assert share["working"] > 0.5
    assert 0.08 < share["older"] < 0.30


def test_person_columns(con: duckdb.DuckDBPyConnection) -> None:
    female = scalar(con, "SELECT avg((gender_concept_id = 8532)::DOUBLE) FROM person")
    assert isinstance(female, float)
    assert 0.50 < female < 0.54
    genders = con.execute("SELECT DISTINCT gender_concept_id FROM person").fetchall()
    assert {g for (g,) in genders} == {8532, 8507, 0}
    white = scalar(con, "SELECT avg((race_concept_id = 8527)::DOUBLE) FROM person")
    assert isinstance(white, float)
    assert 0.77 < white < 0.83
    races = con.execute("SELECT DISTINCT race_concept_id FROM person").fetchall()
    assert {r for (r,) in races} == {8527, 8515, 8516, 8522, 0}
    assert scalar(con, "SELECT max(ethnicity_concept_id) FROM person") == 0
    assert scalar(con, "SELECT min(ethnicity_concept_id) FROM person") == 0
    source = """
        SELECT count(*) FROM person
        WHERE person_source_value <> 'S' || lpad(person_id::VARCHAR, 10, '0')
    """
    assert scalar(con, source) == 0


def test_type_concepts(con: duckdb.DuckDBPyConnection) -> None:
    for table, column in [
        ("observation_period", "period_type_concept_id"),
        ("visit_occurrence", "visit_type_concept_id"),
        ("condition_occurrence", "condition_type_concept_id"),
    ]:
        assert scalar(con, f"SELECT count(*) FROM {table} WHERE {column} <> 32817") == 0


# --- realism -----------------------------------------------------------------------------------


def group_prevalence(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    rows = con.execute(
        f"""
        SELECT m."group", count(DISTINCT c.person_id) / {LARGE}
        FROM condition_occurrence c JOIN mapping m ON c.condition_concept_id = m.concept_id
        GROUP BY 1
        """
    ).fetchall()
    return {group: float(share) for group, share in rows}


def test_group_prevalences(con: duckdb.DuckDBPyConnection) -> None:
    prevalence = group_prevalence(con)
    assert set(prevalence) == set(TARGET_PREVALENCE)
    assert 0.25 < prevalence["depression"] < 0.35
    for group, target in TARGET_PREVALENCE.items():
        assert abs(prevalence[group] - target) < max(0.2 * target, 0.01), group


def test_every_mapped_concept_is_used(con: duckdb.DuckDBPyConnection) -> None:
    unused = """
        SELECT count(*) FROM mapping
        WHERE concept_id NOT IN (SELECT condition_concept_id FROM condition_occurrence)
    """
    assert scalar(con, unused) == 0


def test_first_listed_concept_is_most_common(con: duckdb.DuckDBPyConnection) -> None:
    groups = con.execute(
        """
        WITH listed AS (
            SELECT *, row_number() OVER () AS line FROM mapping
        ), counts AS (
            SELECT l."group", l.concept_id, l.line, count(*) AS n
            FROM condition_occurrence c JOIN listed l ON c.condition_concept_id = l.concept_id
            GROUP BY ALL
        )
        SELECT "group", arg_max(concept_id, n), arg_min(concept_id, line)
        FROM counts GROUP BY 1
        """
    ).fetchall()
    for group, commonest, first in groups:
        assert commonest == first, group


def test_other_conditions_are_common_and_unmapped(con: duckdb.DuckDBPyConnection) -> None:
    other = scalar(
        con,
        """
        SELECT count(*) / (SELECT count(*) FROM person) FROM condition_occurrence
        WHERE condition_concept_id NOT IN (SELECT concept_id FROM mapping)
        """,
    )
    assert isinstance(other, float)
    assert 4.0 < other < 9.0
    distinct = scalar(
        con,
        """
        SELECT count(DISTINCT condition_concept_id) FROM condition_occurrence
        WHERE condition_concept_id NOT IN (SELECT concept_id FROM mapping)
        """,
    )
    assert distinct == len(synthetic._OTHER_CONDITIONS)


def test_rows_per_person(large: tuple[Path, SyntheticSummary]) -> None:
    _, summary = large
    assert 7 < summary.condition_rows / LARGE < 13
    assert 2 < summary.visit_rows / LARGE < 5


def test_a_few_persons_have_many_rows(con: duckdb.DuckDBPyConnection) -> None:
    share = scalar(
        con,
        f"""
        SELECT count(*) / {LARGE} FROM (
            SELECT person_id FROM condition_occurrence GROUP BY 1 HAVING count(*) > 25
        )
        """,
    )
    assert isinstance(share, float)
    assert 0.002 < share < 0.03


def test_age_and_sex_patterns(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        f"""
        SELECT m."group",
               avg((p.gender_concept_id = 8532)::DOUBLE),
               avg(date_diff('year', make_date(year_of_birth, month_of_birth, day_of_birth),
                             DATE '{REFERENCE}'))
        FROM (SELECT DISTINCT c.person_id, m."group"
              FROM condition_occurrence c JOIN mapping m ON c.condition_concept_id = m.concept_id) m
        JOIN person p USING (person_id)
        GROUP BY 1
        """
    ).fetchall()
    female = {group: share for group, share, _ in rows}
    age = {group: mean_age for group, _, mean_age in rows}
    assert female["depression"] > 0.55
    assert female["eating_disorder"] > 0.75
    assert female["psychosis"] < 0.45
    assert female["adhd"] < 0.45
    assert age["dementia"] > 70
    assert age["adhd"] < 35
    assert age["self_harm"] < 40
    assert age["hypertension"] > age["asthma"]


def test_anxiety_goes_with_depression(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        """
        WITH groups AS (
            SELECT c.person_id,
                   bool_or(m."group" = 'depression') AS depression,
                   bool_or(m."group" = 'anxiety') AS anxiety
            FROM condition_occurrence c JOIN mapping m ON c.condition_concept_id = m.concept_id
            GROUP BY 1
        )
        SELECT p.person_id IN (SELECT person_id FROM groups WHERE depression),
               avg((p.person_id IN (SELECT person_id FROM groups WHERE anxiety))::DOUBLE)
        FROM person p GROUP BY 1
        """
    ).fetchall()
    anxiety = dict(rows)
    assert anxiety[True] > 1.5 * anxiety[False]


def test_visit_mix_and_length_of_stay(con: duckdb.DuckDBPyConnection) -> None:
    inpatient = scalar(con, "SELECT avg((visit_concept_id = 9201)::DOUBLE) FROM visit_occurrence")
    assert isinstance(inpatient, float)
    assert 0.05 < inpatient < 0.12
    stays = con.execute(
        """
        WITH mh AS (
            SELECT DISTINCT c.person_id FROM condition_occurrence c
            JOIN mapping m ON c.condition_concept_id = m.concept_id
            WHERE m."group" IN ('psychosis', 'bipolar', 'depression')
        )
        SELECT v.person_id IN (SELECT person_id FROM mh),
               median(visit_end_date - visit_start_date)
        FROM visit_occurrence v WHERE visit_concept_id = 9201 GROUP BY 1
        """
    ).fetchall()
    median = dict(stays)
    assert 15 <= median[True] <= 35
    assert 1 <= median[False] <= 6


def test_severe_illness_means_more_admissions(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        """
        WITH severe AS (
            SELECT DISTINCT c.person_id FROM condition_occurrence c
            JOIN mapping m ON c.condition_concept_id = m.concept_id
            WHERE m."group" IN ('psychosis', 'bipolar', 'self_harm')
        )
        SELECT person_id IN (SELECT person_id FROM severe),
               avg((visit_concept_id IN (9201, 9203))::DOUBLE)
        FROM visit_occurrence GROUP BY 1
        """
    ).fetchall()
    acute = dict(rows)
    assert acute[True] > 1.5 * acute[False]


# --- ids and arguments -------------------------------------------------------------------------


def test_person_id_offset_shifts_ids(tmp_path: Path) -> None:
    offset = 5_000_000
    generate(tmp_path / "a", 500, seed=9)
    generate(tmp_path / "b", 500, seed=9, person_id_offset=offset)
    a, b = read_tables(tmp_path / "a"), read_tables(tmp_path / "b")
    shift = {
        "person_id": offset,
        "observation_period_id": offset,
        "visit_occurrence_id": offset * synthetic.ID_STRIDE,
        "condition_occurrence_id": offset * synthetic.ID_STRIDE,
    }
    for name in TABLES:
        left, right = a[name].to_pydict(), b[name].to_pydict()
        for column, values in left.items():
            if column in shift:
                moved = [None if v is None else v + shift[column] for v in values]
                assert moved == right[column], (name, column)
            elif column != "person_source_value":
                assert values == right[column], (name, column)
    assert b["person"]["person_source_value"][0].as_py() == f"S{offset + 1:010d}"
    assert min(b["person"]["person_id"].to_pylist()) == offset + 1


def test_offsets_give_disjoint_ids(tmp_path: Path) -> None:
    generate(tmp_path / "a", 400, seed=1)
    generate(tmp_path / "b", 400, seed=2, person_id_offset=400)
    a, b = read_tables(tmp_path / "a"), read_tables(tmp_path / "b")
    for table, column in [
        ("person", "person_id"),
        ("observation_period", "observation_period_id"),
        ("visit_occurrence", "visit_occurrence_id"),
        ("condition_occurrence", "condition_occurrence_id"),
    ]:
        left = set(a[table][column].to_pylist())
        right = set(b[table][column].to_pylist())
        assert not left & right, table


def test_reference_date_moves_dates(tmp_path: Path) -> None:
    reference = datetime.date(2020, 2, 29)
    generate(tmp_path, 2_000, seed=1, reference_date=reference)
    con = connect(tmp_path)
    latest = scalar(con, "SELECT max(observation_period_end_date) FROM observation_period")
    assert latest == reference
    assert scalar(con, "SELECT max(visit_end_date) FROM visit_occurrence") <= reference  # type: ignore[operator]


@pytest.mark.parametrize("fmt", ["json", "PARQUET", "", "csv.gz"])
def test_invalid_format(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(ValueError, match="fmt"):
        generate(tmp_path, 10, fmt=fmt)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("persons", [0, -1, 2.5, True])
def test_invalid_persons(tmp_path: Path, persons: object) -> None:
    with pytest.raises(ValueError, match="persons"):
        generate(tmp_path, persons)  # type: ignore[arg-type]


def test_invalid_offset_and_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="person_id_offset"):
        generate(tmp_path, 10, person_id_offset=-1)
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path, 10, seed=-3)
    with pytest.raises(ValueError, match="reference_date"):
        generate(tmp_path, 10, reference_date=datetime.date(1999, 12, 31))

"""Named regressions of the loader's privacy defects, each as two extracts that differ in one
person, loaded with the real loader (issue 7, defects 1-3).

The general property (any person, any query) is ``tests/property/test_neighbour_stability.py``;
these tests pin the concrete attacks that were found, so each stays fixed by name.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from node.loader import load_omop
from tests.property.exact_path import exact, l1
from tests.property.omop_extracts import (
    MAPPED,
    Extract,
    Ids,
    PersonRows,
    Schema,
    build_extract,
    load_extract,
    ordinary_person,
    with_person,
    without_person,
    write_extract,
)


def rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _trust(n: int, seed: int, schema: Schema | None = None) -> tuple[Extract, Ids, random.Random]:
    rng = random.Random(seed)
    ids = Ids(10_000)
    persons = [ordinary_person(pid, rng, ids) for pid in range(1, n + 1)]
    return build_extract(persons, schema or Schema(), rng), ids, rng


# -- defect 1: the age reference date ---------------------------------------------------------


def test_a_far_future_date_moves_no_one_elses_age(tmp_path, catalog):
    base, ids, rng = _trust(60, seed=1)
    far = ordinary_person(999, rng, ids)
    far = replace(
        far,
        visits=(
            {
                "visit_occurrence_id": ids.take(),
                "person_id": 999,
                "visit_concept_id": 9201,
                "visit_start_date": "2024-01-01",
                "visit_end_date": "2031-06-30",
            },
        ),
        observation=(
            {
                "person_id": 999,
                "observation_period_start_date": "2020-01-01",
                "observation_period_end_date": "2031-06-30",
            },
        ),
    )
    d = load_extract(base, tmp_path / "d", catalog)
    d2 = load_extract(with_person(base, far, rng), tmp_path / "d2", catalog)
    sql = "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band"
    assert l1(exact(d, catalog, sql), exact(d2, catalog, sql)) <= [1]
    ages = "SELECT person_id, age, age_band FROM patients WHERE person_id <> 999 ORDER BY 1"
    assert rows(d, ages) == rows(d2, ages)


def test_every_trust_uses_the_catalogs_reference_date(tmp_path, catalog):
    first, _, _ = _trust(20, seed=2)
    second, _, _ = _trust(35, seed=3)
    dates = set()
    for name, extract in (("a", first), ("b", second)):
        source = write_extract(extract, tmp_path / name / "omop", "parquet")
        report = load_omop(source, tmp_path / name / "node.duckdb", catalog)
        dates.add(report.reference_date)
        meta = dict(rows(tmp_path / name / "node.duckdb", "SELECT key, value FROM _fedtre_meta"))
        dates.add(meta["reference_date"])
    assert dates == {catalog.reference_date, catalog.reference_date.isoformat()}


# -- defect 2: per-person row ranks ----------------------------------------------------------


def _heavy(pid: int, ids: Ids, n: int = 40) -> PersonRows:
    groups = list(MAPPED.values())
    conditions = tuple(
        {
            "condition_occurrence_id": ids.take(),
            "person_id": pid,
            "condition_concept_id": groups[i % len(groups)],
            "condition_start_date": f"20{10 + i % 10}-0{1 + i % 9}-1{i % 9}",
            "visit_occurrence_id": None,
        }
        for i in range(n)
    )
    person = (
        {
            "person_id": pid,
            "gender_concept_id": 8532,
            "year_of_birth": 1980,
            "race_concept_id": 8527,
            "person_source_value": f"p{pid}",
        },
    )
    return PersonRows(pid, person, (), conditions, ())


def test_removing_one_person_does_not_change_which_rows_others_keep(tmp_path, catalog):
    """No condition_occurrence_id in the source: ranks once came from the row's position."""
    ids = Ids(0)
    schema = Schema(condition_ids=False, visit_links=False, ancestors=False, observation=False)
    extract = Extract(schema=schema)
    # B's rows come first in the file; five heavy persons over the 25-row cap follow.
    extract = replace(
        extract, **_concat(_heavy(1, ids, n=7), *(_heavy(p, ids) for p in range(2, 7)))
    )
    d = load_extract(extract, tmp_path / "d", catalog)
    d2 = load_extract(without_person(extract, 1), tmp_path / "d2", catalog)
    sql = "SELECT condition_group, COUNT(*) FROM conditions GROUP BY condition_group"
    assert l1(exact(d, catalog, sql), exact(d2, catalog, sql)) <= [25]
    kept = "SELECT * FROM conditions WHERE person_id <> 1 ORDER BY ALL"
    assert rows(d, kept) == rows(d2, kept)


def _concat(*persons: PersonRows) -> dict[str, tuple]:
    return {
        "person": tuple(r for p in persons for r in p.person),
        "visits": tuple(r for p in persons for r in p.visits),
        "conditions": tuple(r for p in persons for r in p.conditions),
        "observation": tuple(r for p in persons for r in p.observation),
        "persons": tuple(p.person_id for p in persons),
    }


# -- defect 3: derived flags ----------------------------------------------------------------


def test_another_persons_rows_cannot_flip_a_visits_flag(tmp_path, catalog):
    ids = Ids(0)
    a_visits = tuple(
        {
            "visit_occurrence_id": 100 + i,
            "person_id": 1,
            "visit_concept_id": 9201,
            "visit_start_date": f"2020-01-{10 + i}",
            "visit_end_date": f"2020-01-{11 + i}",
        }
        for i in range(10)
    )
    a = replace(_heavy(1, ids, n=0), visits=a_visits)
    # B's diagnoses point at A's visits (a malformed source, or an attacker).
    b = replace(
        _heavy(2, ids, n=0),
        conditions=tuple(
            {
                "condition_occurrence_id": ids.take(),
                "person_id": 2,
                "condition_concept_id": MAPPED["depression"],
                "condition_start_date": "2020-01-10",
                "visit_occurrence_id": 100 + i,
            }
            for i in range(10)
        ),
    )
    extract = replace(Extract(schema=Schema()), **_concat(a, b))
    d = load_extract(extract, tmp_path / "d", catalog)
    d2 = load_extract(without_person(extract, 2), tmp_path / "d2", catalog)
    sql = "SELECT COUNT(*) FROM visits WHERE mental_health = TRUE"
    assert exact(d, catalog, sql).values == exact(d2, catalog, sql).values == ((0,),)
    report = load_omop(
        write_extract(extract, tmp_path / "r", "csv"), tmp_path / "r.duckdb", catalog
    )
    assert report.conditions_other_persons_visit == 10


# -- found by the attacker's review of the fixes ----------------------------------------------


def test_one_persons_many_rows_are_not_stored_beyond_the_caps(tmp_path, catalog):
    """A person with thousands of rows costs a query no more work than one at the caps."""
    base, ids, rng = _trust(20, seed=5)
    heavy = replace(
        _heavy(999, ids, n=5000),
        visits=tuple(
            {
                "visit_occurrence_id": ids.take(),
                "person_id": 999,
                "visit_concept_id": 9201,
                "visit_start_date": f"20{10 + i % 10}-01-01",
                "visit_end_date": f"20{10 + i % 10}-01-0{1 + i % 5}",
            }
            for i in range(2000)
        ),
    )
    db = load_extract(with_person(base, heavy, rng), tmp_path / "d", catalog)
    for view in ("conditions", "visits"):
        cap = catalog.views[view].max_rows_per_person
        levels = len(catalog.views[view].row_levels)
        ((n,),) = rows(db, f"SELECT count(*) FROM {view} WHERE person_id = 999")
        assert cap <= n <= cap * levels


ALIASES = ["02", " 2", "+2", "2.0", "2e0", "0x2", "2_0", "1.5", "2.4"]


def test_a_malformed_id_is_missing_not_another_persons_id(tmp_path, catalog):
    """ "02", "2.0", "0x2", ... once all read as person 2: their rows joined person 2's."""
    base, ids, rng = _trust(6, seed=6)
    d = load_extract(base, tmp_path / "d", catalog)
    for i, alias in enumerate(ALIASES):
        person = {
            "person_id": alias,
            "gender_concept_id": 0,
            "year_of_birth": 1900,
            "race_concept_id": 0,
            "person_source_value": "alias",
        }
        visits = tuple(
            {
                "visit_occurrence_id": ids.take(),
                "person_id": alias,
                "visit_concept_id": 9203,
                "visit_start_date": "2020-01-01",
                "visit_end_date": "2020-01-02",
            }
            for _ in range(20)
        )
        aliased = PersonRows(10_000 + i, (person,), visits, (), ())
        for fmt in ("csv", "parquet"):
            d2 = load_extract(with_person(base, aliased, rng), tmp_path / f"{i}{fmt}", catalog, fmt)
            everything = "SELECT * FROM {} ORDER BY ALL"
            for view in catalog.views:
                assert rows(d, everything.format(view)) == rows(d2, everything.format(view)), alias


def test_a_float_typed_id_column_is_not_rounded_onto_another_person(tmp_path, catalog):
    """Parquet written from pandas turns an integer column with gaps into floats: whole
    numbers are still ids, 1.5 is not person 2 (nor person 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, _, _ = _trust(6, seed=7)
    source = write_extract(base, tmp_path / "omop", "parquet")
    persons = pq.read_table(source / "person.parquet").to_pylist()
    persons.append({**persons[0], "person_id": 1.5, "gender_concept_id": 0})
    table = pa.Table.from_pylist([{**p, "person_id": float(p["person_id"])} for p in persons])
    pq.write_table(table, source / "person.parquet")
    load_omop(source, tmp_path / "n.duckdb", catalog)
    got = rows(tmp_path / "n.duckdb", "SELECT person_id, sex FROM patients ORDER BY 1")
    # 1.0, 2.0, ... are whole numbers written as floats: read as ids; 1.5 is not an id
    assert [p for p, _ in got] == sorted(int(p["person_id"]) for p in persons[:-1])
    assert 1 in [p for p, _ in got] and ("unknown" not in {s for p, s in got if p == 1})


def test_values_that_once_failed_the_load_make_one_value_missing(tmp_path, catalog):
    """Infinite dates, calendar fields far out of range, text a CSV sniffer could take for a
    dialect: the load succeeds and no other person's rows change."""
    base, ids, rng = _trust(10, seed=8)
    odd = ordinary_person(777, rng, ids)
    odd = replace(
        odd,
        person=(
            {
                **odd.person[0],
                "month_of_birth": 2147483647,
                "day_of_birth": -2147483648,
                "person_source_value": "# ;;;;;;;; |\t|",
            },
        ),
        visits=(
            {
                "visit_occurrence_id": ids.take(),
                "person_id": 777,
                "visit_concept_id": 9201,
                "visit_start_date": "infinity",
                "visit_end_date": "-infinity",
            },
            {
                "visit_occurrence_id": ids.take(),
                "person_id": 777,
                "visit_concept_id": 99999999999999999999,
                "visit_start_date": "2020-01-01",
                "visit_end_date": "infinity",
            },
        ),
    )
    d = load_extract(base, tmp_path / "d", catalog)
    d2 = load_extract(with_person(base, odd, rng), tmp_path / "d2", catalog)
    for view in catalog.views:
        others = f"SELECT * FROM {view} WHERE person_id <> 777 ORDER BY ALL"
        assert rows(d, others) == rows(d2, others)
    assert rows(d2, "SELECT count(*) FROM patients WHERE person_id = 777") == [(1,)]


def test_a_load_error_names_no_values(tmp_path, catalog):
    from node.errors import LoadError

    base, _, _ = _trust(5, seed=9)
    source = write_extract(base, tmp_path / "omop", "csv")
    text = (source / "person.csv").read_bytes()
    (source / "person.csv").write_bytes(text + b"6,8507,1959,12,18,8657,0,secret-\xff\xfe-value\n")
    with pytest.raises(LoadError) as info:
        load_omop(source, tmp_path / "n.duckdb", catalog)
    message = str(info.value)
    assert "secret" not in message and "8657" not in message and "1959" not in message
    assert "person.csv" in message and "CSV" in message


# -- found by the second review ----------------------------------------------------------------


def _with_alias_part(source: Path, table: str, rows_: list[dict]) -> None:
    """Turn ``table.parquet`` into a folder: the trust's file as part 0, text-id rows as part 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    original = source / f"{table}.parquet"
    folder = source / table
    folder.mkdir()
    original.rename(folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows_), folder / "part-1.parquet")


def test_parquet_parts_with_text_ids_are_not_cast_onto_another_person(tmp_path, catalog):
    """DuckDB once unified a folder's parts to the first part's integer type with its own
    lenient cast, so '02' in a second part became person 2 before the loader checked ids."""
    base, ids, _ = _trust(6, seed=10)
    d = load_extract(base, tmp_path / "d", catalog, "parquet")
    source = write_extract(base, tmp_path / "omop", "parquet")
    _with_alias_part(
        source,
        "visit_occurrence",
        [
            {
                "visit_occurrence_id": str(ids.take()),
                "person_id": alias,
                "visit_concept_id": "9203",
                "visit_start_date": "2020-01-01",
                "visit_end_date": "2020-01-02",
            }
            for alias in ALIASES
            for _ in range(5)
        ],
    )
    load_omop(source, tmp_path / "parts.duckdb", catalog)
    for view in catalog.views:
        everything = f"SELECT * FROM {view} ORDER BY ALL"
        assert rows(d, everything) == rows(tmp_path / "parts.duckdb", everything)


def test_an_opt_out_by_source_value_removes_only_its_own_person(tmp_path, catalog):
    base, _, _ = _trust(6, seed=11)
    source = write_extract(base, tmp_path / "omop", "csv")
    with (source / "person.csv").open("a") as f:  # a record with an id spelling person 2's
        f.write("2.0,8507,1950,1,1,8527,0,opted-out-person\r\n")  # the file is CRLF
    register = tmp_path / "register.csv"
    register.write_text("person_id,person_source_value\n3,\n,opted-out-person\n")
    report = load_omop(source, tmp_path / "n.duckdb", catalog, opt_out=register)
    kept = [p for (p,) in rows(tmp_path / "n.duckdb", "SELECT person_id FROM patients")]
    assert 2 in kept and 3 not in kept  # person 3 by id; the '2.0' record belongs to no one
    assert report.opted_out == 1


@pytest.mark.parametrize(
    ("register", "message"),
    [
        ("person_id,person_source_value\n3,\n,\n", "line 3: gives neither"),
        ("person_id\n02\n", "line 2: person_id must be a whole number"),
        ("postcode\nAB1\n", "needs a 'person_id' or 'person_source_value' column"),
    ],
)
def test_an_opt_out_register_line_that_names_no_one_is_refused(
    tmp_path, catalog, register, message
):
    from node.errors import LoadError

    base, _, _ = _trust(4, seed=12)
    source = write_extract(base, tmp_path / "omop", "csv")
    path = tmp_path / "register.csv"
    path.write_text(register)
    with pytest.raises(LoadError, match=message):
        load_omop(source, tmp_path / "n.duckdb", catalog, opt_out=path)

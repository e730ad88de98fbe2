"""Small OMOP CDM extracts as plain Python rows, neighbours of them, and files the loader reads.

The neighbouring-dataset suite needs pairs of extracts D and D' that differ in exactly one
person: every row whose ``person_id`` is that person's, in every table. Everything else (the
other persons' rows, their relative order, the public vocabulary and opt-out register) is the
same. An added person's rows go in at random places in each file, so a loader that numbers rows
by their position would be caught.

Ordinary persons look like trust data. Adversarial persons combine "tricks" an attacker (or a
broken source system) could put in one person's record: far-future and far-past dates, thousands
of rows, missing optional ids, links to other persons' visits, colliding ids, values at and
beyond the catalog bounds, NULLs, junk text in numeric and date fields, duplicate rows,
unmapped concepts, rows without a person row.

Row contents come from a seeded ``random.Random`` (Hypothesis draws the seed, the sizes and the
tricks), so large persons cost little to generate.
"""

from __future__ import annotations

import csv
import datetime as dt
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

Row = dict[str, Any]

# Concept ids from fedtre/data/condition_groups.csv (mapped), a descendant reached only through
# concept_ancestor, and ids no mapping knows.
MAPPED = {
    "depression": 440383,
    "anxiety": 442077,
    "psychosis": 436073,
    "bipolar": 436665,
    "self_harm": 4303690,
    "eating_disorder": 436675,
    "adhd": 440086,
    "dementia": 4182210,
    "diabetes": 201826,
}
DESCENDANT = 90_000_001  # a child of depression in the extract's concept_ancestor
DUAL = 90_000_002  # a child of both self-harm and depression (a poly-hierarchy): highly sensitive
UNMAPPED = (12_345_678, 0)
VISIT_CONCEPTS = (9201, 262, 9202, 9203, 581476, 5083, 38004193, 0, 44_818_517)
SEX_CONCEPTS = (8532, 8507, 0, 8551)
RACE_CONCEPTS = (8527, 8515, 8516, 8522, 8657, 8557, 0, None)
HISPANIC = 38003563

PERSON_COLUMNS = (
    "person_id",
    "gender_concept_id",
    "year_of_birth",
    "month_of_birth",
    "day_of_birth",
    "race_concept_id",
    "ethnicity_concept_id",
    "person_source_value",
)
VISIT_COLUMNS = (
    "visit_occurrence_id",
    "person_id",
    "visit_concept_id",
    "visit_start_date",
    "visit_end_date",
)
OBSERVATION_COLUMNS = ("person_id", "observation_period_start_date", "observation_period_end_date")
ANCESTOR_COLUMNS = ("ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation")

TRICKS = (
    "future_dates",
    "past_dates",
    "many_rows",
    "missing_ids",
    "foreign_visits",
    "colliding_ids",
    "bounds",
    "nulls",
    "junk",
    "duplicates",
    "unmapped",
    "no_person_row",
    "null_person_rows",
    "opted_out",
    "id_aliases",
    "infinite_dates",
    "huge_numbers",
    "csv_noise",
)


@dataclass(frozen=True)
class Schema:
    """Table-level facts shared by D and D' (a source either has a column or it does not)."""

    condition_ids: bool = True  # condition_occurrence has condition_occurrence_id
    visit_links: bool = True  # condition_occurrence has visit_occurrence_id
    ancestors: bool = True  # a concept_ancestor table is present
    observation: bool = True  # an observation_period table is present
    parts: bool = False  # Parquet tables written as folders of two parts, typed separately
    opt_out_by_source: bool = False  # the opt-out register lists person_source_value


@dataclass(frozen=True)
class PersonRows:
    """Every row of one person (``person_id`` may be None in rows that belong to nobody)."""

    person_id: int
    person: tuple[Row, ...]
    visits: tuple[Row, ...]
    conditions: tuple[Row, ...]
    observation: tuple[Row, ...]
    opted_out: bool = False  # the trust's public opt-out register lists this person


@dataclass(frozen=True)
class Extract:
    schema: Schema
    person: tuple[Row, ...] = ()
    visits: tuple[Row, ...] = ()
    conditions: tuple[Row, ...] = ()
    observation: tuple[Row, ...] = ()
    opt_out: tuple[int, ...] = ()
    opt_out_sources: tuple[str, ...] = ()  # the register by source value (Schema.opt_out_by_source)
    persons: tuple[int, ...] = field(default=())  # ids of the persons it holds

    def tables(self) -> dict[str, tuple[Row, ...]]:
        out = {
            "person": self.person,
            "visit_occurrence": self.visits,
            "condition_occurrence": self.conditions,
        }
        if self.schema.observation:
            out["observation_period"] = self.observation
        return out


def with_person(extract: Extract, rows: PersonRows, rng: random.Random) -> Extract:
    """D' = D plus one person, whose rows go in at random places in each table."""

    def insert(existing: tuple[Row, ...], new: tuple[Row, ...]) -> tuple[Row, ...]:
        out = list(existing)
        for row in new:
            out.insert(rng.randint(0, len(out)), row)
        return tuple(out)

    return replace(
        extract,
        person=insert(extract.person, rows.person),
        visits=insert(extract.visits, rows.visits),
        conditions=insert(extract.conditions, rows.conditions),
        observation=insert(extract.observation, rows.observation),
        opt_out=extract.opt_out,  # the register is public: the same for D and D'
        persons=(*extract.persons, rows.person_id),
    )


def without_person(extract: Extract, person_id: int) -> Extract:
    """D' = D minus every row of one person, the others' rows in the same order."""

    def keep(rows: tuple[Row, ...]) -> tuple[Row, ...]:
        return tuple(r for r in rows if r.get("person_id") != person_id)

    return replace(
        extract,
        person=keep(extract.person),
        visits=keep(extract.visits),
        conditions=keep(extract.conditions),
        observation=keep(extract.observation),
        persons=tuple(p for p in extract.persons if p != person_id),
    )


def shuffled(extract: Extract, rng: random.Random) -> Extract:
    """The same rows in another order in every file."""

    def mix(rows: tuple[Row, ...]) -> tuple[Row, ...]:
        out = list(rows)
        rng.shuffle(out)
        return tuple(out)

    return replace(
        extract,
        person=mix(extract.person),
        visits=mix(extract.visits),
        conditions=mix(extract.conditions),
        observation=mix(extract.observation),
    )


# -- writing files ------------------------------------------------------------------------------


def condition_columns(schema: Schema) -> tuple[str, ...]:
    cols = ["person_id", "condition_concept_id", "condition_start_date"]
    if schema.condition_ids:
        cols.insert(0, "condition_occurrence_id")
    if schema.visit_links:
        cols.append("visit_occurrence_id")
    return tuple(cols)


def write_extract(extract: Extract, directory: Path, fmt: str) -> Path:
    """Write one file per table (``csv`` or ``parquet``; with ``Schema.parts``, Parquet tables
    as folders of two parts, each typed from its own rows) and return the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = {
        "person": PERSON_COLUMNS,
        "visit_occurrence": VISIT_COLUMNS,
        "condition_occurrence": condition_columns(extract.schema),
        "observation_period": OBSERVATION_COLUMNS,
    }
    for table, rows in extract.tables().items():
        if fmt == "parquet" and extract.schema.parts:
            (directory / table).mkdir()
            half = len(rows) // 2
            for i, part in enumerate((rows[:half], rows[half:])):
                _write_table(directory / table / f"part-{i}.parquet", columns[table], part, fmt)
            continue
        _write_table(directory / f"{table}.{fmt}", columns[table], rows, fmt)
    if extract.schema.ancestors:
        links = [  # (ancestor, descendant, levels), including the vocabulary's own oddities
            (MAPPED["depression"], DESCENDANT, 1),
            (MAPPED["depression"], MAPPED["depression"], 0),
            (MAPPED["self_harm"], DUAL, 1),
            (MAPPED["depression"], DUAL, 1),
            (MAPPED["depression"], MAPPED["self_harm"], 0),  # a bad link at level 0
            (MAPPED["anxiety"], MAPPED["eating_disorder"], -1),  # and a negative level
        ]
        ancestors = [
            {
                "ancestor_concept_id": a,
                "descendant_concept_id": d,
                "min_levels_of_separation": level,
            }
            for a, d, level in links
        ]
        _write_table(directory / f"concept_ancestor.{fmt}", ANCESTOR_COLUMNS, ancestors, fmt)
    return directory


def write_opt_out(extract: Extract, path: Path) -> Path:
    """The trust's opt-out register: by ``person_id``, or by the persons' source values."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        if not extract.schema.opt_out_by_source:
            writer.writerow(["person_id"])
            writer.writerows([pid] for pid in extract.opt_out)
            return path
        writer.writerow(["person_source_value"])
        writer.writerows([v] for v in extract.opt_out_sources)
    return path


def _write_table(path: Path, columns: Iterable[str], rows: Iterable[Row], fmt: str) -> None:
    columns = list(columns)
    rows = list(rows)
    if fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
        return
    arrays = {c: _arrow_array([row.get(c) for row in rows]) for c in columns}
    pq.write_table(pa.table(arrays), path)


def _arrow_array(values: list[Any]) -> pa.Array:
    present = [v for v in values if v is not None]
    if present and all(
        isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 for v in present
    ):
        return pa.array(values, type=pa.int64())
    if present and all(isinstance(v, str) and _is_date(v) for v in present):
        return pa.array(
            [None if v is None else dt.date.fromisoformat(v) for v in values], type=pa.date32()
        )
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _is_date(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10


# -- generating persons ------------------------------------------------------------------------


class Ids:
    """Fresh visit and condition ids, unique across an extract unless a trick reuses them."""

    def __init__(self, start: int) -> None:
        self._next = start

    def take(self) -> int:
        self._next += 1
        return self._next


def _date(rng: random.Random, start: int = 2000, end: int = 2025) -> str:
    year = rng.randint(start, end)
    return dt.date(year, rng.randint(1, 12), rng.randint(1, 28)).isoformat()


def ordinary_person(pid: int, rng: random.Random, ids: Ids) -> PersonRows:
    person = {
        "person_id": pid,
        "gender_concept_id": rng.choice(SEX_CONCEPTS[:2]),
        "year_of_birth": rng.randint(1930, 2020),
        "month_of_birth": rng.randint(1, 12),
        "day_of_birth": rng.randint(1, 28),
        "race_concept_id": rng.choice(RACE_CONCEPTS),
        "ethnicity_concept_id": rng.choice((0, HISPANIC)),
        "person_source_value": f"src-{pid}",
    }
    visits = []
    for _ in range(rng.randint(0, 6)):
        start = dt.date.fromisoformat(_date(rng))
        end = start + dt.timedelta(days=rng.choice((0, 0, 1, 3, 12, 40)))
        visits.append(
            {
                "visit_occurrence_id": ids.take(),
                "person_id": pid,
                "visit_concept_id": rng.choice(VISIT_CONCEPTS[:7]),
                "visit_start_date": start.isoformat(),
                "visit_end_date": end.isoformat(),
            }
        )
    conditions = []
    for _ in range(rng.randint(0, 8)):
        visit = rng.choice(visits) if visits and rng.random() < 0.7 else None
        conditions.append(
            {
                "condition_occurrence_id": ids.take(),
                "person_id": pid,
                "condition_concept_id": rng.choice(
                    [*MAPPED.values(), DESCENDANT, DUAL, UNMAPPED[0]]
                ),
                "condition_start_date": visit["visit_start_date"] if visit else _date(rng),
                "visit_occurrence_id": visit["visit_occurrence_id"] if visit else None,
            }
        )
    observation = [
        {
            "person_id": pid,
            "observation_period_start_date": "2000-01-01",
            "observation_period_end_date": _date(rng, 2018, 2025),
        }
    ]
    return PersonRows(pid, (person,), tuple(visits), tuple(conditions), tuple(observation))


def adversarial_person(
    pid: int, rng: random.Random, ids: Ids, tricks: frozenset[str], others: Extract
) -> PersonRows:
    """An ordinary person bent by each of ``tricks`` (see ``TRICKS``)."""
    base = ordinary_person(pid, rng, ids)
    person = [dict(r) for r in base.person]
    visits = [dict(r) for r in base.visits]
    conditions = [dict(r) for r in base.conditions]
    observation = [dict(r) for r in base.observation]
    other_visits = [r["visit_occurrence_id"] for r in others.visits if r["person_id"] != pid]
    other_visits = [v for v in other_visits if v is not None]
    other_conditions = [r.get("condition_occurrence_id") for r in others.conditions]
    other_conditions = [c for c in other_conditions if c is not None]

    def new_condition(**over: Any) -> Row:
        row = {
            "condition_occurrence_id": ids.take(),
            "person_id": pid,
            "condition_concept_id": rng.choice(list(MAPPED.values())),
            "condition_start_date": _date(rng),
            "visit_occurrence_id": None,
        }
        row.update(over)
        return row

    def new_visit(**over: Any) -> Row:
        row = {
            "visit_occurrence_id": ids.take(),
            "person_id": pid,
            "visit_concept_id": rng.choice(VISIT_CONCEPTS),
            "visit_start_date": _date(rng),
            "visit_end_date": _date(rng),
        }
        row.update(over)
        return row

    if "many_rows" in tricks:
        visits += [new_visit() for _ in range(rng.randint(20, 120))]
        conditions += [
            new_condition(
                visit_occurrence_id=rng.choice(visits)["visit_occurrence_id"]
                if rng.random() < 0.5
                else None
            )
            for _ in range(rng.randint(100, 1500))
        ]
    if "future_dates" in tricks:
        far = rng.choice(["2031-06-30", "2099-12-31", "9999-12-31", "2026-01-02"])
        visits.append(new_visit(visit_start_date="2024-01-01", visit_end_date=far))
        visits.append(new_visit(visit_start_date=far, visit_end_date=far))
        conditions.append(new_condition(condition_start_date=far))
        observation.append(
            {
                "person_id": pid,
                "observation_period_start_date": "2020-01-01",
                "observation_period_end_date": far,
            }
        )
        person[0]["year_of_birth"] = rng.choice([2030, 2099, 2025])
    if "past_dates" in tricks:
        old = rng.choice(["1800-01-01", "1900-02-28", "1989-12-31", "0001-01-01"])
        visits.append(new_visit(visit_start_date=old, visit_end_date="2020-01-01"))
        conditions.append(new_condition(condition_start_date=old))
        person[0]["year_of_birth"] = rng.choice([1800, 1890, 1900])
    if "bounds" in tricks:
        visits.append(new_visit(visit_start_date="2010-01-01", visit_end_date="2010-06-30"))
        visits.append(new_visit(visit_start_date="2010-01-01", visit_end_date="2030-01-01"))
        visits.append(new_visit(visit_start_date="2015-05-05", visit_end_date="2015-01-01"))
        conditions.append(new_condition(condition_start_date="2030-12-31"))
        conditions.append(new_condition(condition_start_date="1990-01-01"))
        person[0]["month_of_birth"] = rng.choice([0, 13, -1, 12])
        person[0]["day_of_birth"] = rng.choice([0, 32, 31])
    if "missing_ids" in tricks:
        for row in conditions:
            if rng.random() < 0.7:
                row["condition_occurrence_id"] = None
        for row in visits:
            if rng.random() < 0.5:
                row["visit_occurrence_id"] = None
    if "foreign_visits" in tricks and other_visits:
        for _ in range(rng.randint(1, 30)):
            conditions.append(
                new_condition(
                    visit_occurrence_id=rng.choice(other_visits),
                    condition_concept_id=rng.choice(list(MAPPED.values())),
                )
            )
    if "colliding_ids" in tricks:
        for row in visits:
            if other_visits and rng.random() < 0.6:
                row["visit_occurrence_id"] = rng.choice(other_visits)
        for row in conditions:
            if other_conditions and rng.random() < 0.6:
                row["condition_occurrence_id"] = rng.choice(other_conditions)
    if "unmapped" in tricks:
        conditions += [new_condition(condition_concept_id=rng.choice(UNMAPPED)) for _ in range(5)]
        visits.append(new_visit(visit_concept_id=44_818_517))
        person[0]["gender_concept_id"] = 8551
        person[0]["race_concept_id"] = 99
    if "junk" in tricks:
        pick = rng.choice
        conditions.append(new_condition(condition_start_date=pick(["2020-13-45", "yesterday"])))
        conditions.append(new_condition(condition_concept_id=pick(["abc", "12x", "1.5"])))
        visits.append(new_visit(visit_end_date=pick(["soon", "2020-02-30", "31/12/2020"])))
        visits.append(new_visit(visit_concept_id="inpatient"))
        person[0]["year_of_birth"] = pick(["19x0", "", "nineteen"])
    if "id_aliases" in tricks:  # rows whose person id spells another person's id differently
        targets = [p for p in others.persons if p != pid] or [1]
        for target in rng.sample(targets, min(3, len(targets))):
            digits = str(target)
            spelling = rng.choice(
                [f"0{target}", f" {target}", f"+{target}", f"{target}.0", f"{target}e0",
                 hex(target), f"{target}.4", f"{target - 0.5}", f"{digits[:-1]}_{digits[-1]}"]
            )  # fmt: skip
            person.append({**person[0], "person_id": spelling, "gender_concept_id": 0})
            visits += [new_visit(person_id=spelling) for _ in range(12)]
            conditions += [new_condition(person_id=spelling) for _ in range(30)]
    if "infinite_dates" in tricks:
        for value in ("infinity", "-infinity"):
            visits.append(new_visit(visit_start_date=value, visit_end_date=value))
            visits.append(new_visit(visit_start_date="2020-01-01", visit_end_date=value))
            conditions.append(new_condition(condition_start_date=value))
    if "huge_numbers" in tricks:
        person[0]["month_of_birth"] = rng.choice([2147483647, -2147483648, 99999999999])
        person[0]["day_of_birth"] = rng.choice([2147483647, 10**15])
        visits.append(new_visit(visit_concept_id=99999999999999999999))
        conditions.append(new_condition(condition_concept_id=-99999999999999999999))
    if "csv_noise" in tricks:  # text a CSV sniffer could take for a dialect
        person[0]["person_source_value"] = rng.choice(
            [";;;;;;;;", "\t|\t|\t|", "# not a comment", '"quoted, value"', "a\r\nb", "x" * 5000]
        )
    if "nulls" in tricks:
        for row in [*visits, *conditions, *person]:
            for key in list(row):
                if key != "person_id" and rng.random() < 0.3:
                    row[key] = None
    if "duplicates" in tricks:
        conditions += [dict(r) for r in conditions if rng.random() < 0.5]
        visits += [dict(r) for r in visits if rng.random() < 0.5]
        person.append({**person[0], "gender_concept_id": rng.choice(SEX_CONCEPTS)})
        person.append(dict(person[0]))
    if "null_person_rows" in tricks:
        conditions += [new_condition(person_id=None) for _ in range(3)]
        visits.append(new_visit(person_id=None))
        person.append({**person[0], "person_id": None})
    if "no_person_row" in tricks:
        person = []
    rng.shuffle(conditions)
    rng.shuffle(visits)
    return PersonRows(
        pid,
        tuple(person),
        tuple(visits),
        tuple(conditions),
        tuple(observation),
        opted_out="opted_out" in tricks,
    )


def build_extract(persons: list[PersonRows], schema: Schema, rng: random.Random) -> Extract:
    """An extract of these persons, rows shuffled within each table."""
    extract = Extract(schema=schema)
    for rows in persons:
        extract = with_person(extract, rows, rng)
    opt_out = tuple(p.person_id for p in persons if p.opted_out)
    return replace(shuffled(extract, rng), opt_out=opt_out)


# -- Hypothesis strategies ---------------------------------------------------------------------

schemas = st.builds(
    Schema, st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
    st.booleans(),
)  # fmt: skip
trick_sets = st.frozensets(st.sampled_from(TRICKS), min_size=1, max_size=5)


@dataclass(frozen=True)
class Neighbourhood:
    """A base extract and the persons that make its neighbours."""

    base: Extract
    added: tuple[PersonRows, ...]  # D' = base + person
    removed: tuple[int, ...]  # D' = base - person
    seed: int
    fmt: str
    tricks: tuple[frozenset[str], ...]


@st.composite
def neighbourhoods(draw: st.DrawFn, max_added: int = 3) -> Neighbourhood:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    schema = draw(schemas)
    fmt = draw(st.sampled_from(["csv", "parquet"]))
    ids = Ids(1000)
    n_ordinary = draw(st.integers(2, 14))
    persons: list[PersonRows] = [ordinary_person(pid, rng, ids) for pid in range(1, n_ordinary + 1)]
    base_tricks = draw(st.lists(trick_sets, max_size=2))
    partial = build_extract(persons, schema, rng)
    for i, tricks in enumerate(base_tricks):
        persons.append(adversarial_person(500 + i, rng, ids, tricks, partial))
    base = build_extract(persons, schema, rng)
    added_tricks = draw(st.lists(trick_sets, min_size=1, max_size=max_added))
    added = tuple(
        adversarial_person(900 + i, rng, ids, tricks, base) for i, tricks in enumerate(added_tricks)
    )
    # The opt-out register is public and fixed: it lists an added person in D as well as in D'.
    opted = [p for p in [*persons, *added] if p.opted_out]
    sources = {r.get("person_source_value") for p in opted for r in p.person}
    base = replace(
        base,
        opt_out=(*base.opt_out, *(p.person_id for p in added if p.opted_out)),
        opt_out_sources=tuple(sorted(str(v) for v in sources if v and str(v).strip())),
    )
    removed = tuple(draw(st.lists(st.sampled_from(base.persons), max_size=2, unique=True)))
    return Neighbourhood(base, added, removed, seed, fmt, (*base_tricks, *added_tricks))


def load_extract(extract: Extract, directory: Path, catalog: Any, fmt: str = "csv") -> Path:
    """Write the extract and load it with the real loader; returns the node database."""
    from node.loader import load_omop

    source = write_extract(extract, directory / "omop", fmt)
    listed = extract.opt_out_sources if extract.schema.opt_out_by_source else extract.opt_out
    opt_out = write_opt_out(extract, directory / "opt_out.csv") if listed else None
    out = directory / "node.duckdb"
    load_omop(source, out, catalog, opt_out=opt_out)
    return out

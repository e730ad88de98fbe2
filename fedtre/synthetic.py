"""Deterministic synthetic OMOP CDM extracts for a UK NHS mental-health trust.

``generate`` writes four OMOP CDM tables (``person``, ``observation_period``,
``visit_occurrence`` and ``condition_occurrence``) as Parquet or CSV. The same arguments always
give the same table contents: every chunk of persons draws from its own generator, spawned from
``numpy.random.SeedSequence(seed)``. Work is vectorised with numpy and done in chunks of
``CHUNK_PERSONS`` persons, each written as row groups (Parquet) or appended rows (CSV), so a
million persons take seconds and modest memory. (The chunk size is part of the recipe: changing
``CHUNK_PERSONS`` changes the output.)

The model, in order of simulation (every number is illustrative, chosen to look plausible for
people in contact with secondary mental-health services, not estimated from real data):

1. Persons: age at ``reference_date`` from a fixed 0-100 profile (children and adolescents, a
   bulge at 18-45, a tail of older adults); sex 52% female, 0.3% unknown; broad ethnic group
   (about 80% White). The date of birth is uniform among dates giving that age.
2. Observation period: starts on or after 2000-01-01 and birth, usually years before the
   reference date; most periods run to ``reference_date``, some end earlier (discharge, death).
3. Condition groups (the groups of ``data/condition_groups.csv``): each person has each group
   with a probability set by a target ever-diagnosed prevalence, scaled by age and sex risk
   curves normalised over the population profile. Mental-health groups share a latent
   vulnerability (gamma, mean 1) so they co-occur, and some groups are more likely with
   depression (anxiety above all). A person with a group gets 1 + Poisson(1.5) records of it,
   coded with the group's concepts (first listed most common).
4. Other diagnoses: a gamma-Poisson (over-dispersed) number, mean about 7, rising with age, of
   common physical conditions whose concepts are not in the mapping file, so they fall into the
   catalog's ``other`` group. About 1% of persons end with more than 25 condition rows.
5. Visits: 1 + Poisson(2) per person, more for people with psychosis, bipolar disorder or
   self-harm, who also have more inpatient and emergency visits. Inpatient stays are lognormal:
   median about 25 days (long tail) for mental-health admissions, about 3 days otherwise,
   capped at three years and at the end of the observation period.
6. About 70% of diagnoses are tied to one of the person's visits and dated on its start date;
   the rest have no visit and a date uniform in the observation period.

All dates lie between 2000-01-01 (or birth, if later) and ``reference_date``, inside the
person's observation period. Identifiers: ``person_id = person_id_offset + n`` (n = 1, 2, ...);
``observation_period_id`` equals ``person_id``; visit and condition ids are
``person_id * ID_STRIDE + k`` where k numbers the person's rows from 1, so extracts generated
with non-overlapping person id ranges (several trusts) also have non-overlapping row ids (rows
per person are capped below ``ID_STRIDE``, far above what the model produces).
"""

from __future__ import annotations

import csv
import datetime
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fedtre.errors import ConfigError

__all__ = ["CHUNK_PERSONS", "ID_STRIDE", "TABLES", "SyntheticSummary", "generate"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

CHUNK_PERSONS = 250_000
"""Persons simulated and written together; bounds memory use."""

ID_STRIDE = 1_000
"""Visit and condition ids are ``person_id * ID_STRIDE + k`` with 1 <= k < ID_STRIDE."""

TABLES = ("person", "observation_period", "visit_occurrence", "condition_occurrence")
"""Tables written, one file each (``<table>.parquet`` or ``<table>.csv``)."""

CONDITION_GROUPS_CSV = Path(__file__).parent / "data" / "condition_groups.csv"

_FORMATS = ("parquet", "csv")
_EPOCH = datetime.date(1970, 1, 1)
_WINDOW_START = datetime.date(2000, 1, 1)
_MAX_AGE = 100
_EHR_TYPE_CONCEPT = 32817

# Sex: index 0 female, 1 male, 2 unknown.
_GENDER_CONCEPTS = np.array([8532, 8507, 0], dtype=np.int64)
_SEX_WEIGHTS = np.array([0.520, 0.477, 0.003])

# White, Asian, Black, other or mixed, unknown.
_RACE_CONCEPTS = np.array([8527, 8515, 8516, 8522, 0], dtype=np.int64)
_RACE_WEIGHTS = np.array([0.80, 0.09, 0.04, 0.04, 0.03])

# Relative number of people of each age in contact with the trust (interpolated per year).
_AGE_KNOTS = (0, 4, 8, 12, 15, 18, 22, 30, 40, 45, 55, 65, 75, 85, 92, 100)
_AGE_PROFILE = (0.15, 0.3, 0.7, 1.1, 1.5, 1.8, 2.0, 2.0, 1.8, 1.6, 1.2, 0.9, 0.85, 0.6, 0.2, 0.02)

_REPEAT_MEAN = 1.5  # extra records of a group, beyond the first
_MAX_REPEATS = 20
_LATENT_SHAPE = 3.0  # gamma shape of the shared mental-health vulnerability (mean 1)
_MAX_PROBABILITY = 0.97

_OTHER_MEAN = 7.0
_OTHER_SHAPE = 5.0  # gamma shape of the person's rate: smaller means a longer tail
_OTHER_AGE_KNOTS = (0, 18, 50, 80, 100)
_OTHER_AGE_RISK = (0.7, 0.8, 1.0, 1.4, 1.4)

# Common physical conditions outside the mapping file: (concept_id, weight). Standard SNOMED
# concepts in the OMOP vocabulary; the weights are illustrative.
_OTHER_CONDITIONS = (
    (40481087, 10.0),  # Viral sinusitis
    (4112343, 8.0),  # Acute viral pharyngitis
    (260139, 7.0),  # Acute bronchitis
    (80180, 6.0),  # Osteoarthritis
    (81151, 5.0),  # Sprain of ankle
    (28060, 5.0),  # Streptococcal sore throat
    (372328, 5.0),  # Otitis media
    (257012, 4.0),  # Chronic sinusitis
    (195588, 4.0),  # Cystitis
    (318736, 4.0),  # Migraine
    (439777, 3.0),  # Anemia
    (140673, 3.0),  # Hypothyroidism
    (4027663, 2.0),  # Peptic ulcer
    (255848, 2.0),  # Pneumonia
    (378001, 2.0),  # Concussion with no loss of consciousness
    (80502, 2.0),  # Osteoporosis
    (380378, 1.5),  # Epilepsy
    (313217, 1.5),  # Atrial fibrillation
    (192671, 1.0),  # Gastrointestinal hemorrhage
    (4329847, 1.0),  # Myocardial infarction
)

_VISIT_MEAN = 2.0  # extra visits beyond the first
_SEVERE_VISIT_FACTOR = 1.6
_MAX_VISITS = ID_STRIDE - 1
_MAX_CONDITIONS = ID_STRIDE - 1
# Inpatient, outpatient, emergency, community/home visit.
_VISIT_CONCEPTS = np.array([9201, 9202, 9203, 581476], dtype=np.int64)
_VISIT_MIX = np.array([0.06, 0.48, 0.08, 0.38])
_SEVERE_VISIT_MIX = np.array([0.18, 0.36, 0.16, 0.30])
_INPATIENT = 0
_MH_STAY_MEDIAN, _MH_STAY_SIGMA = 25.0, 1.0
_PHYSICAL_STAY_MEDIAN, _PHYSICAL_STAY_SIGMA = 3.0, 0.8
_MAX_STAY = 3 * 365

_VISIT_LINK_PROBABILITY = 0.7


@dataclass(frozen=True)
class _GroupModel:
    """How likely a person is to have ever been diagnosed with one condition group."""

    name: str
    prevalence: float
    age_knots: tuple[float, ...]
    age_risk: tuple[float, ...]
    female_risk: float = 1.0
    male_risk: float = 1.0
    latent: bool = False  # shares the mental-health vulnerability
    depression_rr: float = 1.0  # relative risk given depression (depression is simulated first)


_GROUP_MODELS = (
    _GroupModel(
        "depression", 0.30,
        (0, 10, 14, 18, 65, 80, 100),
        (0.1, 0.3, 0.9, 1.2, 1.2, 0.9, 0.8),
        female_risk=1.25, male_risk=0.75, latent=True,
    ),
    _GroupModel(
        "anxiety", 0.25,
        (0, 8, 14, 18, 60, 80, 100),
        (0.2, 0.5, 1.0, 1.2, 1.1, 0.7, 0.6),
        female_risk=1.25, male_risk=0.75, latent=True, depression_rr=2.0,
    ),
    _GroupModel(
        "psychosis", 0.07,
        (0, 13, 16, 20, 30, 64, 70, 100),
        (0.0, 0.02, 0.4, 1.4, 1.6, 1.2, 0.5, 0.3),
        female_risk=0.65, male_risk=1.35, latent=True,
    ),
    _GroupModel(
        "bipolar", 0.04,
        (0, 13, 18, 25, 64, 75, 100),
        (0.0, 0.05, 0.8, 1.3, 1.2, 0.8, 0.5),
        latent=True, depression_rr=1.5,
    ),
    _GroupModel(
        "self_harm", 0.06,
        (0, 9, 12, 16, 25, 35, 50, 100),
        (0.0, 0.05, 1.5, 3.0, 2.5, 1.5, 0.4, 0.2),
        female_risk=1.35, male_risk=0.65, latent=True, depression_rr=1.8,
    ),
    _GroupModel(
        "eating_disorder", 0.02,
        (0, 9, 12, 16, 30, 40, 55, 100),
        (0.0, 0.1, 2.0, 4.0, 2.5, 0.5, 0.1, 0.05),
        female_risk=1.8, male_risk=0.2, latent=True,
    ),
    _GroupModel(
        "adhd", 0.05,
        (0, 4, 7, 12, 20, 30, 45, 60, 100),
        (0.0, 0.3, 2.5, 3.0, 2.5, 1.2, 0.5, 0.1, 0.05),
        female_risk=0.55, male_risk=1.45, latent=True,
    ),
    _GroupModel(
        "dementia", 0.05,
        (0, 45, 55, 65, 75, 85, 100),
        (0.0, 0.0, 0.05, 1.0, 3.0, 6.0, 7.0),
        female_risk=1.1, male_risk=0.9,
    ),
    _GroupModel(
        "diabetes", 0.08,
        (0, 10, 18, 30, 45, 60, 75, 100),
        (0.05, 0.08, 0.15, 0.4, 1.0, 1.8, 2.2, 1.8),
        female_risk=0.85, male_risk=1.15,
    ),
    _GroupModel(
        "hypertension", 0.14,
        (0, 18, 30, 45, 60, 75, 100),
        (0.0, 0.02, 0.15, 0.8, 2.0, 3.0, 3.2),
    ),
    _GroupModel(
        "asthma", 0.10,
        (0, 3, 10, 18, 60, 100),
        (0.5, 1.3, 1.4, 1.0, 0.9, 0.8),
        female_risk=1.1, male_risk=0.9,
    ),
    _GroupModel(
        "copd", 0.03,
        (0, 40, 45, 55, 65, 80, 100),
        (0.0, 0.0, 0.3, 1.0, 2.0, 2.5, 2.0),
        female_risk=0.9, male_risk=1.1,
    ),
)  # fmt: skip

_SEVERE_GROUPS = ("psychosis", "bipolar", "self_harm")
_MH_ADMISSION_GROUPS = ("psychosis", "bipolar", "depression")


@dataclass(frozen=True)
class SyntheticSummary:
    """What ``generate`` wrote."""

    persons: int
    condition_rows: int
    visit_rows: int
    out_dir: Path
    seconds: float


@dataclass(frozen=True)
class _Model:
    """Everything derived once from the arguments and reused by every chunk."""

    reference_day: int
    window_start_day: int
    age_weights: FloatArray  # shape (_MAX_AGE + 1,), sums to 1
    birth_first_day: IntArray  # per age: first date of birth giving that age
    birth_last_day: IntArray  # per age: last date of birth giving that age
    group_probability: FloatArray  # shape (groups, 3 sexes, ages), before latent factors
    group_concepts: tuple[IntArray, ...]
    group_concept_weights: tuple[FloatArray, ...]
    other_rate_by_age: FloatArray
    other_concepts: IntArray
    other_concept_weights: FloatArray


@dataclass(frozen=True)
class _Persons:
    """One chunk of simulated persons; arrays are indexed by position in the chunk."""

    person_id: IntArray
    sex: IntArray
    age: IntArray
    birth_day: IntArray
    race_concept: IntArray
    obs_start: IntArray
    obs_end: IntArray
    has_group: BoolArray  # shape (groups, persons)


@dataclass(frozen=True)
class _Visits:
    """Visits of one chunk, sorted by person then start date."""

    person: IntArray  # position of the person in the chunk
    first_row: IntArray  # per person: index of the person's first visit
    count: IntArray  # per person: number of visits
    visit_id: IntArray
    concept: IntArray
    start: IntArray
    end: IntArray


@dataclass(frozen=True)
class _Conditions:
    """Diagnoses of one chunk, sorted by person then date."""

    person: IntArray
    condition_id: IntArray
    concept: IntArray
    start: IntArray
    visit_id: IntArray
    linked: BoolArray


class _Sink(Protocol):
    def write_table(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


_SCHEMAS = {
    "person": pa.schema(
        [
            ("person_id", pa.int64()),
            ("gender_concept_id", pa.int64()),
            ("year_of_birth", pa.int64()),
            ("month_of_birth", pa.int64()),
            ("day_of_birth", pa.int64()),
            ("race_concept_id", pa.int64()),
            ("ethnicity_concept_id", pa.int64()),
            ("person_source_value", pa.string()),
        ]
    ),
    "observation_period": pa.schema(
        [
            ("observation_period_id", pa.int64()),
            ("person_id", pa.int64()),
            ("observation_period_start_date", pa.date32()),
            ("observation_period_end_date", pa.date32()),
            ("period_type_concept_id", pa.int64()),
        ]
    ),
    "visit_occurrence": pa.schema(
        [
            ("visit_occurrence_id", pa.int64()),
            ("person_id", pa.int64()),
            ("visit_concept_id", pa.int64()),
            ("visit_start_date", pa.date32()),
            ("visit_end_date", pa.date32()),
            ("visit_type_concept_id", pa.int64()),
        ]
    ),
    "condition_occurrence": pa.schema(
        [
            ("condition_occurrence_id", pa.int64()),
            ("person_id", pa.int64()),
            ("condition_concept_id", pa.int64()),
            ("condition_start_date", pa.date32()),
            ("condition_type_concept_id", pa.int64()),
            ("visit_occurrence_id", pa.int64()),
        ]
    ),
}


def generate(
    out_dir: Path | str,
    persons: int,
    seed: int = 0,
    fmt: str = "parquet",
    reference_date: datetime.date = datetime.date(2025, 3, 31),
    progress: Callable[[str], None] | None = None,
    *,
    person_id_offset: int = 0,
) -> SyntheticSummary:
    """Write a synthetic OMOP CDM extract of ``persons`` persons into ``out_dir``.

    Writes ``person``, ``observation_period``, ``visit_occurrence`` and
    ``condition_occurrence`` as ``<table>.parquet`` or ``<table>.csv`` (``fmt``), replacing
    files of those names. The same ``persons``, ``seed``, ``fmt`` and ``reference_date`` give
    the same contents; ``person_id_offset`` only shifts identifiers. ``progress`` receives short
    human-readable lines as chunks are written.
    """
    _validate(persons, seed, fmt, reference_date, person_id_offset)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _build_model(reference_date)
    condition_rows = visit_rows = 0
    with ExitStack() as stack:
        sinks = {name: _open_sink(stack, out, name, fmt) for name in TABLES}
        for first, count, rng in _chunks(persons, seed):
            tables = _simulate_chunk(rng, model, person_id_offset + first + 1, count)
            for name, table in tables.items():
                sinks[name].write_table(table)
            condition_rows += tables["condition_occurrence"].num_rows
            visit_rows += tables["visit_occurrence"].num_rows
            if progress is not None:
                progress(f"persons {first + count:,}/{persons:,}")
    seconds = time.perf_counter() - started
    if progress is not None:
        progress(
            f"wrote {persons:,} persons, {visit_rows:,} visits and {condition_rows:,} "
            f"conditions to {out} in {seconds:.1f} s"
        )
    return SyntheticSummary(persons, condition_rows, visit_rows, out, seconds)


# --- arguments and set-up ----------------------------------------------------------------


def _validate(
    persons: int, seed: int, fmt: str, reference_date: datetime.date, person_id_offset: int
) -> None:
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be 'parquet' or 'csv', not {fmt!r}")
    if not _is_int(persons) or persons < 1:
        raise ValueError("persons must be a whole number of at least 1")
    if not _is_int(seed) or seed < 0:
        raise ValueError("seed must be a non-negative whole number")
    if not _is_int(person_id_offset) or person_id_offset < 0:
        raise ValueError("person_id_offset must be a non-negative whole number")
    if (person_id_offset + persons + 1) * ID_STRIDE >= 2**63:
        raise ValueError("person_id_offset + persons is too large for 64-bit row ids")
    if not isinstance(reference_date, datetime.date) or isinstance(
        reference_date, datetime.datetime
    ):
        raise ValueError("reference_date must be a datetime.date")
    if reference_date <= _WINDOW_START:
        raise ValueError("reference_date must be after 2000-01-01")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _chunks(persons: int, seed: int) -> Iterator[tuple[int, int, np.random.Generator]]:
    """Yield (first person index, persons in chunk, generator) for each chunk."""
    n_chunks = -(-persons // CHUNK_PERSONS)
    children = np.random.SeedSequence(seed).spawn(n_chunks)
    for i, child in enumerate(children):
        first = i * CHUNK_PERSONS
        yield first, min(CHUNK_PERSONS, persons - first), np.random.default_rng(child)


def _day(date: datetime.date) -> int:
    return (date - _EPOCH).days


def _years_before(date: datetime.date, years: int) -> datetime.date:
    """The same month and day ``years`` earlier (29 February becomes 28 February)."""
    try:
        return date.replace(year=date.year - years)
    except ValueError:
        return date.replace(year=date.year - years, day=28)


def _birth_ranges(reference_date: datetime.date) -> tuple[IntArray, IntArray]:
    """Per age a: the first and last dates of birth aged a on ``reference_date``."""
    ages = range(_MAX_AGE + 1)
    last = [_day(_years_before(reference_date, a)) for a in ages]
    first = [_day(_years_before(reference_date, a + 1)) + 1 for a in ages]
    return np.array(first, dtype=np.int64), np.array(last, dtype=np.int64)


def _age_weights() -> FloatArray:
    weights = np.interp(np.arange(_MAX_AGE + 1), _AGE_KNOTS, _AGE_PROFILE)
    return np.asarray(weights / weights.sum(), dtype=np.float64)


def _group_probabilities(age_weights: FloatArray) -> FloatArray:
    """Probability of each group by sex and age, normalised so prevalence matches the target."""
    ages = np.arange(_MAX_AGE + 1)
    tables = []
    for group in _GROUP_MODELS:
        sex_risk = np.array(
            [group.female_risk, group.male_risk, (group.female_risk + group.male_risk) / 2]
        )
        risk = sex_risk[:, None] * np.interp(ages, group.age_knots, group.age_risk)[None, :]
        mean_risk = float((_SEX_WEIGHTS[:, None] * age_weights[None, :] * risk).sum())
        tables.append(group.prevalence * risk / mean_risk)
    return np.stack(tables)


@functools.lru_cache(maxsize=4)
def _read_condition_groups(path: Path) -> dict[str, tuple[int, ...]]:
    """Concept ids per group, in file order."""
    concepts: dict[str, list[int]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                concepts.setdefault(row["group"].strip(), []).append(int(row["concept_id"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot read condition groups from {path}: {exc}") from exc
    return {group: tuple(ids) for group, ids in concepts.items()}


def _concept_choices(
    mapping: dict[str, tuple[int, ...]],
) -> tuple[tuple[IntArray, ...], tuple[FloatArray, ...]]:
    """Concepts of each modelled group, with weights halving down the file's list."""
    concepts: list[IntArray] = []
    weights: list[FloatArray] = []
    for group in _GROUP_MODELS:
        ids = mapping.get(group.name)
        if not ids:
            raise ConfigError(f"{CONDITION_GROUPS_CSV.name} has no concepts for {group.name}")
        w = 0.5 ** np.arange(len(ids), dtype=np.float64)
        concepts.append(np.array(ids, dtype=np.int64))
        weights.append(w / w.sum())
    return tuple(concepts), tuple(weights)


def _other_concepts(mapping: dict[str, tuple[int, ...]]) -> tuple[IntArray, FloatArray]:
    mapped = {concept for ids in mapping.values() for concept in ids}
    clash = sorted(concept for concept, _ in _OTHER_CONDITIONS if concept in mapped)
    if clash:
        raise ConfigError(f"'other' condition concepts are in the group mapping: {clash}")
    ids = np.array([concept for concept, _ in _OTHER_CONDITIONS], dtype=np.int64)
    weights = np.array([weight for _, weight in _OTHER_CONDITIONS], dtype=np.float64)
    return ids, weights / weights.sum()


def _other_rate_by_age(age_weights: FloatArray) -> FloatArray:
    risk = np.interp(np.arange(_MAX_AGE + 1), _OTHER_AGE_KNOTS, _OTHER_AGE_RISK)
    return np.asarray(_OTHER_MEAN * risk / float((age_weights * risk).sum()), dtype=np.float64)


def _build_model(reference_date: datetime.date) -> _Model:
    mapping = _read_condition_groups(CONDITION_GROUPS_CSV)
    age_weights = _age_weights()
    first_birth, last_birth = _birth_ranges(reference_date)
    group_concepts, group_weights = _concept_choices(mapping)
    other_ids, other_weights = _other_concepts(mapping)
    return _Model(
        reference_day=_day(reference_date),
        window_start_day=_day(_WINDOW_START),
        age_weights=age_weights,
        birth_first_day=first_birth,
        birth_last_day=last_birth,
        group_probability=_group_probabilities(age_weights),
        group_concepts=group_concepts,
        group_concept_weights=group_weights,
        other_rate_by_age=_other_rate_by_age(age_weights),
        other_concepts=other_ids,
        other_concept_weights=other_weights,
    )


# --- simulation ------------------------------------------------------------------------------


def _simulate_chunk(
    rng: np.random.Generator, model: _Model, first_person_id: int, count: int
) -> dict[str, pa.Table]:
    people = _simulate_persons(rng, model, first_person_id, count)
    visits = _simulate_visits(rng, people)
    conditions = _simulate_conditions(rng, model, people, visits)
    return {
        "person": _person_table(people),
        "observation_period": _observation_period_table(people),
        "visit_occurrence": _visit_table(people, visits),
        "condition_occurrence": _condition_table(people, conditions),
    }


def _uniform_days(rng: np.random.Generator, first: IntArray, last: IntArray) -> IntArray:
    """A uniformly chosen day in [first, last] for each element (last >= first)."""
    span = last - first + 1
    offset = np.minimum((rng.random(first.shape[0]) * span).astype(np.int64), span - 1)
    return first + offset


def _simulate_persons(
    rng: np.random.Generator, model: _Model, first_person_id: int, count: int
) -> _Persons:
    sex = rng.choice(len(_SEX_WEIGHTS), size=count, p=_SEX_WEIGHTS).astype(np.int64)
    age = rng.choice(_MAX_AGE + 1, size=count, p=model.age_weights).astype(np.int64)
    race = _RACE_CONCEPTS[rng.choice(len(_RACE_WEIGHTS), size=count, p=_RACE_WEIGHTS)]
    birth = _uniform_days(rng, model.birth_first_day[age], model.birth_last_day[age])
    obs_start, obs_end = _observation_periods(rng, model, birth, age)
    return _Persons(
        person_id=first_person_id + np.arange(count, dtype=np.int64),
        sex=sex,
        age=age,
        birth_day=birth,
        race_concept=race,
        obs_start=obs_start,
        obs_end=obs_end,
        has_group=_simulate_groups(rng, model, sex, age),
    )


def _observation_periods(
    rng: np.random.Generator, model: _Model, birth: IntArray, age: IntArray
) -> tuple[IntArray, IntArray]:
    """Start usually years before the reference date; some periods end early."""
    earliest = np.maximum(birth, model.window_start_day)
    span = model.reference_day - earliest
    offset = (rng.beta(1.0, 1.6, birth.shape[0]) * (span + 1)).astype(np.int64)
    start = earliest + np.minimum(offset, span)
    ends_early = rng.random(birth.shape[0]) < np.where(age >= 75, 0.35, 0.12)
    early_end = _uniform_days(rng, start, np.full_like(start, model.reference_day))
    end = np.where(ends_early, early_end, model.reference_day)
    return start, end


def _simulate_groups(
    rng: np.random.Generator, model: _Model, sex: IntArray, age: IntArray
) -> BoolArray:
    """Whether each person was ever diagnosed with each group (shape groups x persons)."""
    latent = rng.gamma(_LATENT_SHAPE, 1.0 / _LATENT_SHAPE, sex.shape[0])
    has = np.zeros((len(_GROUP_MODELS), sex.shape[0]), dtype=np.bool_)
    depression = has[0]
    for g, group in enumerate(_GROUP_MODELS):
        p = model.group_probability[g, sex, age]
        if group.latent:
            p = p * latent
        if group.depression_rr != 1.0:
            p = _with_depression(p, depression, group.depression_rr)
        has[g] = rng.random(sex.shape[0]) < np.minimum(p, _MAX_PROBABILITY)
    return has


def _with_depression(p: FloatArray, depression: BoolArray, relative_risk: float) -> FloatArray:
    """Raise ``p`` for people with depression, rescaled to keep the chunk's mean ``p``."""
    raised = p * np.where(depression, relative_risk, 1.0)
    total = float(raised.sum())
    return raised * (float(p.sum()) / total) if total > 0 else raised


def _group_index(name: str) -> int:
    return next(i for i, group in enumerate(_GROUP_MODELS) if group.name == name)


def _any_group(people: _Persons, names: Sequence[str]) -> BoolArray:
    return np.asarray(people.has_group[[_group_index(n) for n in names]].any(axis=0))


def _row_starts(count: IntArray) -> IntArray:
    """Index of each person's first row when rows are grouped by person."""
    starts = np.zeros(count.shape[0], dtype=np.int64)
    np.cumsum(count[:-1], out=starts[1:])
    return starts


def _sort_by_person_and_day(person: IntArray, day: IntArray, span: int) -> IntArray:
    """Stable order by person, then day (``0 <= day < span``)."""
    return np.argsort(person * span + day, kind="stable")


def _row_ids(people: _Persons, person: IntArray, starts: IntArray) -> IntArray:
    """``person_id * ID_STRIDE + k`` with k = 1, 2, ... within each person (rows sorted)."""
    ordinal = np.arange(person.shape[0], dtype=np.int64) - starts[person] + 1
    return people.person_id[person] * ID_STRIDE + ordinal


def _simulate_visits(rng: np.random.Generator, people: _Persons) -> _Visits:
    n = people.person_id.shape[0]
    severe = _any_group(people, _SEVERE_GROUPS)
    count = 1 + rng.poisson(_VISIT_MEAN * np.where(severe, _SEVERE_VISIT_FACTOR, 1.0))
    count = np.minimum(count, _MAX_VISITS).astype(np.int64)
    person = np.repeat(np.arange(n, dtype=np.int64), count)
    mix = np.cumsum(np.stack([_VISIT_MIX, _SEVERE_VISIT_MIX]), axis=1)[severe[person].astype(int)]
    kind = (rng.random(person.shape[0])[:, None] >= mix[:, :-1]).sum(axis=1)
    start = _uniform_days(rng, people.obs_start[person], people.obs_end[person])
    stay = _length_of_stay(rng, _any_group(people, _MH_ADMISSION_GROUPS)[person])
    end = np.where(kind == _INPATIENT, np.minimum(start + stay, people.obs_end[person]), start)
    span = int(people.obs_end.max() - people.obs_start.min()) + 1
    order = _sort_by_person_and_day(person, start - people.obs_start.min(), span)
    starts = _row_starts(count)
    return _Visits(
        person=person,
        first_row=starts,
        count=count,
        visit_id=_row_ids(people, person, starts),
        concept=_VISIT_CONCEPTS[kind[order]],
        start=start[order],
        end=end[order],
    )


def _length_of_stay(rng: np.random.Generator, mental_health: BoolArray) -> IntArray:
    """Days in hospital if the visit is an admission: lognormal, longer for mental health."""
    median = np.where(mental_health, _MH_STAY_MEDIAN, _PHYSICAL_STAY_MEDIAN)
    sigma = np.where(mental_health, _MH_STAY_SIGMA, _PHYSICAL_STAY_SIGMA)
    days = np.exp(np.log(median) + sigma * rng.standard_normal(mental_health.shape[0]))
    return np.clip(np.rint(days), 1, _MAX_STAY).astype(np.int64)


def _weighted_choice(
    rng: np.random.Generator, values: IntArray, weights: FloatArray, size: int
) -> IntArray:
    return values[rng.choice(values.shape[0], size=size, p=weights)]


def _group_diagnoses(
    rng: np.random.Generator, model: _Model, people: _Persons
) -> tuple[list[IntArray], list[IntArray]]:
    """(person positions, concepts) per group: 1 + Poisson repeats for each group a person has."""
    n = people.person_id.shape[0]
    persons, concepts = [], []
    for g in range(len(_GROUP_MODELS)):
        repeats = np.minimum(rng.poisson(_REPEAT_MEAN, n), _MAX_REPEATS - 1)
        count = np.where(people.has_group[g], 1 + repeats, 0)
        person = np.repeat(np.arange(n, dtype=np.int64), count)
        persons.append(person)
        concepts.append(
            _weighted_choice(
                rng, model.group_concepts[g], model.group_concept_weights[g], person.shape[0]
            )
        )
    return persons, concepts


def _other_diagnoses(
    rng: np.random.Generator, model: _Model, people: _Persons, group_rows: IntArray
) -> tuple[IntArray, IntArray]:
    """(person positions, concepts) of physical diagnoses outside the group mapping."""
    n = people.person_id.shape[0]
    rate = model.other_rate_by_age[people.age] * rng.gamma(_OTHER_SHAPE, 1.0 / _OTHER_SHAPE, n)
    count = np.minimum(rng.poisson(rate), np.maximum(_MAX_CONDITIONS - group_rows, 0))
    person = np.repeat(np.arange(n, dtype=np.int64), count)
    concept = _weighted_choice(
        rng, model.other_concepts, model.other_concept_weights, person.shape[0]
    )
    return person, concept


def _simulate_conditions(
    rng: np.random.Generator, model: _Model, people: _Persons, visits: _Visits
) -> _Conditions:
    n = people.person_id.shape[0]
    group_persons, group_concepts = _group_diagnoses(rng, model, people)
    group_person = np.concatenate(group_persons)
    group_rows = np.bincount(group_person, minlength=n).astype(np.int64)
    other_person, other_concept = _other_diagnoses(rng, model, people, group_rows)
    person = np.concatenate([group_person, other_person])
    concept = np.concatenate([*group_concepts, other_concept])

    linked = np.less(rng.random(person.shape[0]), _VISIT_LINK_PROBABILITY)
    pick = (rng.random(person.shape[0]) * visits.count[person]).astype(np.int64)
    visit_row = visits.first_row[person] + np.minimum(pick, visits.count[person] - 1)
    free_day = _uniform_days(rng, people.obs_start[person], people.obs_end[person])
    start = np.where(linked, visits.start[visit_row], free_day)
    visit_id = np.where(linked, visits.visit_id[visit_row], 0)

    base = int(people.obs_start.min())
    span = int(people.obs_end.max()) - base + 1
    order = _sort_by_person_and_day(person, start - base, span)
    person = person[order]
    starts = _row_starts(np.bincount(person, minlength=n).astype(np.int64))
    return _Conditions(
        person=person,
        condition_id=_row_ids(people, person, starts),
        concept=concept[order],
        start=start[order],
        visit_id=visit_id[order],
        linked=linked[order],
    )


# --- tables and files ------------------------------------------------------------------------


def _dates(days: IntArray) -> pa.Array:
    return pa.array(days.astype(np.int32), type=pa.date32())


def _constant(value: int, length: int) -> pa.Array:
    return pa.array(np.full(length, value, dtype=np.int64))


def _person_table(people: _Persons) -> pa.Table:
    birth = people.birth_day.astype("datetime64[D]")
    year = birth.astype("datetime64[Y]").astype(np.int64) + 1970
    month_start = birth.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12 + 1
    day = (birth - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    ids = pa.array(people.person_id)
    padded = pc.utf8_lpad(pc.cast(ids, pa.string()), width=10, padding="0")
    source = pc.binary_join_element_wise("S", padded, "")
    n = people.person_id.shape[0]
    columns = [
        ids,
        pa.array(_GENDER_CONCEPTS[people.sex]),
        pa.array(year),
        pa.array(month),
        pa.array(day),
        pa.array(people.race_concept),
        _constant(0, n),
        source,
    ]
    return pa.Table.from_arrays(columns, schema=_SCHEMAS["person"])


def _observation_period_table(people: _Persons) -> pa.Table:
    n = people.person_id.shape[0]
    columns = [
        pa.array(people.person_id),
        pa.array(people.person_id),
        _dates(people.obs_start),
        _dates(people.obs_end),
        _constant(_EHR_TYPE_CONCEPT, n),
    ]
    return pa.Table.from_arrays(columns, schema=_SCHEMAS["observation_period"])


def _visit_table(people: _Persons, visits: _Visits) -> pa.Table:
    columns = [
        pa.array(visits.visit_id),
        pa.array(people.person_id[visits.person]),
        pa.array(visits.concept),
        _dates(visits.start),
        _dates(visits.end),
        _constant(_EHR_TYPE_CONCEPT, visits.person.shape[0]),
    ]
    return pa.Table.from_arrays(columns, schema=_SCHEMAS["visit_occurrence"])


def _condition_table(people: _Persons, conditions: _Conditions) -> pa.Table:
    columns = [
        pa.array(conditions.condition_id),
        pa.array(people.person_id[conditions.person]),
        pa.array(conditions.concept),
        _dates(conditions.start),
        _constant(_EHR_TYPE_CONCEPT, conditions.person.shape[0]),
        pa.array(conditions.visit_id, mask=~conditions.linked),
    ]
    return pa.Table.from_arrays(columns, schema=_SCHEMAS["condition_occurrence"])


def _open_sink(stack: ExitStack, out: Path, table: str, fmt: str) -> _Sink:
    path = out / f"{table}.{fmt}"
    schema = _SCHEMAS[table]
    sink: _Sink
    if fmt == "parquet":
        sink = pq.ParquetWriter(path, schema, compression="zstd")
    else:
        options = pacsv.WriteOptions(batch_size=65_536, quoting_style="none", quoting_header="none")
        sink = pacsv.CSVWriter(path, schema, write_options=options)
    stack.callback(sink.close)
    return sink

"""Neighbouring-dataset stability: one person in or out moves no exact answer by more than the
sensitivity the node declares, through the real loader, for adversarial persons.

For many pairs of OMOP extracts D and D' that differ in one person (added with adversarial
records, or removed), both are loaded with ``node.loader.load_omop`` and every query (random
ones from the whole query language, and targeted ones) runs through the node's exact,
pre-noise path at every tier (``tests.property.exact_path``). Checked for each pair:

* every stored row of every other person is identical in D and D' (what is derived for a
  person depends only on that person's rows and public parameters);
* per statistic, the L1 distance between D's and D''s exact vectors, over all cells, is at
  most the sensitivity the node's release plan declares for it;
* refusals and result shapes are identical.

Two more properties ride on the same extracts: shuffling the rows of every file changes
nothing at all; and for a project approved below highly sensitive, deleting every highly
sensitive row changes nothing at all (tiers act on rows).

Profiles: ``FEDTRE_STABILITY=ci`` (default, in CI) or ``long`` (on demand). After its tests,
the module prints how many pairs, queries and comparisons were tried.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fedtre.catalog import Catalog, Tier
from node.database import open_research_db
from node.optouts import OptOut
from tests.property.exact_path import Exact, l1, prepare, project, run
from tests.property.omop_extracts import (
    DUAL,
    MAPPED,
    Neighbourhood,
    load_extract,
    neighbourhoods,
    shuffled,
    with_person,
    without_person,
)
from tests.property.strategies import valid_queries

# Hypothesis examples of the pairs test, examples of each of the two other tests, random
# queries per example (on top of the targeted ones, each run at every tier).
PROFILES = {"ci": (60, 20, 10), "long": (1500, 300, 30)}
PROFILE = os.environ.get("FEDTRE_STABILITY", "ci")
EXAMPLES, OTHER_EXAMPLES, RANDOM_QUERIES = PROFILES[PROFILE]
TALLY: Counter[str] = Counter()

COHORT_MH = "SELECT person_id FROM conditions WHERE condition_group IN ('depression', 'anxiety')"
TARGETED = [
    "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band",
    "SELECT age, COUNT(*) AS n FROM patients GROUP BY age",
    "SELECT sex, ethnicity, SUM(age) AS s, AVG(age) AS a FROM patients GROUP BY sex, ethnicity",
    "SELECT condition_group, COUNT(*) AS n, COUNT(DISTINCT person_id) AS p FROM conditions "
    "GROUP BY condition_group",
    "SELECT condition_group, setting, COUNT(*) AS n FROM conditions "
    "GROUP BY condition_group, setting",
    "SELECT year, COUNT(*) AS n, SUM(year) AS s FROM conditions GROUP BY year",
    "SELECT visit_type, mental_health, COUNT(*) AS n, SUM(length_of_stay) AS s FROM visits "
    "GROUP BY visit_type, mental_health",
    "SELECT year, AVG(length_of_stay) AS a, COUNT(DISTINCT person_id) AS p FROM visits "
    "GROUP BY year",
    f"SELECT COUNT(*) AS n FROM patients WHERE person_id NOT IN ({COHORT_MH})",
    "SELECT sex, COUNT(*) AS n FROM patients WHERE person_id IN "
    "(SELECT person_id FROM visits WHERE mental_health = TRUE) GROUP BY sex",
    "SELECT COUNT(*) AS n FROM conditions WHERE condition_group NOT IN "
    "('depression', 'anxiety', 'psychosis', 'bipolar', 'adhd', 'dementia')",
    "SELECT COUNT(DISTINCT person_id) AS p FROM visits WHERE person_id IN "
    "(SELECT person_id FROM conditions WHERE person_id NOT IN "
    "(SELECT person_id FROM patients WHERE age_band = '85+'))",
    "SELECT COUNT(*) AS n FROM conditions WHERE NOT (condition_group IN ('depression')) "
    "AND condition_group <> 'anxiety' AND condition_group <> 'other'",
    "SELECT COUNT(DISTINCT person_id) AS p FROM patients WHERE person_id NOT IN "
    "(SELECT person_id FROM conditions WHERE condition_group <> 'diabetes')",
]
HIGHLY_SENSITIVE_CONCEPTS = {MAPPED["self_harm"], MAPPED["eating_disorder"]}


@pytest.fixture(scope="module", autouse=True)
def report_how_much_was_tried(request: pytest.FixtureRequest):
    """After the module: print how many pairs, queries and comparisons were tried."""
    yield
    report = ", ".join(f"{v:,} {k}" for k, v in sorted(TALLY.items())) or "nothing"
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nneighbour stability ({PROFILE} profile): {report}")


def _databases(hood: Neighbourhood, catalog: Catalog, work: Path):
    """D, and each neighbour D' with the person it differs by."""
    rng = random.Random(hood.seed)
    base = load_extract(hood.base, work / "d", catalog, hood.fmt)
    pairs = []
    for i, person in enumerate(hood.added):
        neighbour = with_person(hood.base, person, rng)
        pairs.append((person.person_id, load_extract(neighbour, work / f"a{i}", catalog, hood.fmt)))
    for i, pid in enumerate(hood.removed):
        neighbour = without_person(hood.base, pid)
        pairs.append((pid, load_extract(neighbour, work / f"r{i}", catalog, hood.fmt)))
    return base, pairs


def _rows(db: Path, catalog: Catalog, excluding: int | None = None) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        where = "" if excluding is None else f"WHERE person_id <> {int(excluding)}"
        return {
            v: con.execute(f'SELECT * FROM "{v}" {where} ORDER BY ALL').fetchall()
            for v in catalog.views
        }
    finally:
        con.close()


def _difference(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> str:
    out = []
    for view in a:
        only_a, only_b = set(a[view]) - set(b[view]), set(b[view]) - set(a[view])
        if only_a or only_b:
            out.append(f"{view}: only in D {sorted(only_a)[:3]}, only in D' {sorted(only_b)[:3]}")
    return "; ".join(out) or "the same rows, counted differently"


def _answers(
    db: Path, catalog: Catalog, prepared: list[Exact], opted_out: dict[OptOut, int] | None = None
) -> list[Exact]:
    """Each query's exact answer; ``opted_out``: persons on the node's live opt-out list."""
    con = open_research_db(db, catalog)
    try:
        out = []
        for p in prepared:
            kinds = p.prepared.optouts if p.prepared is not None else frozenset()
            excluded = tuple(
                sorted({pid for kind, pid in (opted_out or {}).items() if kind in kinds})
            )
            out.append(run(con, p, excluded))
        return out
    finally:
        con.close()


def _prepared(queries: list[str], catalog: Catalog, tiers: tuple[Tier, ...]) -> list[Exact]:
    return [prepare(sql, catalog, project(tier)) for tier in tiers for sql in queries]


def _queries(data: st.DataObject, catalog: Catalog) -> list[str]:
    drawn = data.draw(
        st.lists(valid_queries(catalog), min_size=RANDOM_QUERIES, max_size=RANDOM_QUERIES)
    )
    return [*TARGETED, *(q.sql for q in drawn)]


def _assert_stable(a: list[Exact], b: list[Exact], sqls: list[str], what: str) -> None:
    for x, y, sql in zip(a, b, sqls, strict=True):
        assert x.refusal == y.refusal, f"{what}: refusal differs for {sql}"
        if x.prepared is None:
            continue
        assert x.prepared.compiled.cells == y.prepared.compiled.cells  # type: ignore[union-attr]
        moved = l1(x, y)
        assert all(m <= s for m, s in zip(moved, x.sensitivities, strict=True)), (
            f"{what}: {sql} moved by {moved}, declared sensitivity {x.sensitivities}"
        )
        TALLY["query comparisons"] += 1


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=PROFILE == "ci",
    # No shrinking: loading extracts is slow, and a failure's message names the person, the
    # query, the tricks and the format; Hypothesis prints the drawn example.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    print_blob=True,
)
OTHER_SETTINGS = settings(SETTINGS, max_examples=OTHER_EXAMPLES)


@SETTINGS
@given(hood=neighbourhoods(), data=st.data())
def test_one_person_moves_exact_answers_by_at_most_the_declared_sensitivity(
    hood: Neighbourhood, data: st.DataObject, catalog: Catalog
) -> None:
    queries = _queries(data, catalog)
    tiers = tuple(Tier)
    sqls = [sql for _ in tiers for sql in queries]
    prepared = _prepared(queries, catalog, tiers)
    with tempfile.TemporaryDirectory(prefix="fedtre-nb-") as tmp:
        base, pairs = _databases(hood, catalog, Path(tmp))
        base_answers = _answers(base, catalog, prepared)
        for person_id, neighbour in pairs:
            before, after = _rows(base, catalog, person_id), _rows(neighbour, catalog, person_id)
            assert before == after, (
                f"another person's stored rows changed when person {person_id} was added or "
                f"removed (tricks {hood.tricks}, {hood.fmt}): {_difference(before, after)}"
            )
            what = f"person {person_id} ({hood.fmt}, tricks {hood.tricks})"
            _assert_stable(base_answers, _answers(neighbour, catalog, prepared), sqls, what)
            TALLY["pairs"] += 1
    TALLY["distinct queries"] += len(queries)


@OTHER_SETTINGS
@given(hood=neighbourhoods(max_added=1))
def test_row_order_in_the_files_changes_nothing(hood: Neighbourhood, catalog: Catalog) -> None:
    rng = random.Random(hood.seed + 1)
    with tempfile.TemporaryDirectory(prefix="fedtre-nb-") as tmp:
        a = load_extract(hood.base, Path(tmp) / "a", catalog, hood.fmt)
        b = load_extract(shuffled(hood.base, rng), Path(tmp) / "b", catalog, hood.fmt)
        assert _rows(a, catalog) == _rows(b, catalog)
    TALLY["shuffled extracts"] += 1


@OTHER_SETTINGS
@given(hood=neighbourhoods(max_added=1), data=st.data())
def test_rows_above_a_projects_tier_do_not_exist_for_it(
    hood: Neighbourhood, data: st.DataObject, catalog: Catalog
) -> None:
    """Deleting every highly sensitive diagnosis changes no answer of a lower-tier project."""
    full = hood.base
    for person in hood.added:
        full = with_person(full, person, random.Random(hood.seed))
    # DUAL descends from self-harm (and depression) only through the extract's vocabulary
    highly_sensitive = HIGHLY_SENSITIVE_CONCEPTS | ({DUAL} if full.schema.ancestors else set())
    without = replace(
        full,
        conditions=tuple(
            r
            for r in full.conditions
            if _concept(r.get("condition_concept_id")) not in highly_sensitive
        ),
    )
    queries = _queries(data, catalog)
    tiers = (Tier.GENERAL, Tier.MENTAL_HEALTH)
    sqls = [sql for _ in tiers for sql in queries]
    prepared = _prepared(queries, catalog, tiers)
    with tempfile.TemporaryDirectory(prefix="fedtre-nb-") as tmp:
        a = _answers(load_extract(full, Path(tmp) / "a", catalog, hood.fmt), catalog, prepared)
        b = _answers(load_extract(without, Path(tmp) / "b", catalog, hood.fmt), catalog, prepared)
    for x, y, sql in zip(a, b, sqls, strict=True):
        assert x.refusal == y.refusal
        assert x.values == y.values, f"highly sensitive rows reached {sql}"
        TALLY["tier comparisons"] += 1


def _concept(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


@OTHER_SETTINGS
@given(
    hood=neighbourhoods(max_added=1),
    data=st.data(),
    kind=st.sampled_from(list(OptOut)),
    purpose=st.sampled_from(["public-benefit-research", "commercial"]),
)
def test_an_opted_out_person_has_no_influence_where_their_opt_out_applies(
    hood: Neighbourhood, data: st.DataObject, kind: OptOut, purpose: str, catalog: Catalog
) -> None:
    """D' = D plus (or minus) one person. With that person on the node's live opt-out list,
    every query their opt-out applies to answers on D' exactly as on D (they do not exist for
    it); every other query still counts them (e.g. a commercial opt-out and a public-benefit
    project), exactly as without the opt-out."""
    queries = _queries(data, catalog)
    tiers = tuple(Tier)
    sqls = [sql for _ in tiers for sql in queries]
    prepared = [
        prepare(sql, catalog, replace(project(tier), purpose=purpose))
        for tier in tiers
        for sql in queries
    ]
    with tempfile.TemporaryDirectory(prefix="fedtre-nb-") as tmp:
        base, pairs = _databases(hood, catalog, Path(tmp))
        for i, (person_id, neighbour) in enumerate(pairs):
            added = i < len(hood.added)
            larger, smaller = (neighbour, base) if added else (base, neighbour)
            opted = _answers(larger, catalog, prepared, {kind: person_id})
            absent = _answers(smaller, catalog, prepared)
            present = _answers(larger, catalog, prepared)
            for x, y, z, sql in zip(opted, absent, present, sqls, strict=True):
                assert x.refusal == y.refusal == z.refusal
                if x.prepared is None:
                    continue
                applies = kind in x.prepared.optouts
                expected = y if applies else z
                assert x.values == expected.values, (
                    f"{kind.value} opt-out of person {person_id} ({purpose}, applies: {applies}) "
                    f"changed {sql}"
                )
                TALLY["opt-out comparisons"] += 1
                TALLY[f"opt-out applied ({kind.value})"] += applies

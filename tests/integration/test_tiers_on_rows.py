"""Tiers act on rows, not on what a query names (issue 7, defect 4).

A project approved up to mental health once got self-harm and eating-disorder counts without
naming them: ``NOT IN`` the other groups, ``<>`` chains, ``NOT (... IN ...)``, cohort
complements, or the total minus the allowed groups. Inspecting queries cannot close this; for
such a project the highly sensitive rows must simply not exist. Each attack below asks the node
itself (ε 10, noise sd about 3.5 on these counts) for something that is about 0 when the rows do
not exist and several hundred when they leak (the fixture holds 550 such diagnoses).
"""

from __future__ import annotations

import pytest

from node.engine import NodeEngine
from tests.conftest import request

ALLOWED = (
    "'depression', 'anxiety', 'psychosis', 'bipolar', 'adhd', 'dementia', 'diabetes', "
    "'hypertension', 'asthma', 'copd', 'other'"
)
CHAIN = " AND ".join(f"condition_group <> {g}" for g in ALLOWED.split(", "))
ATTACKS = {
    "not_in_the_other_groups": f"SELECT COUNT(*) FROM conditions WHERE condition_group "
    f"NOT IN ({ALLOWED})",
    "chain_of_not_equal": f"SELECT COUNT(*) FROM conditions WHERE {CHAIN}",
    "not_of_in": f"SELECT COUNT(*) FROM conditions WHERE NOT (condition_group IN ({ALLOWED}))",
    "cohort_complement": "SELECT COUNT(*) FROM conditions WHERE person_id IN (SELECT person_id "
    f"FROM conditions WHERE condition_group NOT IN ({ALLOWED}))",
}
LEAK = 60  # |answer| above this (17 noise sds) means the rows reached the answer


@pytest.fixture
def mental_health_node(node_config_factory):
    eng = NodeEngine(
        node_config_factory(
            total_epsilon=1000.0, max_epsilon_per_query=10.0, max_tier="mental_health"
        )
    )
    yield eng
    eng.close()


def _count(eng: NodeEngine, sql: str, query_id: str) -> int:
    result = eng.answer(request(sql, 10.0, query_id=query_id))
    (value,) = result.aggregates[0].statistics[0].values
    return value


@pytest.mark.parametrize("sql", ATTACKS.values(), ids=ATTACKS.keys())
def test_highly_sensitive_rows_cannot_be_reached_by_negation(mental_health_node, sql):
    assert abs(_count(mental_health_node, sql, "attack")) < LEAK


def test_total_minus_allowed_groups_reveals_nothing(mental_health_node):
    total = _count(mental_health_node, "SELECT COUNT(*) FROM conditions", "total")
    allowed = _count(
        mental_health_node,
        f"SELECT COUNT(*) FROM conditions WHERE condition_group IN ({ALLOWED})",
        "allowed",
    )
    assert abs(total - allowed) < LEAK


def test_the_same_attack_reaches_the_rows_for_a_highly_sensitive_project(node_config_factory):
    """Control: the attack query does measure what it should when the rows exist."""
    eng = NodeEngine(node_config_factory(total_epsilon=1000.0, max_epsilon_per_query=10.0))
    try:
        assert _count(eng, ATTACKS["not_in_the_other_groups"], "control") > 300
    finally:
        eng.close()


def test_a_concept_in_groups_of_two_tiers_counts_in_the_highest(tmp_path, catalog):
    """A diagnosis that is both self-harm and depression in the vocabulary is self-harm, and a
    bad ``concept_ancestor`` link (level 0 or negative) cannot move a highly sensitive concept
    into a mental-health group (found by the attacker's review)."""
    import random

    import duckdb

    from node.loader import load_omop
    from tests.property.omop_extracts import (
        DUAL,
        MAPPED,
        Ids,
        Schema,
        build_extract,
        ordinary_person,
        write_extract,
    )

    rng = random.Random(3)
    ids = Ids(0)
    persons = [ordinary_person(p, rng, ids) for p in range(1, 4)]
    concepts = (DUAL, MAPPED["self_harm"], MAPPED["eating_disorder"], MAPPED["depression"])
    conditions = tuple(
        {
            "condition_occurrence_id": ids.take(),
            "person_id": 1,
            "condition_concept_id": concept,
            "condition_start_date": "2020-01-01",
            "visit_occurrence_id": None,
        }
        for concept in concepts
    )
    persons[0] = type(persons[0])(1, persons[0].person, (), conditions, persons[0].observation)
    extract = build_extract(persons, Schema(), rng)
    source = write_extract(extract, tmp_path / "omop", "csv")
    report = load_omop(source, tmp_path / "node.duckdb", catalog)
    assert report.concepts_mixed_tiers == 3  # DUAL, self-harm and eating disorder
    with duckdb.connect(str(tmp_path / "node.duckdb"), read_only=True) as con:
        groups = sorted(
            g
            for (g,) in con.execute(
                "SELECT condition_group FROM conditions WHERE person_id = 1"
            ).fetchall()
        )
        visible = con.execute(
            "SELECT count(*) FROM conditions WHERE person_id = 1 "
            "AND _rank_mental_health IS NOT NULL"
        ).fetchone()
    assert groups == ["depression", "eating_disorder", "self_harm", "self_harm"]
    assert visible == (1,)  # only the depression diagnosis exists for a mental-health project

"""Every refusal is decided, and the cost fixed, before the research database is touched
(issue 7, defect 5).

The engine's database connection is wrapped in a spy that counts every cursor and execute.
For every class of refusal the spy must count zero, the budget must be unchanged, and the audit
log must show the request and its refusal. A positive control shows the spy does see a query.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedtre.audit.log import read_audit
from fedtre.errors import QueryRefused, UserError
from fedtre.request import QueryRequest
from node.engine import NodeEngine
from node.errors import CallerGone
from node.ledger import NODE_SCOPE, project_scope
from tests.conftest import private_database, request

GOOD = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
SIXTEEN_MEANS = "SELECT " + ", ".join(f"AVG(age) AS a{i}" for i in range(16)) + " FROM patients"


class Spy:
    """Counts every use of the research database's connection."""

    def __init__(self, con: Any) -> None:
        self.con = con
        self.uses = 0

    def cursor(self) -> Any:
        self.uses += 1
        return self.con.cursor()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.uses += 1
        return self.con.execute(*args, **kwargs)

    def close(self) -> None:
        self.con.close()


@pytest.fixture
def spied(node_config_factory):
    """A node whose project is approved up to mental health, for patients and conditions, with
    a budget for exactly two queries of ε 0.1, a node ceiling of 0.3 and a minimum ε of
    0.000001 (so that an impossible split can be asked for)."""
    eng = NodeEngine(
        node_config_factory(
            total_epsilon=0.2,
            max_epsilon_per_query=0.1,
            node_ceiling=0.3,
            max_tier="mental_health",
            views=("patients", "conditions"),
            min_epsilon_per_query=0.000001,
        )
    )
    spy = Spy(eng.database._con)
    eng.database._con = spy
    yield eng, spy
    eng.close()


def _spent(eng: NodeEngine) -> tuple[int, int]:
    return eng.ledger.spent(project_scope("study")), eng.ledger.spent(NODE_SCOPE)


def test_the_spy_sees_a_query_that_runs(spied):
    eng, spy = spied
    eng.answer(request(GOOD, 0.1, query_id="control"))
    assert spy.uses == 1
    assert _spent(eng) == (100_000, 100_000)


REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "malformed query id": ({"query_id": "bad id\n"}, "invalid_request"),
    "malformed project id": ({"project": "BAD"}, "invalid_request"),
    "unknown project": ({"project": "nope"}, "unknown_project"),
    "ε zero": ({"epsilon": 0.0}, "invalid_epsilon"),
    "ε minus zero": ({"epsilon": -0.0}, "invalid_epsilon"),
    "ε negative": ({"epsilon": -0.1}, "invalid_epsilon"),
    "ε NaN": ({"epsilon": math.nan}, "invalid_epsilon"),
    "ε infinite": ({"epsilon": math.inf}, "invalid_epsilon"),
    "ε enormous": ({"epsilon": 1e300}, "invalid_epsilon"),
    "ε above the per-query cap": ({"epsilon": 0.2}, "out_of_scope"),
    "ε split impossible": ({"sql": SIXTEEN_MEANS, "epsilon": 0.00002}, "invalid_epsilon"),
    "not SQL": ({"sql": "how many?"}, "invalid_request"),
    "unsupported SQL": ({"sql": "SELECT * FROM patients"}, "unsupported_query"),
    "escape attempt": ({"sql": "SELECT COUNT(*) FROM read_csv('/etc/passwd')"}, None),
    "unknown view": ({"sql": "SELECT COUNT(*) FROM labs"}, "unknown_view"),
    "unknown column": ({"sql": "SELECT COUNT(*) FROM patients WHERE postcode = 'x'"}, None),
    "value outside the domain": (
        {"sql": "SELECT COUNT(*) FROM patients WHERE sex = 'x'"},
        "invalid_value",
    ),
    "view outside the project": ({"sql": "SELECT COUNT(*) FROM visits"}, "out_of_scope"),
    "cohort outside the project": (
        {"sql": "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM visits)"},
        "out_of_scope",
    ),
    "value above the tier": (
        {"sql": "SELECT COUNT(*) FROM conditions WHERE condition_group = 'self_harm'"},
        "out_of_scope",
    ),
    "value above the tier, negated": (
        {"sql": "SELECT COUNT(*) FROM conditions WHERE condition_group <> 'eating_disorder'"},
        "out_of_scope",
    ),
}


@pytest.mark.parametrize(("fields", "refusal"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_never_touch_the_data(spied, fields: dict[str, Any], refusal: str | None):
    eng, spy = spied
    sql = fields.get("sql", GOOD)
    req = QueryRequest(
        query_id=fields.get("query_id", "refused-1"),
        project_id=fields.get("project", "study"),
        sql=sql,
        epsilon=fields.get("epsilon", 0.1),
        caller="test",
    )
    with pytest.raises(QueryRefused) as info:
        eng.answer(req)
    if refusal is not None:
        assert info.value.refusal.value == refusal
    assert spy.uses == 0
    assert _spent(eng) == (0, 0)
    assert eng.ledger.debits() == []
    events = [r["event"] for r in read_audit(eng.config.audit_path)]
    assert events[-2:] == ["query.received", "query.refused"]


def test_budget_refusals_never_touch_the_data(spied):
    eng, spy = spied
    eng.answer(request(GOOD, 0.1, query_id="a"))
    eng.answer(request(GOOD, 0.1, query_id="b"))
    assert spy.uses == 2
    with pytest.raises(UserError) as info:  # the project's budget
        eng.answer(request(GOOD, 0.1, query_id="c"))
    assert info.value.refusal.value == "budget_exhausted"
    assert spy.uses == 2 and _spent(eng) == (200_000, 200_000)


def test_query_id_conflict_never_touches_the_data(spied):
    eng, spy = spied
    eng.answer(request(GOOD, 0.1, query_id="same"))
    with pytest.raises(UserError) as info:
        eng.answer(request("SELECT COUNT(*) AS n FROM patients", 0.1, query_id="same"))
    assert info.value.refusal.value == "query_id_conflict"
    assert spy.uses == 1 and _spent(eng) == (100_000, 100_000)
    eng.answer(request(GOOD, 0.1, query_id="same"))  # a true retry replays, reading nothing
    assert spy.uses == 1


def test_a_caller_that_has_gone_or_cannot_wait_costs_nothing(spied):
    eng, spy = spied
    with pytest.raises(CallerGone):
        eng.answer_detail(request(GOOD, 0.1, query_id="gone"), cancelled=lambda: True)
    with pytest.raises(UserError) as info:
        eng.answer_detail(request(GOOD, 0.1, query_id="hurry"), time_left=0.0)
    assert info.value.refusal.value == "deadline_too_short"
    assert spy.uses == 0 and _spent(eng) == (0, 0)


def test_the_minimum_epsilon_is_refused_below_and_accepted_at(node_config_factory):
    eng = NodeEngine(node_config_factory(min_epsilon_per_query=0.001))
    try:
        with pytest.raises(UserError) as info:
            eng.answer(request(GOOD, 0.000999, query_id="tiny"))
        assert info.value.refusal.value == "invalid_epsilon"
        assert "minimum of 0.001" in info.value.message
        assert _spent(eng) == (0, 0)
        assert eng.answer(request(GOOD, 0.001, query_id="smallest")).epsilon_units == 1000
    finally:
        eng.close()


def test_a_node_without_a_minimum_in_its_config_refuses_below_a_thousandth(tmp_path, node_db):
    from node.config import parse_node_config

    config = parse_node_config(
        {
            "node_id": "n",
            "database": str(private_database(tmp_path, node_db)),
            "state_dir": str(tmp_path / "state"),
            "node_epsilon_ceiling": 10.0,
            "projects": {},
        },
        tmp_path,
        "test",
    )
    assert config.min_units_per_query == 1000
    assert config.answer_slot_ms == 500  # and the answer slot is on

"""The privacy budget under concurrency, retries, refusals, auditing and audit failure.

Every test drives a real ``NodeEngine`` (SQLite ledger, DuckDB database, OpenDP noise) on the
session's synthetic trust.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import sqlite3
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtre.audit.events import Event
from fedtre.audit.log import read_audit
from fedtre.audit.verify import verify
from fedtre.errors import InternalError, UserError
from fedtre.request import QueryRequest
from fedtre.result import NodeResult
from node.config import load_node_config
from node.engine import NodeEngine
from node.errors import AuditUnavailable
from node.ledger import NODE_SCOPE, Ledger, project_scope
from tests.conftest import private_database, request, write_node_config
from tests.integration._node_workers import budget_worker
from tests.integration.full_disk import fill, settle, small_filesystem

GOOD = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
OTHER = "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band"
TENTH = 100_000  # ε 0.1 in ledger units
OUTCOME_EVENTS = {"query.released", "query.refused", "query.replayed", "query.failed"}


def _spent(engine: NodeEngine, project: str = "study") -> tuple[int, int]:
    return engine.ledger.spent(project_scope(project)), engine.ledger.spent(NODE_SCOPE)


def _race(fn: Callable[[int], Any], n: int) -> list[Any]:
    """Run ``fn(i)`` for i in range(n) on n threads released together by a barrier.

    Returns each call's result or the exception it raised.
    """
    barrier = threading.Barrier(n)
    outcomes: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait(timeout=60)
        try:
            outcomes[i] = fn(i)
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a racing thread hung"
    return outcomes


def _split(outcomes: list[Any]) -> tuple[list[NodeResult], list[UserError]]:
    ok = [o for o in outcomes if isinstance(o, NodeResult)]
    refused = [o for o in outcomes if isinstance(o, UserError)]
    other = [o for o in outcomes if not isinstance(o, NodeResult | UserError)]
    assert not other, f"unexpected outcomes: {other!r}"
    return ok, refused


def _two_project_config(directory: Path, database: Path, ceiling: float) -> Path:
    database = private_database(directory, database)
    path = directory / "node.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            node_id = "trust-two"
            database = "{database}"
            state_dir = "{directory / "state"}"
            node_epsilon_ceiling = {ceiling}

            [projects.alpha]
            total_epsilon = 1.0
            max_epsilon_per_query = 0.1
            views = ["patients", "visits"]
            max_tier = "general"

            [projects.beta]
            total_epsilon = 1.0
            max_epsilon_per_query = 0.1
            views = ["patients"]
            max_tier = "general"
            """
        )
    )
    return path


# --- racing for the last of the budget ---------------------------------------------------------


def test_32_threads_race_for_a_budget_of_exactly_10(node_config_factory):
    eng = NodeEngine(node_config_factory(total_epsilon=1.0, max_epsilon_per_query=0.1))
    try:
        outcomes = _race(lambda i: eng.answer(request(GOOD, 0.1, query_id=f"race-{i}")), 32)
        ok, refused = _split(outcomes)
        assert len(ok) == 10
        assert len(refused) == 22
        assert {e.refusal.value for e in refused} == {"budget_exhausted"}
        assert _spent(eng) == (10 * TENTH, 10 * TENTH)
        releases = eng.ledger.releases()
        assert len(releases) == 10
        assert {r.query_id for r in releases} == {r.query_id for r in ok}
        assert all(r.units == TENTH for r in releases)
        status = eng.budget("study")
        assert status.remaining_units == 0
        assert status.spent_units == 1_000_000
        # the winners' answers are exactly what was stored
        stored = {r.query_id: r.result for r in releases}
        for result in ok:
            assert NodeResult.from_json(stored[result.query_id]) == result
    finally:
        eng.close()


def test_ledger_guard_holds_when_every_thread_passed_the_budget_check(node_config_factory):
    """Hold all 32 threads just before the ledger's reservation, after each has passed every
    check the engine makes first: the conditional debit alone must let exactly 10 through."""
    eng = NodeEngine(node_config_factory(total_epsilon=1.0, max_epsilon_per_query=0.1))
    original_reserve = eng.ledger.reserve
    at_reserve = threading.Barrier(32)

    def reserve(*args: Any, **kwargs: Any):
        at_reserve.wait(timeout=60)
        return original_reserve(*args, **kwargs)

    eng.ledger.reserve = reserve  # type: ignore[method-assign]
    try:
        outcomes = _race(lambda i: eng.answer(request(GOOD, 0.1, query_id=f"guard-{i}")), 32)
        ok, refused = _split(outcomes)
        assert len(ok) == 10
        assert [e.refusal.value for e in refused] == ["budget_exhausted"] * 22
        assert _spent(eng) == (10 * TENTH, 10 * TENTH)
        assert {r.query_id for r in eng.ledger.releases()} == {r.query_id for r in ok}
    finally:
        eng.close()


def test_4_processes_race_for_a_budget_of_exactly_10(tmp_path, node_db):
    config_path = write_node_config(
        tmp_path / "node", node_db, total_epsilon=1.0, max_epsilon_per_query=0.1
    )
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=budget_worker,
            args=(str(config_path), w, 8, GOOD, 0.1, barrier, results),
        )
        for w in range(4)
    ]
    for p in procs:
        p.start()
    collected: dict[int, list[tuple[str, str, str]]] = {}
    try:
        for _ in procs:
            worker, outcomes = results.get(timeout=120)
            collected[worker] = outcomes
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    flat = [o for outs in collected.values() for o in outs]
    assert len(flat) == 32
    errors = [o for o in flat if o[1] == "error"]
    assert not errors
    ok = {qid for qid, outcome, _ in flat if outcome == "ok"}
    refused = [detail for _, outcome, detail in flat if outcome == "refused"]
    assert len(ok) == 10
    assert refused == ["budget_exhausted"] * 22

    ledger = Ledger(load_node_config(config_path).ledger_path)
    assert ledger.spent(project_scope("study")) == 10 * TENTH
    assert ledger.spent(NODE_SCOPE) == 10 * TENTH
    releases = ledger.releases()
    assert {r.query_id for r in releases} == ok
    assert sum(r.units for r in releases) == 10 * TENTH


def test_node_ceiling_stops_the_second_project(tmp_path, node_db):
    config = load_node_config(_two_project_config(tmp_path / "two", node_db, ceiling=1.5))
    eng = NodeEngine(config)
    try:
        for i in range(10):
            eng.answer(request(GOOD, 0.1, query_id=f"a-{i}", project="alpha"))
        assert eng.budget("alpha").remaining_units == 0
        beta = eng.budget("beta")
        assert beta.spent_units == 0
        assert beta.remaining_units == 5 * TENTH  # the node ceiling, not beta's own 1.0
        for i in range(5):
            eng.answer(request(GOOD, 0.1, query_id=f"b-{i}", project="beta"))
        with pytest.raises(UserError) as info:
            eng.answer(request(GOOD, 0.1, query_id="b-5", project="beta"))
        assert info.value.refusal.value == "budget_exhausted"
        assert "overall" in info.value.message  # the node-wide message, not the project's
        assert _spent(eng, "alpha") == (10 * TENTH, 15 * TENTH)
        assert _spent(eng, "beta") == (5 * TENTH, 15 * TENTH)
        assert eng.budget("beta").remaining_units == 0
        assert len(eng.ledger.releases("beta")) == 5
        # even the smallest query the node accepts is refused once the ceiling is reached
        with pytest.raises(UserError) as info:
            eng.answer(request(GOOD, 0.001, query_id="b-tiny", project="beta"))
        assert info.value.refusal.value == "budget_exhausted"
    finally:
        eng.close()
    # the ceiling survives a restart: it is in the durable ledger
    eng = NodeEngine(config)
    try:
        assert eng.budget("beta").remaining_units == 0
        with pytest.raises(UserError) as info:
            eng.answer(request(GOOD, 0.1, query_id="b-after-restart", project="beta"))
        assert info.value.refusal.value == "budget_exhausted"
    finally:
        eng.close()


def test_two_projects_race_for_the_node_ceiling(tmp_path, node_db):
    config = load_node_config(_two_project_config(tmp_path / "two", node_db, ceiling=1.5))
    eng = NodeEngine(config)
    try:
        projects = ["alpha", "beta"] * 16
        outcomes = _race(
            lambda i: eng.answer(request(GOOD, 0.1, query_id=f"n-{i}", project=projects[i])), 32
        )
        ok, refused = _split(outcomes)
        assert len(ok) == 15
        assert {e.refusal.value for e in refused} == {"budget_exhausted"}
        alpha = eng.ledger.spent(project_scope("alpha"))
        beta = eng.ledger.spent(project_scope("beta"))
        assert alpha <= 10 * TENTH and beta <= 10 * TENTH
        assert alpha + beta == eng.ledger.spent(NODE_SCOPE) == 15 * TENTH
        assert sum(r.units for r in eng.ledger.releases()) == 15 * TENTH
    finally:
        eng.close()


# --- retries -----------------------------------------------------------------------------------


def test_retry_returns_identical_result_and_debits_once(node_config_factory):
    eng = NodeEngine(node_config_factory(total_epsilon=0.1, max_epsilon_per_query=0.1))
    try:
        first = eng.answer(request(GOOD, 0.1, query_id="retry-1"))
        second = eng.answer(request(GOOD, 0.1, query_id="retry-1"))
        assert second == first
        assert _spent(eng) == (TENTH, TENTH)
        assert len(eng.ledger.releases()) == 1
        # the budget is now used up, and still the retry gets its stored answer
        with pytest.raises(UserError) as info:
            eng.answer(request(GOOD, 0.1, query_id="retry-2"))
        assert info.value.refusal.value == "budget_exhausted"
        assert eng.answer(request(GOOD, 0.1, query_id="retry-1")) == first
        assert _spent(eng) == (TENTH, TENTH)
        events = [
            r["event"] for r in read_audit(eng.config.audit_path) if r.get("query_id") == "retry-1"
        ]
        first_time = ["query.received", "query.reserved", "query.prepared"]
        first_time += ["query.commit", "query.released"]
        again = ["query.received", "query.commit", "query.replayed"]
        assert events == first_time + again * 2
    finally:
        eng.close()
    # a fresh engine (restart) replays the same stored answer
    eng = NodeEngine(eng.config)
    try:
        assert eng.answer(request(GOOD, 0.1, query_id="retry-1")) == first
        assert _spent(eng) == (TENTH, TENTH)
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("sql", "epsilon"),
    [(OTHER, 0.1), (GOOD, 0.05), ("SELECT COUNT(*) AS n FROM patients", 0.1)],
    ids=["other-sql", "other-epsilon", "other-shape"],
)
def test_same_id_different_request_is_refused_and_spends_nothing(engine, sql, epsilon):
    first = engine.answer(request(GOOD, 0.1, query_id="dup"))
    before = _spent(engine)
    with pytest.raises(UserError) as info:
        engine.answer(request(sql, epsilon, query_id="dup"))
    assert info.value.refusal.value == "query_id_conflict"
    assert _spent(engine) == before
    assert len(engine.ledger.releases()) == 1
    assert engine.answer(request(GOOD, 0.1, query_id="dup")) == first


def test_query_ids_are_per_project(tmp_path, node_db):
    """One project can neither block another's query id nor get its stored answer."""
    eng = NodeEngine(load_node_config(_two_project_config(tmp_path / "two", node_db, 1.5)))
    try:
        alpha = eng.answer(request(GOOD, 0.1, query_id="shared", project="alpha"))
        beta = eng.answer(request(GOOD, 0.1, query_id="shared", project="beta"))
        assert beta.project_id == "beta" and alpha.project_id == "alpha"
        assert beta.aggregates != alpha.aggregates  # its own fresh noise, not alpha's answer
        assert eng.ledger.spent(project_scope("alpha")) == TENTH
        assert eng.ledger.spent(project_scope("beta")) == TENTH
        assert eng.ledger.spent(NODE_SCOPE) == 2 * TENTH
        # and each project's retry replays its own answer
        assert eng.answer(request(GOOD, 0.1, query_id="shared", project="alpha")) == alpha
        assert eng.answer(request(GOOD, 0.1, query_id="shared", project="beta")) == beta
        assert eng.ledger.spent(NODE_SCOPE) == 2 * TENTH
    finally:
        eng.close()


def test_concurrent_retries_of_a_new_id_are_debited_once(engine):
    outcomes = _race(lambda i: engine.answer(request(GOOD, 0.1, query_id="burst")), 8)
    ok, refused = _split(outcomes)
    assert not refused
    assert len(ok) == 8
    assert all(r == ok[0] for r in ok)
    assert _spent(engine) == (TENTH, TENTH)
    (stored,) = engine.ledger.releases()
    assert NodeResult.from_json(stored.result) == ok[0]
    events = [
        r["event"] for r in read_audit(engine.config.audit_path) if r.get("query_id") == "burst"
    ]
    assert events.count("query.received") == 8
    assert events.count("query.released") == 1
    assert events.count("query.replayed") == 7


def test_retry_racing_the_original_for_the_last_budget_gets_the_stored_answer(
    node_config_factory,
):
    """A retry that arrives while the original is still running, when the original takes the
    last of the budget, must get the stored answer (engine step 3), not a budget refusal.

    The interleaving is forced: the retry looks the id up (not stored yet), then the original
    commits, then the retry carries on.
    """
    eng = NodeEngine(node_config_factory(total_epsilon=0.1, max_epsilon_per_query=0.1))
    original_entry = eng.ledger.entry
    retry_looked = threading.Event()
    original_done = threading.Event()

    def entry(project_id: str, query_id: str):
        stored = original_entry(project_id, query_id)
        if threading.current_thread().name == "retry" and stored is None:
            retry_looked.set()
            original_done.wait(timeout=30)
        return stored

    eng.ledger.entry = entry  # type: ignore[method-assign]
    outcome: dict[str, Any] = {}

    def retry() -> None:
        try:
            outcome["retry"] = eng.answer(request(GOOD, 0.1, query_id="last"))
        except BaseException as exc:
            outcome["retry"] = exc

    try:
        thread = threading.Thread(target=retry, name="retry")
        thread.start()
        assert retry_looked.wait(timeout=30)
        original = eng.answer(request(GOOD, 0.1, query_id="last"))
        original_done.set()
        thread.join(timeout=60)
        assert _spent(eng) == (TENTH, TENTH)
        assert outcome["retry"] == original, f"retry got {outcome['retry']!r}"
    finally:
        original_done.set()
        eng.close()


# --- refusals spend nothing --------------------------------------------------------------------

REFUSALS = {
    "unknown_project": (dict(project="nope"), "unknown_project"),
    "over_per_query_cap": (dict(epsilon=0.6), "out_of_scope"),
    "zero_epsilon": (dict(epsilon=0.0), "invalid_epsilon"),
    "negative_epsilon": (dict(epsilon=-0.1), "invalid_epsilon"),
    "nan_epsilon": (dict(epsilon=math.nan), "invalid_epsilon"),
    "inf_epsilon": (dict(epsilon=math.inf), "invalid_epsilon"),
    "minus_inf_epsilon": (dict(epsilon=-math.inf), "invalid_epsilon"),
    "string_epsilon": (dict(epsilon="0.1"), "invalid_epsilon"),
    "select_star": (dict(sql="SELECT * FROM patients"), "unsupported_query"),
    "drop_table": (dict(sql="DROP TABLE patients"), "unsupported_query"),
    "not_sql": (dict(sql="how many patients?"), "invalid_request"),
    "unknown_view": (dict(sql="SELECT COUNT(*) FROM labs"), "unknown_view"),
    "out_of_scope_view": (dict(sql="SELECT COUNT(*) FROM conditions"), "out_of_scope"),
    "out_of_scope_cohort": (
        dict(
            sql="SELECT COUNT(*) FROM patients WHERE person_id IN "
            "(SELECT person_id FROM conditions)"
        ),
        "out_of_scope",
    ),
    "out_of_scope_tier": (
        dict(sql="SELECT mental_health, COUNT(*) FROM visits GROUP BY mental_health"),
        "out_of_scope",
    ),
    "bad_query_id": (dict(query_id="bad id\n"), "invalid_request"),
}


@pytest.fixture
def scoped_engine(node_config_factory):
    eng = NodeEngine(
        node_config_factory(
            total_epsilon=1.0,
            max_epsilon_per_query=0.5,
            views=("patients", "visits"),
            max_tier="general",
        )
    )
    yield eng
    eng.close()


def test_every_refusal_spends_nothing_and_the_node_keeps_serving(scoped_engine):
    eng = scoped_engine
    eng.answer(request(GOOD, 0.1, query_id="warm-up"))
    for n, (name, (changes, refusal)) in enumerate(sorted(REFUSALS.items())):
        fields = {"query_id": f"refused-{n}", "project_id": "study", "sql": GOOD, "epsilon": 0.1}
        if "project" in changes:
            fields["project_id"] = changes["project"]
        for key in ("sql", "epsilon", "query_id"):
            if key in changes:
                fields[key] = changes[key]
        before_spent = _spent(eng)
        before_releases = eng.ledger.releases()
        with pytest.raises(UserError) as info:
            eng.answer(QueryRequest(caller="test", **fields))  # type: ignore[arg-type]
        assert info.value.refusal.value == refusal, name
        assert _spent(eng) == before_spent, name
        assert eng.ledger.releases() == before_releases, name
        if isinstance(fields["query_id"], str) and "\n" not in fields["query_id"]:
            # nothing stored under the refused id: it can still be used for a good query
            assert eng.ledger.lookup("study", fields["query_id"]) is None, name
        ok = eng.answer(request(GOOD, 0.01, query_id=f"after-{n}"))
        assert ok.epsilon_units == 10_000
    assert _spent(eng)[0] == TENTH + len(REFUSALS) * 10_000


def test_budget_refusal_spends_nothing(node_config_factory):
    eng = NodeEngine(node_config_factory(total_epsilon=0.25, max_epsilon_per_query=0.1))
    try:
        eng.answer(request(GOOD, 0.1, query_id="b1"))
        eng.answer(request(GOOD, 0.1, query_id="b2"))
        with pytest.raises(UserError) as info:
            eng.answer(request(GOOD, 0.1, query_id="b3"))
        assert info.value.refusal.value == "budget_exhausted"
        assert _spent(eng) == (2 * TENTH, 2 * TENTH)
        assert eng.ledger.lookup("study", "b3") is None
        # what is left can still be spent, exactly
        eng.answer(request(GOOD, 0.05, query_id="b3"))
        assert _spent(eng) == (250_000, 250_000)
        assert eng.budget("study").remaining_units == 0
    finally:
        eng.close()


# --- the audit log -----------------------------------------------------------------------------

ENTRY_KEYS = {"seq", "ts", "node", "event", "query_id", "project", "caller", "epsilon_units"}
RELEASED_KEYS = ENTRY_KEYS | {"release"}
REPLAYED_KEYS = ENTRY_KEYS | {"released_at"}
# Numbers an entry may hold: none of them is a value of the data. ``cells`` is the number of
# groups, fixed by the catalog's domains before the data is read; bounds are public.
NUMERIC_KEYS = {
    "seq",
    "epsilon",
    "epsilon_units",
    "record",
    "cells",
    "lower",
    "upper",
    "sensitivity",
    "noise_scale",
    "size",
}
RELEASE_RECORD_KEYS = {
    "record",
    "software",
    "catalog_version",
    "reference_date",
    "data_as_of",
    "approval",
    "plan",
    "view",
    "group_by",
    "cells",
    "epsilon_units",
    "released_at",
    "aggregates",
}


def _numbers(record: Any, key: str = "") -> list[tuple[str, Any]]:
    """Every number anywhere in a record, with the key it sits under."""
    if isinstance(record, bool):
        return []
    if isinstance(record, int | float):
        return [(key, record)]
    if isinstance(record, dict):
        return [n for k, v in record.items() for n in _numbers(v, k)]
    if isinstance(record, list):
        return [n for v in record for n in _numbers(v, key)]
    return []


def _keys(record: Any) -> set[str]:
    """Every key anywhere in a record."""
    if isinstance(record, dict):
        return set(record) | {k for v in record.values() for k in _keys(v)}
    if isinstance(record, list):
        return {k for v in record for k in _keys(v)}
    return set()


def _check_audit_order(log: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each outcome line of a query id must follow a received line not yet answered."""
    pending: dict[str, int] = {}
    events: dict[str, list[str]] = {}
    for record in log:
        event = record["event"]
        if event == "query.received":
            pending[record["query_id"]] = pending.get(record["query_id"], 0) + 1
        elif event in OUTCOME_EVENTS:
            qid = record["query_id"]
            assert pending.get(qid, 0) > 0, f"{event} for {qid} before query.received"
            pending[qid] -= 1
        else:
            continue
        events.setdefault(record["query_id"], []).append(event)
    assert not {q: n for q, n in pending.items() if n}, "received but never answered"
    return events


def test_audit_log_records_before_acting_and_holds_no_values(node_config_factory):
    eng = NodeEngine(node_config_factory(total_epsilon=0.5, max_epsilon_per_query=0.1))
    try:
        eng.answer(request(GOOD, 0.1, query_id="a-release"))
        eng.answer(request(GOOD, 0.1, query_id="a-release"))  # replay
        eng.answer(
            request(
                "SELECT visit_type, AVG(length_of_stay) AS los FROM visits GROUP BY visit_type",
                0.1,
                query_id="a-avg",
            )
        )
        refusals = {
            "a-conflict": request(OTHER, 0.1, query_id="a-release"),
            "a-bad-sql": request("SELECT * FROM patients", 0.1, query_id="a-bad-sql"),
            "a-project": request(GOOD, 0.1, query_id="a-project", project="nope"),
            "a-eps": request(GOOD, math.nan, query_id="a-eps"),
        }
        codes = {}
        for name, req in refusals.items():
            with pytest.raises(UserError) as info:
                eng.answer(req)
            codes[name] = (info.value.refusal.value, info.value.message)
        _race(lambda i: eng.answer(request(GOOD, 0.1, query_id=f"a-race-{i}")), 6)
    finally:
        eng.close()

    log = read_audit(eng.config.audit_path)
    events = _check_audit_order(log)
    assert events["a-release"] == [
        "query.received",
        "query.released",
        "query.received",
        "query.replayed",
        "query.received",
        "query.refused",
    ]
    race = [e for q, evs in events.items() if q.startswith("a-race-") for e in evs]
    assert race.count("query.released") == 3  # 0.5 total: 2 spent above, 3 left
    assert race.count("query.refused") == 3

    refused = [r for r in log if r["event"] == "query.refused"]
    by_id = {r["query_id"]: r for r in refused}
    assert by_id["a-release"]["refusal"] == "query_id_conflict"
    assert by_id["a-bad-sql"]["refusal"] == codes["a-bad-sql"][0] == "unsupported_query"
    assert by_id["a-bad-sql"]["reason"] == codes["a-bad-sql"][1]
    assert by_id["a-project"]["refusal"] == "unknown_project"
    assert by_id["a-eps"]["refusal"] == "invalid_epsilon"
    for r in refused:
        assert r["refusal"] and r["reason"]

    for record in log:
        assert not {"values", "result", "noise_std"} & _keys(record), record
        for key, _ in _numbers(record):
            assert key in NUMERIC_KEYS, f"number under {key!r} in {record}"
        if record["event"] == "query.released":
            assert set(record) == RELEASED_KEYS, record
            assert set(record["release"]) == RELEASE_RECORD_KEYS, record
        if record["event"] == "query.replayed":
            assert set(record) == REPLAYED_KEYS, record
    released_units = [r["epsilon_units"] for r in log if r["event"] == "query.released"]
    assert all(u == TENTH for u in released_units)
    assert all(r["epsilon_units"] == 0 for r in log if r["event"] == "query.replayed")


def test_every_release_appears_in_the_audit_log_with_its_cost(engine):
    for i in range(5):
        engine.answer(request(GOOD, 0.01 * (i + 1), query_id=f"cost-{i}"))
    log = read_audit(engine.config.audit_path)
    released = {r["query_id"]: r["epsilon_units"] for r in log if r["event"] == "query.released"}
    assert released == {r.query_id: r.units for r in engine.ledger.releases()}
    assert sum(released.values()) == engine.ledger.spent(project_scope("study"))


# --- failing closed when the audit log cannot be written ---------------------------------------


def test_a_full_disk_fails_closed_and_the_node_resumes_when_space_returns(tmp_path, node_db):
    """A real full disk (a small tmpfs under the state directory): nothing is released or
    debited while the log cannot be written, and once space returns the node serves again and
    its log verifies."""
    directory = tmp_path / "full"
    path = write_node_config(directory, node_db)
    with small_filesystem(directory / "state"):
        eng = NodeEngine(load_node_config(path))
        try:
            eng.answer(request(GOOD, 0.1, query_id="before"))
            before = _spent(eng)
            settle(eng.config.ledger_path)
            filler = fill(directory / "state")
            with pytest.raises(InternalError):
                eng.answer(request(GOOD, 0.1, query_id="unaudited"))
            with pytest.raises(InternalError):  # a retry of a stored id is not served either
                eng.answer(request(GOOD, 0.1, query_id="before"))
            assert _spent(eng) == before
            assert eng.ledger.lookup("study", "unaudited") is None
            assert len(eng.ledger.releases()) == 1
            filler.unlink()  # space returns
            assert verify(eng.config.audit_path).ok
            assert eng.answer(request(GOOD, 0.1, query_id="unaudited")).query_id == "unaudited"
            assert _spent(eng) == (before[0] + TENTH, before[1] + TENTH)
        finally:
            eng.close()
        log = read_audit(eng.config.audit_path)
        released = [r["query_id"] for r in log if r["event"] == "query.released"]
        assert released == ["before", "unaudited"]
        assert verify(eng.config.audit_path).ok


def test_a_full_disk_at_start_stops_the_node(tmp_path, node_db):
    directory = tmp_path / "full"
    path = write_node_config(directory, node_db)
    with small_filesystem(directory / "state"):
        fill(directory / "state")
        with pytest.raises(InternalError):
            NodeEngine(load_node_config(path))


@contextlib.contextmanager
def _release_entry_fails(eng: NodeEngine) -> Iterator[None]:
    """The audit entry of a release cannot be written (SQLite's own full-disk error, raised
    where the entry is appended inside the ledger's commit)."""
    original = eng.audit._append

    def append(con: Any, event: Event, fields: dict[str, Any]) -> int:
        if event is Event.QUERY_RELEASED:
            raise sqlite3.OperationalError("database or disk is full")
        return original(con, event, fields)

    eng.audit._append = append  # type: ignore[method-assign]
    try:
        yield
    finally:
        del eng.audit._append


def test_a_release_whose_audit_entry_fails_is_not_committed(engine):
    """The release's audit entry and the ledger's final debit are one transaction: if the
    entry cannot be written, nothing is released and the debit is not final (the reservation
    stays prepared until a retry commits it, or its lease refunds it)."""
    with _release_entry_fails(engine), pytest.raises(AuditUnavailable):
        engine.answer(request(GOOD, 0.1, query_id="late-fail"))
    assert engine.ledger.releases() == []
    held = engine.ledger.entry("study", "late-fail")
    assert held is not None and held.state.value == "prepared"
    assert not [r for r in read_audit(engine.config.audit_path) if r["event"] == "query.released"]
    # the retry commits the prepared answer once; the log then holds exactly one release
    first = engine.answer(request(GOOD, 0.1, query_id="late-fail"))
    again = engine.answer(request(GOOD, 0.1, query_id="late-fail"))
    assert first == again
    assert _spent(engine) == (TENTH, TENTH)
    log = read_audit(engine.config.audit_path)
    released = [r for r in log if r["event"] == "query.released"]
    assert [(r["query_id"], r["epsilon_units"]) for r in released] == [("late-fail", TENTH)]
    replayed = [r for r in log if r["event"] == "query.replayed"]
    assert [r["epsilon_units"] for r in replayed] == [0]
    assert verify(engine.config.audit_path).ok


def _strict_json(line: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_audit_log_lines_are_strict_json_even_for_nan_or_infinite_epsilon(engine):
    """Audit entries are strict JSON for other tools to read: a request with ε = NaN or ±inf
    must not write the non-JSON tokens ``NaN`` / ``Infinity`` into one."""
    for i, epsilon in enumerate([math.nan, math.inf, -math.inf]):
        with pytest.raises(UserError):
            engine.answer(request(GOOD, epsilon, query_id=f"strict-{i}"))
    con = sqlite3.connect(engine.config.audit_path)
    lines = [row[0] for row in con.execute("SELECT entry FROM audit_log")]
    con.close()
    bad = []
    for line in lines:
        try:
            _strict_json(line)
        except ValueError:
            bad.append(line)
    assert not bad, bad

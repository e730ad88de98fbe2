"""What must be on disk before a node answers: one durable commit per release.

* the audit log lives in the ledger's database: each change of a query id's state commits
  together with its audit entry; a release's entry is in the ledger's commit, the one
  ``synchronous=FULL`` transaction (its write-ahead-log fsync also makes every earlier entry
  and the reservation durable);
* request entries are committed (in the write-ahead log, surviving a crash of the process)
  before anything is acted on, without waiting for the disk; a refusal's entry is durable
  (FULL) before the refusal is returned;
* the planner's caches never serve one project's plan to another.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fedtre.errors import QueryRefused
from node.config import load_node_config
from node.engine import NodeEngine
from tests.conftest import private_database, request

GOOD = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


class _SyncSpy:
    """Wraps a SQLite connection: notes the synchronous mode each write ran under."""

    def __init__(self, con) -> None:  # type: ignore[no-untyped-def]
        self.con = con
        self.mode = None
        self.writes: list[tuple[str, str | None]] = []

    def execute(self, sql: str, *args):  # type: ignore[no-untyped-def]
        text = " ".join(sql.split()).upper()
        if text.startswith("PRAGMA SYNCHRONOUS="):
            self.mode = text.split("=", 1)[1]
        elif text.startswith(("INSERT OR REPLACE INTO QUERIES", "UPDATE QUERIES SET STATE")):
            self.writes.append((text.split(" (")[0].split(",")[0].split(" WHERE")[0], self.mode))
        elif text.startswith("INSERT INTO AUDIT_LOG"):
            self.writes.append((json.loads(args[0][1])["event"], self.mode))
        return self.con.execute(sql, *args)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.con, name)


def _spies(engine: NodeEngine) -> tuple[_SyncSpy, _SyncSpy]:
    ledger = _SyncSpy(engine.ledger._con())
    engine.ledger._local.con = ledger
    audit = _SyncSpy(engine.audit._con())
    engine.audit._local.con = audit
    return ledger, audit


def test_a_release_is_one_durable_commit_with_its_audit_entry(engine):
    ledger, audit = _spies(engine)
    engine.answer(request(GOOD, 0.1, query_id="q-sync"))
    assert ledger.writes == [
        ("INSERT OR REPLACE INTO QUERIES", "NORMAL"),  # reserve
        ("query.reserved", "NORMAL"),
        ("UPDATE QUERIES SET STATE = 'PREPARED'", "NORMAL"),  # the answer, kept unreleased
        ("query.prepared", "NORMAL"),
        ("UPDATE QUERIES SET STATE = 'COMMITTED'", "FULL"),  # release: the one fsync
        ("query.released", "FULL"),  # ... in the same transaction
    ]
    # the request entries are committed before acting, and made durable by the release
    assert audit.writes == [("query.received", "NORMAL"), ("query.commit", "NORMAL")]


def test_a_refusal_is_durable_before_it_is_returned(engine):
    ledger, audit = _spies(engine)
    with pytest.raises(QueryRefused):
        engine.answer(request("SELECT * FROM patients", 0.1, query_id="q-refused"))
    assert ledger.writes == []  # nothing reserved
    assert audit.writes == [("query.received", "NORMAL"), ("query.refused", "FULL")]


def _projects_config(directory: Path, database: Path) -> Path:
    database = private_database(directory, database)
    path = directory / "node.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            node_id = "trust-cache"
            database = "{database}"
            state_dir = "{directory / "state"}"
            node_epsilon_ceiling = 100.0
            answer_slot_ms = 0

            [projects.high]
            total_epsilon = 10.0
            max_epsilon_per_query = 1.0
            views = ["patients", "conditions"]
            max_tier = "highly_sensitive"

            [projects.low]
            total_epsilon = 10.0
            max_epsilon_per_query = 1.0
            views = ["patients", "conditions"]
            max_tier = "mental_health"
            """
        )
    )
    return path


def test_the_plan_cache_never_serves_one_projects_plan_to_another(tmp_path, node_db):
    engine = NodeEngine(load_node_config(_projects_config(tmp_path, node_db)))
    try:
        groups = "SELECT condition_group, COUNT(*) AS n FROM conditions GROUP BY condition_group"
        high = engine.answer(request(groups, 0.5, query_id="h1", project="high"))
        low = engine.answer(request(groups, 0.5, query_id="l1", project="low"))
        # the same SQL, cached for the first project: the second sees its own tier's rows
        assert len(high.cells) == len(low.cells) + 2  # self_harm, eating_disorder
        assert ("self_harm",) not in low.cells
        named = "SELECT COUNT(*) AS n FROM conditions WHERE condition_group = 'self_harm'"
        engine.answer(request(named, 0.5, query_id="h2", project="high"))
        with pytest.raises(QueryRefused, match="approved"):
            engine.answer(request(named, 0.5, query_id="l2", project="low"))
        with pytest.raises(QueryRefused, match="approved"):  # and again, from the cache
            engine.answer(request(named, 0.5, query_id="l3", project="low"))
        assert (
            engine.ledger.lookup("low", "l2") is None and engine.ledger.lookup("low", "l3") is None
        )
    finally:
        engine.close()

"""What must be on disk before a node answers, with the fsyncs now shared or overlapped.

* the request's audit line: fsynced (by the audit log's flusher, while the data is read)
  before ``answer`` returns, for answers and refusals alike;
* the stored answer: committed with ``synchronous=FULL`` (its write-ahead-log fsync also makes
  the reservation durable), while the reservation itself does not wait for the disk;
* the planner's caches never serve one project's plan to another.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path

import pytest

import fedtre.audit as audit_module
from fedtre.errors import QueryRefused
from node.config import load_node_config
from node.engine import NodeEngine
from tests.conftest import private_database, request

GOOD = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
_real_fsync = os.fsync


class SlowDisk:
    """os.fsync that takes 300 ms (longer than answering) and records, per file, the size it
    covered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.covered: dict[tuple[int, int], int] = {}  # (device, inode) -> bytes durable

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        time.sleep(0.3)
        _real_fsync(fd)
        with self.lock:
            key = (st.st_dev, st.st_ino)
            self.covered[key] = max(self.covered.get(key, 0), st.st_size)

    def durable_bytes(self, path: Path) -> int:
        st = os.stat(path)
        return self.covered.get((st.st_dev, st.st_ino), 0)


def _line_end(path: Path, query_id: str, event: str) -> int:
    """Byte offset just after the audit line of ``event`` for ``query_id``."""
    data = path.read_bytes()
    offset = 0
    for line in data.splitlines(keepends=True):
        offset += len(line)
        if f'"query_id": "{query_id}"'.encode() in line and f'"{event}"'.encode() in line:
            return offset
    raise AssertionError(f"no {event} line for {query_id}")


@pytest.mark.parametrize(
    ("sql", "epsilon", "outcome"),
    [(GOOD, 0.1, "released"), ("SELECT * FROM patients", 0.1, "refused")],
)
def test_the_request_line_is_durable_before_the_node_answers(
    node_config_factory, monkeypatch, sql, epsilon, outcome
):
    disk = SlowDisk()
    monkeypatch.setattr(audit_module.os, "fsync", disk)
    engine = NodeEngine(node_config_factory())
    try:
        audit = engine.config.audit_path
        try:
            engine.answer(request(sql, epsilon, query_id="q-durable"))
        except QueryRefused:
            assert outcome == "refused"
        # checked the moment answer() came back, before close() flushes anything
        assert disk.durable_bytes(audit) >= _line_end(audit, "q-durable", "query.received")
        if outcome == "refused":
            assert disk.durable_bytes(audit) >= _line_end(audit, "q-durable", "query.refused")
    finally:
        engine.close()


class _SyncSpy:
    """Wraps the ledger's SQLite connection: notes the synchronous mode each write ran under."""

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
        return self.con.execute(sql, *args)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.con, name)


def test_the_commit_waits_for_the_disk_and_the_reservation_does_not(engine):
    spy = _SyncSpy(engine.ledger._con())
    engine.ledger._local.con = spy
    engine.answer(request(GOOD, 0.1, query_id="q-sync"))
    assert spy.writes == [
        ("INSERT OR REPLACE INTO QUERIES", "NORMAL"),  # reserve
        ("UPDATE QUERIES SET STATE = 'PREPARED'", "NORMAL"),  # the answer, kept unreleased
        ("UPDATE QUERIES SET STATE = 'COMMITTED'", "FULL"),  # release: the one fsync
    ]


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

"""A running node switches to a newly loaded database between queries (audited), so a new
opt-out list takes effect without a restart; a new file that fails the checks is refused loudly
and the node keeps serving the database it has."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import duckdb

from fedtre.audit.log import read_audit
from node.config import load_node_config
from node.engine import NodeEngine
from node.loader import load_omop
from tests.conftest import request, write_node_config

SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


def _persons(engine: NodeEngine) -> int:
    """Exact, for the test only: through the node's own connection, as a query would read."""
    with engine.database.reading() as cursor:
        return int(cursor.execute("SELECT COUNT(*) FROM patients").fetchone()[0])


def _events(engine: NodeEngine) -> list[str]:
    return [r["event"] for r in read_audit(engine.config.audit_path)]


def _opt_out(tmp_path: Path, omop_dir: Path, n: int) -> Path:
    ids = duckdb.sql(
        f"SELECT person_id FROM read_parquet('{omop_dir}/person*.parquet') ORDER BY 1 LIMIT {n}"
    ).fetchall()
    path = tmp_path / "opt_out.csv"
    path.write_text("person_id\n" + "".join(f"{i}\n" for (i,) in ids))
    return path


def test_a_new_load_with_an_opt_out_list_takes_effect_without_a_restart(
    tmp_path: Path, node_db: Path, omop_dir: Path, catalog
) -> None:  # type: ignore[no-untyped-def]
    config = load_node_config(write_node_config(tmp_path / "node", node_db))
    engine = NodeEngine(config)
    try:
        engine.answer(request(SQL, 0.1, query_id="before"))
        before = _persons(engine)
        load_omop(omop_dir, config.database, catalog, opt_out=_opt_out(tmp_path, omop_dir, 40))
        engine.answer(request(SQL, 0.1, query_id="after"))  # switches before reading
        assert _persons(engine) == before - 40
        assert "database.reloaded" in _events(engine)
        # the budget and stored answers are the node's, not the database's: unchanged
        assert engine.answer(request(SQL, 0.1, query_id="before")).query_id == "before"
    finally:
        engine.close()


def test_a_broken_new_database_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, node_db: Path
) -> None:
    config = load_node_config(write_node_config(tmp_path / "node", node_db))
    engine = NodeEngine(config)
    try:
        before = _persons(engine)
        broken = config.database.with_name("broken.tmp")
        broken.write_bytes(b"not a database")
        os.replace(broken, config.database)
        result = engine.answer(request(SQL, 0.1, query_id="still"))
        assert result.query_id == "still"
        assert _persons(engine) == before
        events = _events(engine)
        assert events.count("database.reload_refused") == 1  # judged once, not every query
        engine.answer(request(SQL, 0.1, query_id="still-2"))
        assert _events(engine).count("database.reload_refused") == 1
    finally:
        engine.close()


def test_queries_running_during_reloads_all_finish(
    tmp_path: Path, node_db: Path, omop_dir: Path, catalog
) -> None:  # type: ignore[no-untyped-def]
    config = load_node_config(
        write_node_config(tmp_path / "node", node_db, total_epsilon=100.0, node_ceiling=100.0)
    )
    engine = NodeEngine(config)
    errors: list[BaseException] = []
    stop = threading.Event()

    def ask(worker: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                engine.answer(request(SQL, 0.01, query_id=f"w{worker}-{i}"))
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=ask, args=(w,)) for w in range(3)]
    try:
        for t in threads:
            t.start()
        for n in (10, 20):
            load_omop(omop_dir, config.database, catalog, opt_out=_opt_out(tmp_path, omop_dir, n))
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert _events(engine).count("database.reloaded") >= 1
    finally:
        stop.set()
        engine.close()

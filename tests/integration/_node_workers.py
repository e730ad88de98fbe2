"""Code that runs in child processes of the integration tests (importable, no pytest)."""

from __future__ import annotations

import threading

from fedtre.errors import UserError
from fedtre.request import QueryRequest
from node.config import load_node_config
from node.engine import NodeEngine


def budget_worker(
    config_path: str,
    worker: int,
    queries: int,
    sql: str,
    epsilon: float,
    barrier,
    results,
) -> None:
    """Open an engine, wait for every process, then fire ``queries`` threads at once.

    Puts ``(worker, [(query_id, outcome, detail), ...])`` on ``results``; outcome is ``ok``,
    ``refused`` (detail: refusal code) or ``error`` (detail: exception repr).
    """
    engine = NodeEngine(load_node_config(config_path))
    outcomes: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    local_barrier = threading.Barrier(queries)

    def run(i: int) -> None:
        query_id = f"proc{worker}-q{i}"
        local_barrier.wait(timeout=60)
        try:
            engine.answer(QueryRequest(query_id, "study", sql, epsilon, f"worker-{worker}"))
            outcome = (query_id, "ok", "")
        except UserError as exc:
            outcome = (query_id, "refused", exc.refusal.value)
        except Exception as exc:
            outcome = (query_id, "error", repr(exc))
        with lock:
            outcomes.append(outcome)

    try:
        barrier.wait(timeout=120)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(queries)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        results.put((worker, outcomes))
        engine.close()

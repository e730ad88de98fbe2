"""SIGKILL a node mid-work, many times over one state directory, and check the ledger.

The child (``crash_child.py``) prints a query's answer only after ``answer`` returned, so every
printed answer must be durable: in the ledger, stored exactly as printed, and returned verbatim
(no fresh noise) when the same query id is asked again.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedtre.audit.log import read_audit
from fedtre.result import NodeResult
from node.config import load_node_config
from node.engine import NodeEngine
from node.ledger import NODE_SCOPE, Ledger, project_scope
from tests.conftest import request, write_node_config
from tests.integration.crash_child import EPSILON, QUERIES

CHILD = Path(__file__).with_name("crash_child.py")
ROUNDS = 16
MIN_DELAY, MAX_DELAY = 0.05, 1.5


def _run_and_kill(config_path: Path, prefix: str, delay: float, stderr_path: Path) -> list[str]:
    """Start the child, wait until it is serving, SIGKILL it ``delay`` s later.

    Returns the complete lines it printed after READY.
    """
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(config_path), prefix],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=str(config_path.parent),
        )
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
        if first != b"READY\n":
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"child did not start: {first!r}\n{stderr_path.read_text(errors='replace')}"
            )
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        time.sleep(delay)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert still_running, f"child died by itself:\n{stderr_path.read_text(errors='replace')}"
    assert proc.returncode == -signal.SIGKILL
    text = b"".join(chunks).decode()
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # the last piece is incomplete (or empty)


def _check_ledger(ledger: Ledger, printed: dict[str, dict[str, Any]]) -> None:
    releases = {r.query_id: r for r in ledger.releases()}
    debits = {d.query_id: d for d in ledger.debits()}
    for query_id, line in printed.items():
        assert query_id in releases, f"{query_id} was released but is not in the ledger"
        assert releases[query_id].result == line["result"], f"{query_id} stored != printed"
        assert releases[query_id].units == round(line["epsilon"] * 1_000_000)
    # every stored answer was debited; a debit without an answer is a query killed mid-read
    assert set(releases) <= set(debits)
    assert all(releases[q].units == debits[q].units for q in releases)
    total = sum(d.units for d in debits.values())
    assert all(d.units > 0 for d in debits.values())
    assert ledger.spent(project_scope("study")) == total
    assert ledger.spent(NODE_SCOPE) == total


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_released(tmp_path, node_db):
    config_path = write_node_config(
        tmp_path / "node",
        node_db,
        total_epsilon=100_000.0,
        max_epsilon_per_query=1.0,
        node_ceiling=100_000.0,
    )
    config = load_node_config(config_path)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    printed: dict[str, dict[str, Any]] = {}
    parent_ids: set[str] = set()
    kills_with_output = 0
    started = time.monotonic()
    for rnd in range(ROUNDS):
        delay = rng.uniform(MIN_DELAY, MAX_DELAY)
        lines = _run_and_kill(config_path, f"r{rnd}", delay, tmp_path / f"stderr-{rnd}.txt")
        this_round = [json.loads(line) for line in lines]
        kills_with_output += bool(this_round)
        for line in this_round:
            assert line["query_id"] not in printed
            printed[line["query_id"]] = line
        where = f"round {rnd} (seed {seed}, delay {delay:.3f}s)"

        ledger = Ledger(config.ledger_path)
        try:
            _check_ledger(ledger, printed)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        ids = {r.query_id for r in ledger.releases()}
        # at most one answer can be committed but not yet printed when the kill lands
        unprinted = {q for q in ids if q.startswith(f"r{rnd}-")} - printed.keys()
        assert len(unprinted) <= 1, f"{where}: {sorted(unprinted)}"
        # and at most one query can be debited but not yet stored (killed while reading data)
        orphans = {d.query_id for d in ledger.debits() if d.query_id.startswith(f"r{rnd}-")}
        orphans -= ids
        assert len(orphans) <= 1, f"{where}: {sorted(orphans)}"

        # every printed answer was audited as released after it was received
        log = read_audit(config.audit_path)
        released = {r["query_id"] for r in log if r["event"] == "query.released"}
        received = {r["query_id"] for r in log if r["event"] == "query.received"}
        assert set(printed) <= released & received, where

        # a new engine on the same state serves, and a retry of the last printed id returns
        # the stored answer verbatim
        spent_before = ledger.spent(NODE_SCOPE)
        engine = NodeEngine(config)
        try:
            fresh = engine.answer(
                request("SELECT COUNT(*) AS n FROM patients", 0.01, query_id=f"parent-{rnd}")
            )
            parent_ids.add(fresh.query_id)
            assert engine.ledger.spent(NODE_SCOPE) == spent_before + 10_000
            if this_round:
                last = this_round[-1]
                retry = engine.answer(
                    request(last["sql"], last["epsilon"], query_id=last["query_id"])
                )
                assert retry.to_json() == last["result"], where
                assert retry == NodeResult.from_json(last["result"])
                assert engine.ledger.spent(NODE_SCOPE) == spent_before + 10_000
            for orphan in orphans:  # debited, never answered: answered now, not debited again
                sql = QUERIES[int(orphan.rsplit("-", 1)[1]) % len(QUERIES)]
                engine.answer(request(sql, EPSILON, query_id=orphan))
                assert engine.ledger.lookup("study", orphan) is not None
                assert engine.ledger.spent(NODE_SCOPE) == spent_before + 10_000
        finally:
            engine.close()
        _check_ledger(Ledger(config.ledger_path), printed)

    elapsed = time.monotonic() - started
    assert kills_with_output >= ROUNDS // 2, "too few kills landed while queries were answered"
    assert len(printed) > ROUNDS
    assert parent_ids <= {r.query_id for r in Ledger(config.ledger_path).releases()}
    assert elapsed < 120

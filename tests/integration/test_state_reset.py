"""State cannot silently reset: a node whose state directory was lost, moved or restored from an
older backup refuses to start instead of giving every budget back; a current backup restored
resumes with the right budget. Real files, real engines, the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import load_node_config
from node.engine import NodeEngine
from node.errors import StateMismatch
from node.generation import marker_path
from node.ledger import NODE_SCOPE, project_scope
from tests.conftest import request, write_node_config

SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


def _answer(config_path: Path, *query_ids: str) -> None:
    engine = NodeEngine(load_node_config(config_path))
    try:
        for qid in query_ids:
            engine.answer(request(SQL, 0.1, query_id=qid))
    finally:
        engine.close()


def _spent(config_path: Path) -> tuple[int, int]:
    engine = NodeEngine(load_node_config(config_path))
    try:
        return (
            engine.ledger.spent(project_scope("study")),
            engine.ledger.spent(NODE_SCOPE),
        )
    finally:
        engine.close()


def _check(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtre.cli", "node", "check", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def node(tmp_path: Path, node_db: Path) -> Path:
    return write_node_config(tmp_path / "node", node_db, total_epsilon=1.0)


def test_a_lost_state_directory_is_refused_not_started_over(node: Path) -> None:
    _answer(node, "q-1", "q-2")
    state = load_node_config(node).state_dir
    shutil.rmtree(state)
    checked = _check(node)  # before anything runs: the directory is simply gone
    assert checked.returncode == 3 and "restore the state directory" in checked.stdout
    with pytest.raises(StateMismatch, match="not the one this node last used"):
        NodeEngine(load_node_config(node))
    checked = _check(node)
    assert checked.returncode == 3 and "every project's budget" in checked.stdout


def test_a_moved_state_directory_is_refused(node: Path) -> None:
    _answer(node, "q-1")
    text = node.read_text().replace('state_dir = "', 'state_dir = "/tmp/elsewhere-')
    moved = node.with_name("moved.toml")
    moved.write_text(text)
    try:
        with pytest.raises(StateMismatch):
            NodeEngine(load_node_config(moved))
    finally:
        shutil.rmtree(load_node_config(moved).state_dir, ignore_errors=True)


def test_an_older_backup_is_refused_and_the_latest_resumes_with_the_right_budget(
    node: Path, tmp_path: Path
) -> None:
    state = load_node_config(node).state_dir
    _answer(node, "q-1", "q-2")
    old_backup = tmp_path / "backup-old"
    shutil.copytree(state, old_backup)  # the node is stopped: a plain copy is a backup
    _answer(node, "q-3", "q-4", "q-5")
    latest = tmp_path / "backup-latest"
    shutil.copytree(state, latest)
    assert _spent(node) == (500_000, 500_000)

    shutil.rmtree(state)  # the disk is lost
    shutil.copytree(old_backup, state)
    with pytest.raises(StateMismatch, match="older copy"):
        NodeEngine(load_node_config(node))  # 3 answers' ε would be spent again
    assert "older copy" in _check(node).stdout

    shutil.rmtree(state)
    shutil.copytree(latest, state)
    assert _check(node).returncode == 0
    assert _spent(node) == (500_000, 500_000)  # the right budget: 5 of 10 queries' worth
    engine = NodeEngine(load_node_config(node))
    try:  # and a retry of a released id still returns its stored answer, spending nothing
        again = engine.answer(request(SQL, 0.1, query_id="q-5"))
        assert again.epsilon_units == 100_000
        assert engine.ledger.spent(NODE_SCOPE) == 500_000
    finally:
        engine.close()


def test_the_ledger_record_is_exact_after_every_release_and_a_failed_write_is_loud(
    node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written on the release's path: never behind when an answer leaves; if it cannot be
    written, the answer does not leave (the retry replays it, spending nothing more)."""
    import node.generation as generation

    config = load_node_config(node)
    engine = NodeEngine(config)
    try:
        for i in range(3):
            engine.answer(request(SQL, 0.1, query_id=f"r-{i}"))
            recorded = json.loads(marker_path(config).read_text())["committed"]
            assert recorded == engine.ledger.committed_count() == i + 1
        real = generation.os.pwrite

        def disk_full(fd: int, data: bytes, offset: int) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(generation.os, "pwrite", disk_full)
        with pytest.raises(OSError, match="No space left"):
            engine.answer(request(SQL, 0.1, query_id="r-3"))
        monkeypatch.setattr(generation.os, "pwrite", real)
        spent = engine.ledger.spent(project_scope("study"))
        replayed = engine.answer_detail(request(SQL, 0.1, query_id="r-3"))
        assert replayed.replayed and engine.ledger.spent(project_scope("study")) == spent
        engine.answer(request(SQL, 0.1, query_id="r-4"))
        assert json.loads(marker_path(config).read_text())["committed"] == 5
    finally:
        engine.close()


def test_a_torn_ledger_record_stops_the_node_and_says_so(node: Path) -> None:
    """The record is rewritten in place: a crash in the middle of a write leaves it unreadable,
    and the node then refuses to start rather than guess."""
    _answer(node, "t-1")
    config = load_node_config(node)
    record = marker_path(config).read_bytes()
    marker_path(config).write_bytes(record[:20] + b"\0" * (len(record) - 20))
    with pytest.raises(StateMismatch, match="unreadable"):
        NodeEngine(config)
    checked = _check(node)
    assert checked.returncode == 3 and "unreadable" in checked.stdout

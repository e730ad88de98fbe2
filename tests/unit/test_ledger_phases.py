"""The ledger's two phases: reserve and prepare, then commit, abort or expiry.

Every test reads the budget back from the ledger file: a refund must put back exactly what the
reservation took, and a committed answer is never refunded.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from fedtre.errors import QueryRefused
from node.ledger import NODE_SCOPE, Ledger, State, project_scope

LIMITS = {project_scope("p"): 1_000_000, NODE_SCOPE: 5_000_000}
LEASE = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite", clock=clock)


def _reserve(ledger: Ledger, qid: str, units: int = 100_000, fingerprint: str = "f1"):
    return ledger.reserve("p", qid, fingerprint, units, "2026-12-02T00:00:00+00:00", LIMITS, LEASE)


def _spent(ledger: Ledger) -> tuple[int, int]:
    return ledger.spent(project_scope("p")), ledger.spent(NODE_SCOPE)


def _prepared(ledger: Ledger, qid: str, units: int = 100_000) -> None:
    r = _reserve(ledger, qid, units)
    assert r.created
    assert ledger.prepare(r.entry, f"answer-{qid}").state is State.PREPARED


def test_prepare_then_commit_releases_once(ledger: Ledger) -> None:
    _prepared(ledger, "q1")
    assert ledger.lookup("p", "q1") is None  # prepared is not released
    entry, committed = ledger.commit("p", "q1")
    assert committed and entry is not None and entry.state is State.COMMITTED
    assert ledger.lookup("p", "q1") is not None
    again, committed_again = ledger.commit("p", "q1")
    assert not committed_again and again == entry
    assert _spent(ledger) == (100_000, 100_000)


def test_abort_refunds_exactly_and_destroys_the_answer(ledger: Ledger) -> None:
    _prepared(ledger, "keep", 250_000)
    _prepared(ledger, "drop", 100_000)
    assert _spent(ledger) == (350_000, 350_000)
    entry, aborted = ledger.abort("p", "drop")
    assert aborted and entry is not None and entry.state is State.ABORTED
    assert entry.result is None
    assert _spent(ledger) == (250_000, 250_000)
    # a commit after the abort releases nothing and spends nothing
    entry, committed = ledger.commit("p", "drop")
    assert not committed and entry is not None and entry.state is State.ABORTED
    assert ledger.lookup("p", "drop") is None
    # aborting again refunds nothing more
    assert ledger.abort("p", "drop")[1] is False
    assert _spent(ledger) == (250_000, 250_000)


def test_a_committed_answer_is_never_refunded(ledger: Ledger, clock: Clock) -> None:
    _prepared(ledger, "q1")
    ledger.commit("p", "q1")
    entry, aborted = ledger.abort("p", "q1")
    assert not aborted and entry is not None and entry.state is State.COMMITTED
    clock.now += 10 * LEASE
    assert ledger.expire_due() == []
    assert _spent(ledger) == (100_000, 100_000)
    assert ledger.lookup("p", "q1") is not None


def test_a_lease_that_ends_refunds_and_a_late_commit_is_refused(
    ledger: Ledger, clock: Clock
) -> None:
    _prepared(ledger, "late")
    _reserve(ledger, "mid-read")  # killed while reading the data: reserved, never prepared
    clock.now += LEASE - 1
    assert ledger.expire_due() == []
    clock.now += 2
    expired = ledger.expire_due()
    assert {e.query_id for e in expired} == {"late", "mid-read"}
    assert _spent(ledger) == (0, 0)
    entry, committed = ledger.commit("p", "late")
    assert not committed and entry is not None and entry.state is State.EXPIRED


def test_a_commit_after_the_lease_expires_the_entry_itself(ledger: Ledger, clock: Clock) -> None:
    _prepared(ledger, "q1")
    clock.now += LEASE + 1  # nobody swept yet: the commit finds the lease over
    entry, committed = ledger.commit("p", "q1")
    assert not committed and entry is not None and entry.state is State.EXPIRED
    assert _spent(ledger) == (0, 0)


def test_an_aborted_id_may_be_prepared_again_only_for_the_same_request(ledger: Ledger) -> None:
    _prepared(ledger, "q1")
    ledger.abort("p", "q1")
    other = _reserve(ledger, "q1", fingerprint="another-query")
    assert not other.created and other.entry.fingerprint == "f1"  # the caller refuses it
    assert _spent(ledger) == (0, 0)
    again = _reserve(ledger, "q1")
    assert again.created and again.entry.state is State.RESERVED
    assert _spent(ledger) == (100_000, 100_000)


def test_query_ids_are_per_project(ledger: Ledger) -> None:
    _prepared(ledger, "same")
    other = ledger.reserve(
        "other", "same", "f2", 100_000, "t", {project_scope("other"): 1_000_000}, LEASE
    )
    assert other.created
    assert ledger.entry("p", "same").fingerprint == "f1"  # type: ignore[union-attr]
    assert ledger.entry("other", "same").fingerprint == "f2"  # type: ignore[union-attr]


def test_budget_is_checked_against_reservations_in_flight(ledger: Ledger) -> None:
    for i in range(10):
        _reserve(ledger, f"q{i}")
    with pytest.raises(QueryRefused):
        _reserve(ledger, "one-too-many")
    ledger.abort("p", "q3")  # a refund makes room again
    assert _reserve(ledger, "one-too-many").created


def test_commit_and_expiry_racing_decide_exactly_once(tmp_path: Path) -> None:
    """A commit and the lease's end arriving together: one of them wins, never both."""
    clock = Clock()
    ledger = Ledger(tmp_path / "race.sqlite", clock=clock)
    outcomes = []
    for i in range(40):
        qid = f"r{i}"
        _prepared(ledger, qid, 10_000)
        clock.now += LEASE - 0.5 if i % 2 else LEASE + 0.5  # half the leases already over
        results: dict[str, object] = {}
        barrier = threading.Barrier(2)

        def commit(
            qid: str = qid, barrier: threading.Barrier = barrier, results: dict = results
        ) -> None:
            barrier.wait()
            results["commit"] = ledger.commit("p", qid)[1]

        def sweep(barrier: threading.Barrier = barrier, results: dict = results) -> None:
            barrier.wait()
            results["expired"] = [e.query_id for e in ledger.expire_due()]

        threads = [threading.Thread(target=commit), threading.Thread(target=sweep)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        state = ledger.entry("p", qid).state  # type: ignore[union-attr]
        committed = bool(results["commit"])
        expired = qid in results["expired"]  # type: ignore[operator]
        assert committed != (state is State.EXPIRED)
        assert not (committed and expired)
        outcomes.append(state)
        clock.now += 1000  # the next round's lease starts afresh
    committed_units = sum(10_000 for s in outcomes if s is State.COMMITTED)
    assert _spent(ledger) == (committed_units, committed_units)
    assert State.COMMITTED in outcomes and State.EXPIRED in outcomes


def test_a_version_1_ledger_is_migrated_without_losing_a_debit(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE spent (scope TEXT PRIMARY KEY, units INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE reservations (query_id TEXT PRIMARY KEY, project_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL, units INTEGER NOT NULL, reserved_at TEXT NOT NULL);
        CREATE TABLE releases (query_id TEXT PRIMARY KEY, project_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL, units INTEGER NOT NULL, result TEXT NOT NULL,
            released_at TEXT NOT NULL);
        INSERT INTO spent VALUES ('node', 300000), ('project:p', 300000);
        INSERT INTO reservations VALUES ('a', 'p', 'fa', 100000, 't1'),
            ('b', 'p', 'fb', 200000, 't2');
        INSERT INTO releases VALUES ('a', 'p', 'fa', 100000, 'answer-a', 't1');
        """
    )
    con.commit()
    con.close()
    ledger = Ledger(path)
    # the released answer stays released and spent; the debit that was never answered is
    # refunded, as an expired lease would be
    assert ledger.lookup("p", "a") is not None
    assert ledger.lookup("p", "a").result == "answer-a"  # type: ignore[union-attr]
    assert ledger.entry("p", "b").state is State.EXPIRED  # type: ignore[union-attr]
    assert _spent(ledger) == (100_000, 100_000)
    # opening it again changes nothing
    assert _spent(Ledger(path)) == (100_000, 100_000)

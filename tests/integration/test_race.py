"""The race the protocol exists for: 64 concurrent queries through two coordinators against
trusts with different budgets left. Every ε spent at every trust must belong to an answer a
researcher received: prepare everywhere, then commit only when every trust prepared, else abort.

Twenty rounds, each on its own project (fresh budgets, the same running federation), in a mixed
federation: two dial-out trusts linked to both coordinators, one dial-in trust.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from fedtre.launcher import DIAL_IN, DIAL_OUT, LocalFederation, ProjectSpec, TrustSpec
from tests.integration.federation import make_databases, make_pki

ROUNDS = 20
QUERIES = 64
EPSILON_UNITS = 100_000
# Budgets left at each trust, in queries' worth: different at every trust and every round.
BUDGETS = {"trust-a": 10, "trust-b": 7, "trust-c": 13}
SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory, catalog) -> Iterator[LocalFederation]:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    databases = make_databases(tmp_path_factory.mktemp("dbs"), catalog)
    modes = {"trust-a": DIAL_OUT, "trust-b": DIAL_IN, "trust-c": DIAL_OUT}
    trusts = [
        TrustSpec(
            name,
            path,
            modes[name],
            {f"race-{r}": (BUDGETS[name] + (r + i) % 3) * 0.1 for r in range(ROUNDS)},
        )
        for i, (name, path) in enumerate(databases.items())
    ]
    projects = [ProjectSpec(f"race-{r}", max_epsilon_per_query=0.5) for r in range(ROUNDS)]
    fed = LocalFederation(
        tmp_path_factory.mktemp("race"),
        pki,
        trusts,
        projects,
        coordinators=2,
        deadline=30.0,
        answer_slot_ms=5,
        node_workers=8,
        node_ceiling=1000.0,
    ).start()
    yield fed
    codes = fed.stop()
    assert all(code == 0 for code in codes.values()), codes


def _round(fed: LocalFederation, project: str) -> dict[str, bool]:
    released: dict[str, bool] = {}
    lock = threading.Lock()
    clients = [fed.client(coordinator=i) for i in range(2)]
    barrier = threading.Barrier(QUERIES)

    def ask(i: int) -> None:
        barrier.wait()
        result = clients[i % 2].query(
            project,
            SQL,
            EPSILON_UNITS / 1e6,
            query_id=f"{project}-{i}",
            raise_if_not_released=False,
        )
        with lock:
            released[result.query_id] = result.released

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(QUERIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for c in clients:
        c.close()
    return released


@pytest.mark.slow
def test_no_trust_spends_on_an_answer_nobody_received(race: LocalFederation) -> None:
    total_released = 0
    for r in range(ROUNDS):
        project = f"race-{r}"
        released = _round(race, project)
        assert len(released) == QUERIES
        got = {q for q, ok in released.items() if ok}
        total_released += len(got)
        for trust in BUDGETS:
            spent = race.spent_units(trust, f"project:{project}")
            assert spent == len(got) * EPSILON_UNITS, (
                f"round {r}: {trust} spent {spent} units for {len(got)} released answers"
            )
            committed = {
                e["query_id"]
                for e in race.audit(trust)
                if e["event"] == "query.released" and e.get("project") == project
            }
            assert committed == got, f"round {r}: {trust} released {committed ^ got} unseen"
        least = min((BUDGETS[n] + (r + i) % 3) for i, n in enumerate(BUDGETS))
        assert 1 <= len(got) <= least
    assert total_released >= ROUNDS  # the protocol released answers, not only refusals

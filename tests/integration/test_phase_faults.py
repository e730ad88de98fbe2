"""Faults in every phase of a query: the coordinator or a node dies between prepare and commit,
a dial-out node's connection is cut mid-stream, the coordinator restarts while dial-out nodes
reconnect. After each, the ledgers and audit logs reconcile: every unit spent at a trust is a
committed answer, committed once, and a reservation is either refunded or committed, never both.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtre.client import CoordinatorUnavailable
from tests.integration.federation import PROJECT, Federation, make_databases, make_pki

SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
UNITS = 300_000
TRUSTS = ("trust-a", "trust-b", "trust-c")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory, catalog) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return make_databases(tmp_path_factory.mktemp("dbs"), catalog)


@pytest.fixture
# Each test stops trust-c to hold phase 1 open while it kills something; a long deadline keeps
# the coordinator from giving up on trust-c first (under load that changed the scenario).
def make_fed(
    tmp_path: Path, pki: Path, databases: dict[str, Path]
) -> Iterator[Callable[..., Federation]]:
    started: list[Federation] = []

    def make(**kw: Any) -> Federation:
        fed = Federation(tmp_path / f"fed{len(started)}", pki, databases, **kw)
        started.append(fed)
        return fed.start()

    yield make
    for fed in started:
        fed.stop()


def _events(fed: Federation, name: str, query_id: str) -> list[str]:
    return [e["event"] for e in fed.audit(name) if e.get("query_id") == query_id]


def _until(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _reconciled(fed: Federation, released: set[str]) -> None:
    """Every trust: spent == one query's units per committed id; the committed ids are the
    ones the researcher received; each committed once; nothing left reserved."""
    for trust in TRUSTS:
        log = fed.audit(trust)
        committed = [e["query_id"] for e in log if e["event"] == "query.released"]
        assert len(committed) == len(set(committed)), f"{trust} committed an id twice"
        assert set(committed) == released, f"{trust}: {set(committed) ^ released}"
        assert fed.spent_units(trust) == UNITS * len(released), trust
        refunded = {e["query_id"] for e in log if e["event"] in ("query.expired", "query.aborted")}
        # a refunded reservation that was later committed was reserved again first
        for qid in refunded & set(committed):
            events = _events(fed, trust, qid)
            last_refund = max(
                i for i, e in enumerate(events) if e in ("query.expired", "query.aborted")
            )
            assert "query.reserved" in events[last_refund:], f"{trust} {qid}: {events}"


def _query_in_background(fed: Federation, query_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with fed.client(retries=0, timeout=30) as client:
                out["result"] = client.query(
                    PROJECT, SQL, UNITS / 1e6, query_id=query_id, raise_if_not_released=False
                )
        except Exception as exc:  # the coordinator may die under it
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _prepared(fed: Federation, query_id: str, trusts: tuple[str, ...]) -> Callable[[], bool]:
    return lambda: all("query.prepared" in _events(fed, t, query_id) for t in trusts)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dial-in", "dial-out"])
def test_coordinator_killed_between_phases_leases_expire_and_the_retry_spends_once(
    make_fed: Callable[..., Federation], mode: str
) -> None:
    fed = make_fed(mode=mode, deadline=15.0, lease_seconds=2)
    fed.signal("trust-c", signal.SIGSTOP)  # phase 1 waits for it: a window to kill in
    thread, out = _query_in_background(fed, "k-1")
    _until(_prepared(fed, "k-1", ("trust-a", "trust-b")), what="prepared at a and b")
    fed.kill("coordinator")
    fed.signal("trust-c", signal.SIGCONT)
    thread.join(timeout=30)
    assert isinstance(out.get("error"), CoordinatorUnavailable)
    # nobody commits: every lease ends and is refunded
    _until(lambda: all(fed.spent_units(t) == 0 for t in TRUSTS), what="refunds")
    for t in ("trust-a", "trust-b"):
        assert "query.expired" in _events(fed, t, "k-1")
    fed.restart_coordinator()
    if mode == "dial-out":
        fed.wait_linked()
    with fed.client(timeout=30) as client:
        result = client.query(PROJECT, SQL, UNITS / 1e6, query_id="k-1")
    assert result.released
    _reconciled(fed, {"k-1"})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dial-in", "dial-out"])
def test_coordinator_killed_between_phases_and_the_retry_commits_the_prepared_answers(
    make_fed: Callable[..., Federation], mode: str
) -> None:
    fed = make_fed(mode=mode, deadline=15.0, lease_seconds=120)
    fed.signal("trust-c", signal.SIGSTOP)
    thread, _ = _query_in_background(fed, "k-2")
    _until(_prepared(fed, "k-2", ("trust-a", "trust-b")), what="prepared at a and b")
    fed.kill("coordinator")
    fed.signal("trust-c", signal.SIGCONT)
    thread.join(timeout=30)
    # a and b hold their reservations; c's caller went before c could debit (gRPC drops the
    # call, or c sees it gone and refuses): c spent nothing
    assert fed.spent_units("trust-a") == fed.spent_units("trust-b") == UNITS
    time.sleep(1.0)
    assert "query.reserved" not in _events(fed, "trust-c", "k-2")
    assert fed.spent_units("trust-c") == 0
    fed.restart_coordinator()
    if mode == "dial-out":
        fed.wait_linked()
    with fed.client(timeout=30) as client:
        result = client.query(PROJECT, SQL, UNITS / 1e6, query_id="k-2")
    assert result.released
    for t in TRUSTS:  # the stored answers were committed: reserved once, released once
        events = _events(fed, t, "k-2")
        assert events.count("query.reserved") == 1, events
        assert events.count("query.released") == 1, events
    _reconciled(fed, {"k-2"})
    with fed.client(timeout=30) as client:  # and a later retry replays, spending nothing
        again = client.query(PROJECT, SQL, UNITS / 1e6, query_id="k-2")
    assert again.rows() == result.rows()
    _reconciled(fed, {"k-2"})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dial-in", "dial-out"])
def test_a_node_killed_between_phases_spends_once_after_the_retry(
    make_fed: Callable[..., Federation], mode: str
) -> None:
    fed = make_fed(mode=mode, deadline=15.0)
    fed.signal("trust-c", signal.SIGSTOP)
    thread, out = _query_in_background(fed, "k-3")
    _until(_prepared(fed, "k-3", ("trust-a",)), what="prepared at a")
    fed.kill("trust-a")  # prepared, never committed
    fed.signal("trust-c", signal.SIGCONT)
    thread.join(timeout=30)
    result = out["result"]
    assert not result.released
    states = {t.node_id: t.state for t in result.trusts}
    assert states["trust-a"] == "unavailable"
    fed.restart_node("trust-a")
    with fed.client(timeout=30) as client:
        deadline = time.monotonic() + 20
        while not (
            again := client.query(
                PROJECT, SQL, UNITS / 1e6, query_id="k-3", raise_if_not_released=False
            )
        ).released:
            assert time.monotonic() < deadline, again.withheld_reason
            time.sleep(0.25)
    events = _events(fed, "trust-a", "k-3")
    # Its prepared answer survived the kill (NORMAL sync survives a process crash) and the retry
    # committed it; or the coordinator's abort for the trust that did not answer reached the
    # restarted node first, refunded it, and the retry reserved afresh. Never both spent.
    if events.count("query.reserved") == 2:
        first_abort = events.index("query.aborted")
        assert (
            events.index("query.reserved")
            < first_abort
            < len(events) - 1 - events[::-1].index("query.reserved")
        ), events
    else:
        assert events.count("query.reserved") == 1, events
    assert events.count("query.released") == 1, events
    _reconciled(fed, {"k-3"})


def _cut(address: str) -> None:
    """Close every TCP connection to ``address`` at once (the kernel's SOCK_DESTROY)."""
    port = address.rsplit(":", 1)[1]
    subprocess.run(
        ["ss", "-K", "dst", "127.0.0.1", "dport", "=", port], check=True, capture_output=True
    )


@pytest.mark.slow
def test_a_dial_out_link_cut_mid_stream_reconnects_and_reconciles(
    make_fed: Callable[..., Federation],
) -> None:
    fed = make_fed(mode="dial-out", deadline=15.0, lease_seconds=3)
    fed.signal("trust-c", signal.SIGSTOP)
    thread, out = _query_in_background(fed, "k-4")
    _until(_prepared(fed, "k-4", ("trust-a", "trust-b")), what="prepared at a and b")
    _cut(fed.coordinator.address)  # every link to it, mid-query (the researcher's too)
    fed.signal("trust-c", signal.SIGCONT)
    thread.join(timeout=30)
    assert "error" in out or not out["result"].released
    fed.wait_linked(timeout=30)  # they redial
    _until(lambda: all(fed.spent_units(t) == 0 for t in TRUSTS), what="refunds")
    # Refunded at a and b, once: by their lease ending, or by the coordinator's abort for a
    # trust it could not hear, when that abort reaches the node over its new link first (both
    # seen on this machine; either way nothing stays spent).
    for t in ("trust-a", "trust-b"):
        events = _events(fed, t, "k-4")
        refunds = [e for e in events if e in ("query.expired", "query.aborted")]
        assert len(refunds) == 1, f"{t}: {events}"
    with fed.client(timeout=30) as client:
        result = client.query(PROJECT, SQL, UNITS / 1e6, query_id="k-4")
    assert result.released
    _reconciled(fed, {"k-4"})


@pytest.mark.slow
def test_the_coordinator_restarts_and_dial_out_nodes_come_back(
    make_fed: Callable[..., Federation],
) -> None:
    fed = make_fed(mode="dial-out", deadline=15.0)
    with fed.client(timeout=30) as client:
        assert client.query(PROJECT, SQL, UNITS / 1e6, query_id="before").released
    fed.kill("coordinator")
    time.sleep(1.0)  # the nodes notice and back off
    started = time.monotonic()
    fed.restart_coordinator()
    fed.wait_linked(timeout=30)
    took = time.monotonic() - started
    assert took < 15, f"nodes took {took:.1f} s to come back"
    with fed.client(timeout=30) as client:
        assert client.query(PROJECT, SQL, UNITS / 1e6, query_id="after").released
    _reconciled(fed, {"before", "after"})
    for t in TRUSTS:
        downs = [
            e for e in fed.log_lines(t) if e.get("event") == "coordinator link down; redialling"
        ]
        assert downs, f"{t} never noticed the coordinator going away"

"""Reconcile the coordinator's audit log against every trust's audit log and ledger.

Checks, in plain terms:

1. every log verifies (its links; checkpoints are for ``fedtre audit verify``);
2. every spend the coordinator recorded at a trust (``spent_epsilon_units`` in its
   ``query.released`` / ``query.withheld`` entries) is a ``query.released`` entry at that
   trust, for the same project and query id, with the same ε; and every release at a trust
   made for a coordinator is in some coordinator's record as a spend at that trust;
3. per trust and project, the ε of its ``query.released`` entries equals what its ledger holds
   as committed (no release without its debit, no debit without its entry);
4. a trust the coordinator recorded as refusing a query has that refusal in its own log, and a
   refusal at a trust of a coordinator's request is of a query the coordinator received (else
   someone called the trust directly with the coordinator's certificate);
5. replays are never counted as spend (``query.replayed`` entries spend 0 on both sides).

Releases a trust made for its own operators (``fedtre node query``) are listed, not flagged.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtre.audit.events import Event
from fedtre.audit.log import entries
from fedtre.audit.verify import COMMITTED_SINCE_LOG, has_ledger, verify

Key = tuple[str, str]  # (project, query id)


@dataclass(frozen=True)
class Discrepancy:
    kind: str  # a stable name, e.g. "release_missing_at_trust"
    trust: str
    project: str
    query_id: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "trust": self.trust,
            "project": self.project,
            "query_id": self.query_id,
            "detail": self.detail,
        }


@dataclass
class Reconciliation:
    coordinator_releases: int = 0  # spends recorded by coordinators (trust × query)
    trust_releases: int = 0
    local_releases: int = 0  # released by a trust's own operators, not through a coordinator
    replays: int = 0
    epsilon_units: dict[str, int] = field(default_factory=dict)  # per trust, released
    discrepancies: list[Discrepancy] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "coordinator_spends": self.coordinator_releases,
            "trust_releases": self.trust_releases,
            "local_releases": self.local_releases,
            "replays": self.replays,
            "epsilon_released_per_trust": {
                t: u / 1_000_000 for t, u in sorted(self.epsilon_units.items())
            },
            "discrepancies": [d.to_dict() for d in self.discrepancies],
        }


_WANTED = (
    Event.LOG_CREATED,
    Event.QUERY_RECEIVED,
    Event.QUERY_RELEASED,
    Event.QUERY_REPLAYED,
    Event.QUERY_WITHHELD,
    Event.QUERY_REFUSED,
    Event.CALL_REFUSED,
)


def ledger_committed(path: Path) -> dict[str, int]:
    """Units committed per project in a trust's ledger."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        if not has_ledger(con):
            return {}
        rows = con.execute(
            f"SELECT project_id, SUM(units) FROM queries WHERE {COMMITTED_SINCE_LOG} "
            "GROUP BY project_id"
        ).fetchall()
    finally:
        con.close()
    return {str(p): int(u) for p, u in rows}


def reconcile(coordinators: Sequence[Path], trusts: Sequence[Path]) -> Reconciliation:
    """``coordinators``: coordinator audit logs; ``trusts``: each trust's ``ledger.sqlite``
    (its ledger and its audit log)."""
    out = Reconciliation()
    for path in [*coordinators, *trusts]:
        checked = verify(path)
        for p in checked.problems[:1]:
            out.discrepancies.append(
                Discrepancy("log_does_not_verify", checked.actor or str(path), "", "", p.what)
            )

    # the coordinators' side
    spent: dict[tuple[str, str, str], int] = {}  # (trust, project, query) -> units
    replayed: set[tuple[str, str, str]] = set()  # a trust's earlier answer sent again
    named: set[str] = set()  # every trust a coordinator's record names
    said_refused: set[tuple[str, str, str]] = set()
    at_call: dict[str, int] = defaultdict(int)  # trust -> refusals by its call policy
    received: set[Key] = set()
    for path in coordinators:
        for e in entries(path, _WANTED):
            key = (str(e.get("project", "")), str(e.get("query_id", "")))
            event = e.get("event")
            if event == Event.QUERY_RECEIVED.value:
                received.add(key)
            elif event in (
                Event.QUERY_RELEASED.value,
                Event.QUERY_WITHHELD.value,
                Event.QUERY_REPLAYED.value,
            ):
                for trust, units in (e.get("spent_epsilon_units") or {}).items():
                    spent[(trust, *key)] = spent.get((trust, *key), 0) + int(units)
                    out.coordinator_releases += 1
                out.replays += len(e.get("replayed") or [])
                replayed.update((str(t), *key) for t in e.get("replayed") or [])
                named.update(str(t) for t in e.get("trusts") or {})
                by_policy = {str(t) for t in e.get("refused_at_call") or []}
                for trust, state in (e.get("trusts") or {}).items():
                    if state == "refused" and trust in by_policy:
                        at_call[trust] += 1
                    elif state == "refused":
                        said_refused.add((trust, *key))

    # each trust's side
    seen: set[str] = set()
    for path in trusts:
        actor = ""
        released: dict[Key, int] = {}
        released_per_project: dict[str, int] = defaultdict(int)
        refused: set[Key] = set()
        calls_refused = 0
        for e in entries(path, _WANTED):
            event = e.get("event")
            if event == Event.LOG_CREATED.value:
                actor = str(e.get("node", ""))
                continue
            key = (str(e.get("project", "")), str(e.get("query_id", "")))
            caller = str(e.get("caller", ""))
            local = caller.startswith("local:")
            if event == Event.QUERY_RELEASED.value:
                units = int(e.get("epsilon_units", 0))
                released_per_project[key[0]] += units
                if local:
                    out.local_releases += 1
                else:
                    released[key] = released.get(key, 0) + units
                    out.trust_releases += 1
            elif event == Event.QUERY_REFUSED.value and not local:
                refused.add(key)
            elif event == Event.CALL_REFUSED.value and caller.startswith("coordinator:"):
                calls_refused += 1
        trust = actor or str(path)
        seen.add(trust)
        out.epsilon_units[trust] = sum(released_per_project.values())
        for key, units in sorted(released.items()):
            theirs = spent.get((trust, *key))
            if theirs is None and (trust, *key) in replayed:
                continue  # the reply to the commit was lost; the retry replayed it: one spend
            if theirs is None:
                out.discrepancies.append(
                    Discrepancy(
                        "release_missing_at_coordinator",
                        trust,
                        *key,
                        "the trust released an answer to a coordinator that has no record of "
                        "spending at this trust for it",
                    )
                )
            elif theirs != units:
                out.discrepancies.append(
                    Discrepancy(
                        "epsilon_mismatch",
                        trust,
                        *key,
                        f"the trust released ε {units / 1e6:g}, the coordinator recorded "
                        f"ε {theirs / 1e6:g}",
                    )
                )
        for (t, project, query_id), units in sorted(spent.items()):
            if t == trust and (project, query_id) not in released:
                out.discrepancies.append(
                    Discrepancy(
                        "release_missing_at_trust",
                        trust,
                        project,
                        query_id,
                        f"the coordinator recorded ε {units / 1e6:g} spent here; the trust's "
                        "log has no release",
                    )
                )
        ledger = ledger_committed(path)
        for project in sorted(set(ledger) | set(released_per_project)):
            logged, held = released_per_project.get(project, 0), ledger.get(project, 0)
            if logged != held:
                out.discrepancies.append(
                    Discrepancy(
                        "ledger_mismatch",
                        trust,
                        project,
                        "",
                        f"the trust's log releases ε {logged / 1e6:g}, its ledger holds "
                        f"ε {held / 1e6:g} committed",
                    )
                )
        for t, project, query_id in sorted(said_refused):
            if t == trust and (project, query_id) not in refused:
                out.discrepancies.append(
                    Discrepancy(
                        "refusal_missing_at_trust",
                        trust,
                        project,
                        query_id,
                        "the coordinator recorded a refusal by this trust; the trust's log "
                        "has none",
                    )
                )
        if calls_refused < at_call.get(trust, 0):
            out.discrepancies.append(
                Discrepancy(
                    "call_refusal_missing_at_trust",
                    trust,
                    "",
                    "",
                    f"the coordinator recorded {at_call[trust]} call(s) refused by this trust's "
                    f"certificate policy; the trust's log has {calls_refused}",
                )
            )
        for project, query_id in sorted(refused):
            if coordinators and (project, query_id) not in received:
                out.discrepancies.append(
                    Discrepancy(
                        "refusal_unknown_to_coordinator",
                        trust,
                        project,
                        query_id,
                        "the trust refused a request the coordinator never received (a "
                        "direct call with a coordinator's certificate?)",
                    )
                )
    for trust in sorted(named - seen):
        out.discrepancies.append(
            Discrepancy(
                "trust_log_missing",
                trust,
                "",
                "",
                "the coordinator's records name this trust; its log was not given, so its "
                "releases were not checked",
            )
        )
    return out

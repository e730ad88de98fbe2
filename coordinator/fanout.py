"""Fan-out: ask many trusts at once, each call with the deadline, over their ``TrustLink``.

Calls to all trusts are started at once on a persistent thread pool (gRPC's own ``.future()``
starts a new OS thread per idle channel per call: measurably slower at 20 trusts) and collected
when each finishes or the deadline passes, so the slowest or a frozen trust bounds the wait,
never the sum. The deadline is fixed when the phase starts: time a call waits for a pool thread
counts against it. Every reply is checked against what was asked (trust, query id, project, ε);
one that does not fit is ``FAILED``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures

from coordinator.links import TrustLink
from fedtre.protocol import (
    Decision,
    NodeDescription,
    NodeOutcome,
    OutcomeKind,
    PrepareRequest,
)

# One call to one trust: the link and the seconds left until the phase's deadline.
Call = Callable[[TrustLink, float], NodeOutcome]


class Trusts:
    """The links to every configured trust, opened once and reused."""

    def __init__(self, links: Mapping[str, TrustLink]) -> None:
        self.links = dict(links)
        # Trusts that serve another catalog (found by the monitor): never sent a query.
        self.mismatched: set[str] = set()
        # What each trust said about itself when it last (re)appeared (the monitor asks).
        self.described: dict[str, NodeDescription] = {}
        self._pool = futures.ThreadPoolExecutor(
            max_workers=min(256, max(8, 4 * len(self.links))), thread_name_prefix="fanout"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for link in self.links.values():
            link.close()

    def prepare(
        self, node_ids: Sequence[str], request: PrepareRequest, seconds: float
    ) -> list[NodeOutcome]:
        def call(link: TrustLink, timeout: float) -> NodeOutcome:
            if link.node_id in self.mismatched:
                return _bad(link.node_id, "serves another catalog version; nothing was sent")
            return _checked(link.prepare(request, timeout), link.node_id, request, None)

        return self._fan_out(node_ids, call, seconds)

    def commit(
        self, node_ids: Sequence[str], request: PrepareRequest, seconds: float
    ) -> list[NodeOutcome]:
        decision = Decision(request.query_id, request.project_id)

        def call(link: TrustLink, timeout: float) -> NodeOutcome:
            return _checked(link.commit(decision, timeout), link.node_id, request, request)

        return self._fan_out(node_ids, call, seconds)

    def abort(
        self, node_ids: Sequence[str], request: PrepareRequest, seconds: float
    ) -> list[NodeOutcome]:
        decision = Decision(request.query_id, request.project_id)

        def call(link: TrustLink, timeout: float) -> NodeOutcome:
            return _checked(link.abort(decision, timeout), link.node_id, request, None)

        return self._fan_out(node_ids, call, seconds)

    def abort_later(self, node_ids: Sequence[str], request: PrepareRequest, seconds: float) -> None:
        """Abort without waiting: for trusts that did not answer in time (their lease ends
        anyway; this only frees their reservation sooner)."""
        decision = Decision(request.query_id, request.project_id)
        for nid in node_ids:
            self._pool.submit(self.links[nid].abort, decision, seconds)

    def budget(self, node_ids: Sequence[str], project_id: str, seconds: float) -> list[NodeOutcome]:
        def call(link: TrustLink, timeout: float) -> NodeOutcome:
            outcome = link.budget(project_id, timeout)
            if outcome.kind is OutcomeKind.BUDGET and outcome.node_id != link.node_id:
                return _bad(link.node_id, "answered for another trust")
            return outcome

        return self._fan_out(node_ids, call, seconds)

    def _fan_out(self, node_ids: Sequence[str], call: Call, seconds: float) -> list[NodeOutcome]:
        """Every call but the first on the pool; the first on this thread, which would
        otherwise only wait (one thread hand-off fewer per phase; none with one trust)."""
        if not node_ids:
            return []
        deadline_at = time.monotonic() + seconds
        pending = [self._pool.submit(self._one, nid, call, deadline_at) for nid in node_ids[1:]]
        first = self._one(node_ids[0], call, deadline_at)
        return [first, *(p.result() for p in pending)]

    def _one(self, node_id: str, call: Call, deadline_at: float) -> NodeOutcome:
        timeout = max(0.001, deadline_at - time.monotonic())
        return call(self.links[node_id], timeout)


def _checked(
    outcome: NodeOutcome, node_id: str, asked: PrepareRequest, commit: PrepareRequest | None
) -> NodeOutcome:
    if outcome.kind is OutcomeKind.UNAVAILABLE:
        return outcome
    if outcome.node_id != node_id:
        return _bad(node_id, "answered for another trust")
    if outcome.kind in (OutcomeKind.REFUSED, OutcomeKind.FAILED):
        return outcome
    if outcome.query_id != asked.query_id or outcome.project_id != asked.project_id:
        return _bad(node_id, "answered a different query")
    if commit is None:
        if outcome.result is not None:
            return _bad(node_id, "released an answer before it was committed")
        return outcome
    result = outcome.result
    if outcome.kind is not OutcomeKind.COMMITTED or result is None:
        return _bad(node_id, "did not commit")
    if (
        result.node_id != node_id
        or result.query_id != commit.query_id
        or result.project_id != commit.project_id
    ):
        return _bad(node_id, "answered a different query")
    if result.epsilon_units != commit.epsilon_units:
        return _bad(node_id, "charged a different ε")
    return outcome


def _bad(node_id: str, reason: str) -> NodeOutcome:
    return NodeOutcome(OutcomeKind.FAILED, node_id, reason=reason)

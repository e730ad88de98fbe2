"""The node's request handler: the node protocol in domain types, knowing nothing of gRPC.

Both transports call it: the ``NodeService`` servicer when the coordinator dials in, and the
outbound link when the node dials the coordinator. Who the caller is was established by the
transport (the certificate); everything the request claims is checked by the engine. Every
exception becomes a reply here, in one place: a refusal carries its code and plain reason, an
internal error a generic text (details go to the operator log only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fedtre import logs
from fedtre.dp import units_to_epsilon
from fedtre.errors import AuditUnavailable, UserError
from fedtre.protocol import (
    BudgetReport,
    Decision,
    NodeDescription,
    NodeOutcome,
    OutcomeKind,
    PrepareRequest,
    ProjectScope,
)
from fedtre.request import QueryRequest
from node.engine import BudgetStatus, NodeEngine
from node.errors import LedgerUnavailable

log = logs.get("node")

AUDIT_DOWN = "This trust cannot write its audit log, so it is releasing nothing."
INTERNAL = "Internal error at this trust; its operators have details."


class NodeHandler:
    def __init__(
        self,
        engine: NodeEngine,
        on_audit_failure: Callable[[], None] = lambda: None,
        observe: Callable[[str, str, float], None] = lambda call, outcome, seconds: None,
    ) -> None:
        self.engine = engine
        self.node_id = engine.config.node_id
        self._on_audit_failure = on_audit_failure
        self._observe = observe  # metrics: (call, outcome, seconds)

    def prepare(
        self,
        request: PrepareRequest,
        caller: str,
        time_left: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> NodeOutcome:
        return self._timed(self._prepare, request, caller, time_left, cancelled)

    def commit(self, decision: Decision, caller: str) -> NodeOutcome:
        return self._timed(self._commit, decision, caller)

    def abort(self, decision: Decision, caller: str) -> NodeOutcome:
        return self._timed(self._abort, decision, caller)

    def _timed(self, work: Callable[..., NodeOutcome], *args: Any) -> NodeOutcome:
        """Run one call; one operator log line for it (what, which id, outcome, ε, time: never
        a value), its metrics, and its handling time on the reply for the coordinator's
        operators."""
        start = time.perf_counter()
        outcome = work(*args)
        seconds = time.perf_counter() - start
        call = work.__name__.lstrip("_")
        log.info(
            "request",
            extra={
                "node": outcome.node_id,
                "call": call,
                "query_id": outcome.query_id,
                "project": outcome.project_id,
                "outcome": outcome.kind.value,
                "refusal": outcome.refusal.value if outcome.refusal else None,
                "epsilon_units": outcome.epsilon_units,
                "ms": round(seconds * 1000.0, 3),
            },
        )
        self._observe(call, outcome.kind.value, seconds)
        return replace(outcome, handling_ms=seconds * 1000.0)

    def _prepare(
        self,
        request: PrepareRequest,
        caller: str,
        time_left: float | None,
        cancelled: Callable[[], bool] | None,
    ) -> NodeOutcome:
        query = QueryRequest(
            query_id=request.query_id,
            project_id=request.project_id,
            sql=request.sql,
            epsilon=units_to_epsilon(request.epsilon_units),
            caller=f"{caller} for researcher:{request.researcher}",
            approval=request.approval,
            signed=request.signed,
            researcher=request.researcher,
        )
        try:
            prepared = self.engine.prepare(query, cancelled=cancelled, time_left=time_left)
        except Exception as exc:  # every failure becomes a reply in one place
            return self._failed(exc, request.project_id, request.query_id)
        return NodeOutcome(
            OutcomeKind.PREPARED,
            self.node_id,
            request.project_id,
            request.query_id,
            epsilon_units=prepared.units,
            replayed=prepared.replayed,
        )

    def _commit(self, decision: Decision, caller: str) -> NodeOutcome:
        try:
            answer = self.engine.commit(decision.project_id, decision.query_id, caller)
            budget = self._budget(self.engine.budget(decision.project_id))
        except Exception as exc:
            return self._failed(exc, decision.project_id, decision.query_id)
        return NodeOutcome(
            OutcomeKind.COMMITTED,
            self.node_id,
            decision.project_id,
            decision.query_id,
            epsilon_units=answer.result.epsilon_units,
            replayed=answer.replayed,
            result=answer.result,
            budget=budget,
        )

    def _abort(self, decision: Decision, caller: str) -> NodeOutcome:
        try:
            aborted = self.engine.abort(decision.project_id, decision.query_id, caller)
            budget = self._budget(self.engine.budget(decision.project_id))
        except Exception as exc:
            return self._failed(exc, decision.project_id, decision.query_id)
        return NodeOutcome(
            OutcomeKind.COMMITTED if aborted.committed else OutcomeKind.ABORTED,
            self.node_id,
            decision.project_id,
            decision.query_id,
            epsilon_units=aborted.refunded_units,
            budget=budget,
        )

    def budget(self, project_id: str, caller: str) -> NodeOutcome:
        try:
            status = self.engine.budget_request(project_id, caller)
        except Exception as exc:
            return self._failed(exc, project_id, "")
        return NodeOutcome(
            OutcomeKind.BUDGET, self.node_id, project_id, budget=self._budget(status)
        )

    def describe(self, caller: str, checkpoints: tuple[str, ...] = ()) -> NodeDescription:
        projects = self.engine.describe(caller, checkpoints)
        catalog = self.engine.catalog
        scopes = tuple(
            ProjectScope(
                project_id=p.project_id,
                views=tuple(sorted(p.views)),
                max_tier=p.max_tier.value,
                total_units=p.total_units,
                max_units_per_query=p.max_units_per_query,
            )
            for p in projects.values()
        )
        ids = tuple(projects)
        return NodeDescription(
            self.node_id,
            catalog.version,
            catalog.digest,
            ids,
            scopes,
            audit_checkpoint=self.engine.published_checkpoint(),
        )

    def _budget(self, status: BudgetStatus) -> BudgetReport:
        return BudgetReport(
            node_id=self.node_id,
            project_id=status.project_id,
            total_units=status.total_units,
            spent_units=status.spent_units,
            remaining_units=status.remaining_units,
        )

    def _failed(self, exc: Exception, project_id: str, query_id: str) -> NodeOutcome:
        project_id, query_id = str(project_id)[:64], str(query_id)[:128]
        if isinstance(exc, UserError):
            return NodeOutcome(
                OutcomeKind.REFUSED,
                self.node_id,
                project_id,
                query_id,
                refusal=exc.refusal,
                reason=exc.message,
            )
        if isinstance(exc, AuditUnavailable | LedgerUnavailable):  # one database holds both
            log.error("audit log unwritable: reporting NOT_SERVING", extra={"node": self.node_id})
            self._on_audit_failure()
            return NodeOutcome(
                OutcomeKind.FAILED, self.node_id, project_id, query_id, reason=AUDIT_DOWN
            )
        log.error(
            "request failed",
            extra={"node": self.node_id, "query_id": query_id, "error": type(exc).__name__},
        )
        return NodeOutcome(OutcomeKind.FAILED, self.node_id, project_id, query_id, reason=INTERNAL)

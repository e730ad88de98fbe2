"""The node's gRPC servicer: thin. Convert from the wire, call the engine, convert back.

Who the caller is comes from its certificate (``fedtre.tls``), checked by the server's
``CallerPolicy`` before this code runs; everything the request claims is checked by the engine,
after the engine has written the request to the audit log. Errors become statuses in
``fedtre.status`` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from fedtre.dp import units_to_epsilon
from fedtre.errors import AuditUnavailable
from fedtre.request import QueryRequest
from fedtre.serde import result_to_wire
from fedtre.status import abort
from fedtre.v1 import node_pb2 as npb
from fedtre.v1 import node_pb2_grpc
from node.engine import BudgetStatus, NodeEngine

MAX_RESEARCHER_CHARS = 128


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        engine: NodeEngine,
        caller: Callable[[grpc.ServicerContext], str],
        on_audit_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self._caller = caller
        self._on_audit_failure = on_audit_failure

    def Answer(
        self, request: npb.AnswerRequest, context: grpc.ServicerContext
    ) -> npb.AnswerResponse:
        start = time.perf_counter()
        researcher = _clean(request.researcher)
        query = QueryRequest(
            query_id=request.query_id,
            project_id=request.project_id,
            sql=request.sql,
            epsilon=units_to_epsilon(request.epsilon_units),
            caller=f"{self._caller(context)} for researcher:{researcher}",
        )
        try:
            answer = self.engine.answer_detail(
                query,
                cancelled=lambda: not context.is_active(),
                time_left=context.time_remaining(),
            )
            budget = self.engine.budget(request.project_id)
        except Exception as exc:  # every failure maps to a status in one place
            self._fail(exc)
            abort(context, exc, _clean(request.query_id))
        return npb.AnswerResponse(
            result=result_to_wire(answer.result),
            replayed=answer.replayed,
            budget=self._budget(budget),
            # answer slot included, so this carries no data-dependent timing
            handling_ms=(time.perf_counter() - start) * 1000.0,
        )

    def Budget(
        self, request: npb.NodeBudgetRequest, context: grpc.ServicerContext
    ) -> npb.NodeBudget:
        try:
            status = self.engine.budget_request(request.project_id, self._caller(context))
        except Exception as exc:  # every failure maps to a status in one place
            self._fail(exc)
            abort(context, exc)
        return self._budget(status)

    def Describe(
        self, request: npb.DescribeRequest, context: grpc.ServicerContext
    ) -> npb.NodeDescription:
        try:
            projects = self.engine.describe(self._caller(context))
        except Exception as exc:  # every failure maps to a status in one place
            self._fail(exc)
            abort(context, exc)
        catalog = self.engine.catalog
        return npb.NodeDescription(
            node_id=self.engine.config.node_id,
            catalog_version=catalog.version,
            catalog_digest=catalog.digest,
            project_ids=list(projects),
        )

    def _budget(self, status: BudgetStatus) -> npb.NodeBudget:
        return npb.NodeBudget(
            node_id=self.engine.config.node_id,
            project_id=status.project_id,
            total_units=status.total_units,
            spent_units=status.spent_units,
            remaining_units=status.remaining_units,
        )

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, AuditUnavailable):
            self._on_audit_failure()


def _clean(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text[:MAX_RESEARCHER_CHARS])

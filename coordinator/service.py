"""The coordinator's researcher-facing gRPC servicer: thin. The researcher is who their client
certificate says (``CallerPolicy`` admits researcher certificates only); nothing in the request
or its metadata can claim an identity."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from coordinator.engine import CoordinatorEngine, Outcome, Submission
from coordinator.fanout import TrustOutcome, TrustState
from fedtre.dp import units_to_epsilon
from fedtre.serde import aggregate_kind_to_wire, cells_to_wire, refusal_to_wire
from fedtre.status import abort
from fedtre.v1 import common_pb2 as pb
from fedtre.v1 import coordinator_pb2 as cpb
from fedtre.v1 import coordinator_pb2_grpc

_STATES = {
    TrustState.ANSWERED: cpb.TRUST_STATE_ANSWERED,
    TrustState.UNAVAILABLE: cpb.TRUST_STATE_UNAVAILABLE,
    TrustState.REFUSED: cpb.TRUST_STATE_REFUSED,
    TrustState.FAILED: cpb.TRUST_STATE_FAILED,
}


class ResearcherServicer(coordinator_pb2_grpc.ResearcherServiceServicer):
    def __init__(
        self, engine: CoordinatorEngine, researcher: Callable[[grpc.ServicerContext], str]
    ) -> None:
        self.engine = engine
        self._researcher = researcher

    def Submit(
        self, request: cpb.SubmitRequest, context: grpc.ServicerContext
    ) -> cpb.SubmitResponse:
        epsilon = request.epsilon if request.HasField("epsilon") else None
        sub = Submission(request.query_id, request.project_id, request.sql, epsilon)
        try:
            outcome = self.engine.submit(self._researcher(context), sub)
        except Exception as exc:  # every failure maps to a status in one place
            abort(context, exc, request.query_id if len(request.query_id) <= 128 else "")
        return outcome_to_wire(outcome)

    def ListProjects(
        self, request: cpb.ListProjectsRequest, context: grpc.ServicerContext
    ) -> cpb.ProjectList:
        try:
            projects = self.engine.projects(self._researcher(context))
        except Exception as exc:
            abort(context, exc)
        return cpb.ProjectList(
            projects=[
                cpb.ProjectInfo(
                    project_id=p.project_id,
                    title=p.title,
                    trusts=list(p.trusts),
                    max_epsilon_per_query=units_to_epsilon(p.max_units_per_query),
                    allow_partial=p.allow_partial,
                    suppress_below=p.rules.suppress_below,
                    round_to=p.rules.round_to,
                )
                for p in projects
            ]
        )

    def Budget(
        self, request: cpb.BudgetRequest, context: grpc.ServicerContext
    ) -> cpb.ProjectBudget:
        try:
            project, outcomes = self.engine.budget(self._researcher(context), request.project_id)
        except Exception as exc:
            abort(context, exc)
        return cpb.ProjectBudget(
            project_id=project.project_id, trusts=[trust_to_wire(o, 0) for o in outcomes]
        )


def trust_to_wire(o: TrustOutcome, units: int) -> cpb.TrustStatus:
    return cpb.TrustStatus(
        node_id=o.node_id,
        state=_STATES[o.state],
        refusal=refusal_to_wire(o.refusal) if o.refusal else pb.REFUSAL_UNSPECIFIED,
        reason=o.reason,
        epsilon_units=units if o.state is TrustState.ANSWERED else 0,
        replayed=o.replayed,
        has_budget=o.remaining_units is not None,
        remaining_units=o.remaining_units or 0,
    )


def outcome_to_wire(outcome: Outcome) -> cpb.SubmitResponse:
    response = cpb.SubmitResponse(
        query_id=outcome.query_id,
        project_id=outcome.project.project_id,
        released=outcome.combined is not None,
        withheld_reason=outcome.withheld_reason,
        trusts=[trust_to_wire(o, outcome.epsilon_units) for o in outcome.trusts],
        epsilon=units_to_epsilon(outcome.epsilon_units),
    )
    c = outcome.combined
    if c is None:
        return response
    response.view = c.view
    response.catalog_version = c.catalog_version
    response.reference_date = c.reference_date
    response.group_by.extend(c.group_by)
    response.cells.extend(cells_to_wire(c.cells))
    response.covered_trusts.extend(c.covered)
    response.notes.extend(c.notes)
    for col in c.columns:
        response.columns.append(
            cpb.EstimateColumn(
                alias=col.alias,
                kind=aggregate_kind_to_wire(col.kind),
                column=col.column or "",
                estimates=[
                    cpb.Estimate(
                        available=e.available,
                        suppressed=e.suppressed,
                        value=e.value if e.value is not None else 0.0,
                        ci_low=e.low if e.low is not None else 0.0,
                        ci_high=e.high if e.high is not None else 0.0,
                        display=e.display,
                    )
                    for e in col.estimates
                ],
            )
        )
    return response

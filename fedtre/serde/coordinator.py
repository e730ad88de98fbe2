"""Serde for ``coordinator.proto``: a researcher's submission and the answer they receive
(``fedtre.request.Submission``, ``fedtre.answer``)."""

from __future__ import annotations

import math

from fedtre.answer import (
    EstimateColumn,
    EstimateValue,
    ProjectBudget,
    ProjectInfo,
    QueryResult,
    TrustReport,
)
from fedtre.catalog import Catalog, catalog_from_bytes
from fedtre.errors import ConfigError, Refusal, WireError
from fedtre.plan import AggregateKind
from fedtre.request import Submission
from fedtre.serde.common import (
    aggregate_kind_from_proto,
    aggregate_kind_to_proto,
    cells_from_proto,
    cells_to_proto,
    refusal_from_proto,
    refusal_to_proto,
    signed_query_from_proto,
    signed_query_to_proto,
)
from fedtre.v2 import common_pb2 as pb
from fedtre.v2 import coordinator_pb2 as cpb

UNITS = 1_000_000
_STATES = {
    "answered": cpb.TRUST_STATE_ANSWERED,
    "unavailable": cpb.TRUST_STATE_UNAVAILABLE,
    "refused": cpb.TRUST_STATE_REFUSED,
    "failed": cpb.TRUST_STATE_FAILED,
    "withdrawn": cpb.TRUST_STATE_WITHDRAWN,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}


# -- submission -----------------------------------------------------------------------------


def submission_to_proto(sub: Submission) -> cpb.SubmitRequest:
    msg = cpb.SubmitRequest(
        query_id=sub.query_id,
        project_id=sub.project_id,
        sql=sub.sql,
        signed=signed_query_to_proto(sub.signed),
    )
    if sub.epsilon is not None:  # absent means the project's default; 0 is refused
        msg.epsilon = sub.epsilon
    return msg


def submission_from_proto(msg: cpb.SubmitRequest) -> Submission:
    epsilon = msg.epsilon if msg.HasField("epsilon") else None
    signed = signed_query_from_proto(msg.signed, msg.HasField("signed"))
    return Submission(msg.query_id, msg.project_id, msg.sql, epsilon, signed)


# -- trusts ---------------------------------------------------------------------------------


def trust_report_to_proto(t: TrustReport) -> cpb.TrustStatus:
    refusal = Refusal(t.refusal) if t.refusal else None
    return cpb.TrustStatus(
        node_id=t.node_id,
        state=_STATES[t.state],
        refusal=refusal_to_proto(refusal) if refusal else pb.REFUSAL_UNSPECIFIED,
        reason=t.reason,
        epsilon_units=round(t.epsilon_spent * UNITS),
        replayed=t.replayed,
        has_budget=t.epsilon_left is not None,
        remaining_units=round((t.epsilon_left or 0.0) * UNITS),
        data_as_of=t.data_as_of,
    )


def trust_report_from_proto(msg: cpb.TrustStatus) -> TrustReport:
    state = _STATES_BACK.get(msg.state)
    if state is None:
        raise WireError("a trust's state is missing")
    refusal = refusal_from_proto(msg.refusal)
    return TrustReport(
        node_id=msg.node_id,
        state=state,
        reason=msg.reason,
        refusal=refusal.value if refusal else None,
        epsilon_spent=msg.epsilon_units / UNITS,
        epsilon_left=msg.remaining_units / UNITS if msg.has_budget else None,
        replayed=msg.replayed,
        data_as_of=msg.data_as_of[:10],
    )


# -- the answer -----------------------------------------------------------------------------


def query_result_to_proto(r: QueryResult) -> cpb.SubmitResponse:
    return cpb.SubmitResponse(
        query_id=r.query_id,
        project_id=r.project_id,
        view=r.view,
        catalog_version=r.catalog_version,
        released=r.released,
        withheld_reason=r.withheld_reason,
        group_by=list(r.group_by),
        cells=cells_to_proto(r.cells),
        columns=[
            cpb.EstimateColumn(
                alias=c.alias,
                kind=aggregate_kind_to_proto(AggregateKind(c.kind)),
                column=c.column or "",
                estimates=[
                    cpb.Estimate(
                        available=e.available,
                        suppressed=e.suppressed,
                        value=e.value if e.value is not None else 0.0,
                        ci_low=e.low if e.low is not None else 0.0,
                        ci_high=e.high if e.high is not None else 0.0,
                        display=e.display,
                        std_error=e.std_error if e.std_error is not None else 0.0,
                    )
                    for e in c.estimates
                ],
            )
            for c in r.columns
        ],
        trusts=[trust_report_to_proto(t) for t in r.trusts],
        covered_trusts=list(r.covered_trusts),
        epsilon=r.epsilon,
        notes=list(r.notes),
        reference_date=r.reference_date,
    )


def query_result_from_proto(msg: cpb.SubmitResponse) -> QueryResult:
    cells = cells_from_proto(msg.cells, len(msg.group_by))
    columns = []
    for c in msg.columns:
        if len(c.estimates) != len(cells):
            raise WireError("a column has the wrong number of estimates")
        columns.append(
            EstimateColumn(
                alias=c.alias,
                kind=aggregate_kind_from_proto(c.kind).value,
                column=c.column or None,
                estimates=tuple(_estimate(e) for e in c.estimates),
            )
        )
    return QueryResult(
        query_id=msg.query_id,
        project_id=msg.project_id,
        view=msg.view,
        released=msg.released,
        withheld_reason=msg.withheld_reason,
        group_by=tuple(msg.group_by),
        cells=cells,
        columns=tuple(columns),
        trusts=tuple(trust_report_from_proto(t) for t in msg.trusts),
        covered_trusts=tuple(msg.covered_trusts),
        epsilon=msg.epsilon,
        notes=tuple(msg.notes),
        reference_date=msg.reference_date,
        catalog_version=msg.catalog_version,
    )


def _estimate(e: cpb.Estimate) -> EstimateValue:
    shown = e.available and not e.suppressed
    for number in (e.value, e.ci_low, e.ci_high, e.std_error):
        if not math.isfinite(number):
            raise WireError("an estimate is not a finite number")
    return EstimateValue(
        available=e.available,
        suppressed=e.suppressed,
        value=e.value if shown else None,
        low=e.ci_low if shown else None,
        high=e.ci_high if shown else None,
        display=e.display,
        std_error=e.std_error if shown and e.std_error > 0 else None,
    )


# -- projects and budgets -------------------------------------------------------------------


def project_list_to_proto(projects: list[ProjectInfo]) -> cpb.ProjectList:
    return cpb.ProjectList(
        projects=[
            cpb.ProjectInfo(
                project_id=p.project_id,
                title=p.title,
                trusts=list(p.trusts),
                max_epsilon_per_query=p.max_epsilon_per_query,
                allow_partial=p.allow_partial,
                suppress_below=p.suppress_below,
                round_to=p.round_to,
                default_epsilon=p.default_epsilon,
                views=list(p.views),
                max_tier=p.max_tier,
            )
            for p in projects
        ]
    )


def project_list_from_proto(msg: cpb.ProjectList) -> list[ProjectInfo]:
    return [
        ProjectInfo(
            project_id=p.project_id,
            title=p.title,
            trusts=tuple(p.trusts),
            max_epsilon_per_query=p.max_epsilon_per_query,
            allow_partial=p.allow_partial,
            suppress_below=int(p.suppress_below),
            round_to=int(p.round_to),
            default_epsilon=p.default_epsilon,
            views=tuple(p.views),
            max_tier=p.max_tier,
        )
        for p in msg.projects
    ]


def project_budget_request_to_proto(project_id: str) -> cpb.ProjectBudgetRequest:
    return cpb.ProjectBudgetRequest(project_id=project_id)


def project_budget_request_from_proto(msg: cpb.ProjectBudgetRequest) -> str:
    return msg.project_id


def project_budget_to_proto(budget: ProjectBudget) -> cpb.ProjectBudget:
    return cpb.ProjectBudget(
        project_id=budget.project_id, trusts=[trust_report_to_proto(t) for t in budget.trusts]
    )


def project_budget_from_proto(msg: cpb.ProjectBudget) -> ProjectBudget:
    return ProjectBudget(
        project_id=msg.project_id, trusts=tuple(trust_report_from_proto(t) for t in msg.trusts)
    )


# -- the catalog ----------------------------------------------------------------------------


def catalog_to_proto(catalog: Catalog) -> cpb.CatalogInfo:
    return cpb.CatalogInfo(version=catalog.version, digest=catalog.digest, text=catalog.text)


def catalog_from_proto(msg: cpb.CatalogInfo) -> Catalog:
    """Parse and validate the catalog the coordinator sent; it must be the file it names."""
    try:
        catalog = catalog_from_bytes(msg.text.encode("utf-8"), "the coordinator's catalog")
    except ConfigError as exc:
        raise WireError(f"the coordinator sent an invalid catalog: {exc}") from None
    if catalog.digest != msg.digest or catalog.version != msg.version:
        raise WireError("the coordinator's catalog does not match its digest or version")
    return catalog

"""What the coordinator's outcomes look like to a researcher (``fedtre.answer`` types)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from coordinator.config import Project
from coordinator.outcome import Outcome, TrustOutcome, TrustState
from fedtre.answer import (
    EstimateColumn,
    EstimateValue,
    ProjectBudget,
    ProjectInfo,
    QueryResult,
    TrustReport,
)
from fedtre.catalog import Tier
from fedtre.dp import units_to_epsilon
from fedtre.protocol import NodeDescription


def trust_report(o: TrustOutcome, units: int) -> TrustReport:
    spent = units if o.state is TrustState.ANSWERED and not o.replayed else 0
    return TrustReport(
        node_id=o.node_id,
        state=o.state.value,
        reason=o.reason,
        refusal=o.refusal.value if o.refusal else None,
        epsilon_spent=units_to_epsilon(spent),
        epsilon_left=None if o.remaining_units is None else units_to_epsilon(o.remaining_units),
        replayed=o.replayed,
        data_as_of=o.result.data_as_of if o.result is not None else "",
    )


def query_result(outcome: Outcome) -> QueryResult:
    trusts = tuple(trust_report(o, outcome.epsilon_units) for o in outcome.trusts)
    base = dict(
        query_id=outcome.query_id,
        project_id=outcome.project.project_id,
        withheld_reason=outcome.withheld_reason,
        trusts=trusts,
        epsilon=units_to_epsilon(outcome.epsilon_units),
    )
    c = outcome.combined
    if c is None:
        return QueryResult(
            view="",
            released=False,
            group_by=(),
            cells=(),
            columns=(),
            covered_trusts=(),
            notes=(),
            **base,  # type: ignore[arg-type]
        )
    return QueryResult(
        view=c.view,
        released=True,
        group_by=c.group_by,
        cells=c.cells,
        columns=tuple(
            EstimateColumn(
                alias=col.alias,
                kind=col.kind.value,
                column=col.column,
                estimates=tuple(
                    EstimateValue(
                        e.available, e.suppressed, e.value, e.low, e.high, e.display, e.std_error
                    )
                    for e in col.estimates
                ),
            )
            for col in c.columns
        ),
        covered_trusts=c.covered,
        notes=c.notes,
        reference_date=c.reference_date,
        catalog_version=c.catalog_version,
        **base,  # type: ignore[arg-type]
    )


def project_info(p: Project, described: Mapping[str, NodeDescription]) -> ProjectInfo:
    """The project as its researchers see it; views and tier as approved (the signed
    application), or for a hand-kept project as every trust reported them (the intersection and
    the lowest: what a query can use at all of them)."""
    scopes = [
        s
        for t in p.trusts
        if t in described
        for s in described[t].scopes
        if s.project_id == p.project_id
    ]
    views: tuple[str, ...] = p.views
    tier = p.max_tier
    if scopes and not views:
        views = tuple(sorted(set.intersection(*(set(s.views) for s in scopes))))
        with contextlib.suppress(ValueError):
            tier = min(Tier(s.max_tier) for s in scopes).value
    return ProjectInfo(
        project_id=p.project_id,
        title=p.title,
        trusts=p.trusts,
        max_epsilon_per_query=units_to_epsilon(p.max_units_per_query),
        allow_partial=p.allow_partial,
        suppress_below=p.rules.suppress_below,
        round_to=p.rules.round_to,
        default_epsilon=units_to_epsilon(p.default_units),
        views=views,
        max_tier=tier,
    )


def project_budget(project: Project, outcomes: list[TrustOutcome]) -> ProjectBudget:
    return ProjectBudget(project.project_id, tuple(trust_report(o, 0) for o in outcomes))

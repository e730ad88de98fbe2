"""Serde for ``node.proto``: the node protocol's requests and replies (``fedtre.protocol``).

Requests are read leniently here (type conversion only): the node's engine validates every
field after auditing the request, and refuses with a plain reason. Replies a coordinator reads
are checked strictly: a reply that does not fit the contract raises ``WireError``.
"""

from __future__ import annotations

import math

from fedtre.errors import Refusal, WireError
from fedtre.protocol import (
    BudgetReport,
    Decision,
    NodeDescription,
    NodeOutcome,
    OutcomeKind,
    PrepareRequest,
    ProjectScope,
)
from fedtre.serde.common import (
    MAX_NAME,
    MAX_TEXT,
    node_result_from_proto,
    node_result_to_proto,
    refusal_from_proto,
    refusal_to_proto,
    signed_query_from_proto,
    signed_query_to_proto,
)
from fedtre.v2 import common_pb2 as pb
from fedtre.v2 import node_pb2 as npb

_OUTCOMES = {
    OutcomeKind.PREPARED: npb.OUTCOME_PREPARED,
    OutcomeKind.COMMITTED: npb.OUTCOME_COMMITTED,
    OutcomeKind.ABORTED: npb.OUTCOME_ABORTED,
    OutcomeKind.BUDGET: npb.OUTCOME_BUDGET,
    OutcomeKind.REFUSED: npb.OUTCOME_REFUSED,
    OutcomeKind.FAILED: npb.OUTCOME_FAILED,
}
_OUTCOMES_BACK = {v: k for k, v in _OUTCOMES.items()}


# -- requests -------------------------------------------------------------------------------


def prepare_request_to_proto(request: PrepareRequest) -> npb.PrepareRequest:
    return npb.PrepareRequest(
        query_id=request.query_id,
        project_id=request.project_id,
        sql=request.sql,
        epsilon_units=request.epsilon_units,
        researcher=request.researcher,
        approval=request.approval,
        signed=signed_query_to_proto(request.signed),
    )


def prepare_request_from_proto(msg: npb.PrepareRequest) -> PrepareRequest:
    return PrepareRequest(
        query_id=msg.query_id,
        project_id=msg.project_id,
        sql=msg.sql,
        epsilon_units=int(msg.epsilon_units),
        researcher=_printable(msg.researcher, MAX_NAME),
        approval=bytes(msg.approval),
        signed=signed_query_from_proto(msg.signed, msg.HasField("signed")),
    )


def decision_to_proto(decision: Decision) -> npb.DecisionRequest:
    return npb.DecisionRequest(query_id=decision.query_id, project_id=decision.project_id)


def decision_from_proto(msg: npb.DecisionRequest) -> Decision:
    return Decision(query_id=msg.query_id, project_id=msg.project_id)


def budget_request_to_proto(project_id: str) -> npb.BudgetRequest:
    return npb.BudgetRequest(project_id=project_id)


def budget_request_from_proto(msg: npb.BudgetRequest) -> str:
    return msg.project_id


# -- replies --------------------------------------------------------------------------------


def budget_to_proto(budget: BudgetReport) -> npb.NodeBudget:
    return npb.NodeBudget(
        node_id=budget.node_id,
        project_id=budget.project_id,
        total_units=budget.total_units,
        spent_units=budget.spent_units,
        remaining_units=budget.remaining_units,
    )


def budget_from_proto(msg: npb.NodeBudget) -> BudgetReport:
    return BudgetReport(
        node_id=msg.node_id,
        project_id=msg.project_id,
        total_units=int(msg.total_units),
        spent_units=int(msg.spent_units),
        remaining_units=int(msg.remaining_units),
    )


def node_outcome_to_proto(outcome: NodeOutcome) -> npb.NodeReply:
    if outcome.kind is OutcomeKind.UNAVAILABLE:
        raise WireError("'unavailable' is the coordinator's verdict, never a node's reply")
    reply = npb.NodeReply(
        outcome=_OUTCOMES[outcome.kind],
        node_id=outcome.node_id,
        project_id=outcome.project_id,
        query_id=outcome.query_id,
        epsilon_units=outcome.epsilon_units,
        replayed=outcome.replayed,
        refusal=refusal_to_proto(outcome.refusal) if outcome.refusal else pb.REFUSAL_UNSPECIFIED,
        reason=outcome.reason,
        handling_ms=outcome.handling_ms,
    )
    if outcome.result is not None:
        reply.result.CopyFrom(node_result_to_proto(outcome.result))
    if outcome.budget is not None:
        reply.budget.CopyFrom(budget_to_proto(outcome.budget))
    return reply


def node_outcome_from_proto(msg: npb.NodeReply) -> NodeOutcome:
    """Read a node's reply, refusing anything that does not fit the contract."""
    kind = _OUTCOMES_BACK.get(msg.outcome)
    if kind is None:
        raise WireError("a node reply has no outcome")
    if not msg.node_id or len(msg.node_id) > MAX_NAME:
        raise WireError("a node reply names no node")
    result = None
    if kind is OutcomeKind.COMMITTED:
        if not msg.HasField("result"):
            raise WireError("a committed reply carries no result")
        result = node_result_from_proto(msg.result)
    elif msg.HasField("result"):
        raise WireError("only a committed reply may carry a result")
    refusal: Refusal | None = None
    if kind is OutcomeKind.REFUSED:
        refusal = refusal_from_proto(msg.refusal)
        if refusal is None:
            raise WireError("a refusal names no reason code")
    if kind is OutcomeKind.BUDGET and not msg.HasField("budget"):
        raise WireError("a budget reply carries no budget")
    return NodeOutcome(
        kind=kind,
        node_id=msg.node_id,
        project_id=msg.project_id,
        query_id=msg.query_id,
        epsilon_units=int(msg.epsilon_units),
        replayed=msg.replayed,
        result=result,
        refusal=refusal,
        reason=_printable(msg.reason, 500),
        budget=budget_from_proto(msg.budget) if msg.HasField("budget") else None,
        handling_ms=float(msg.handling_ms) if math.isfinite(msg.handling_ms) else 0.0,
    )


MAX_CHECKPOINT = 4096  # a signed audit checkpoint is about 600 characters
MAX_SHARED_CHECKPOINTS = 64


def describe_request_to_proto(checkpoints: tuple[str, ...]) -> npb.DescribeRequest:
    return npb.DescribeRequest(audit_checkpoints=list(checkpoints[:MAX_SHARED_CHECKPOINTS]))


def describe_request_from_proto(msg: npb.DescribeRequest) -> tuple[str, ...]:
    return tuple(c[:MAX_CHECKPOINT] for c in msg.audit_checkpoints[:MAX_SHARED_CHECKPOINTS])


def description_to_proto(description: NodeDescription) -> npb.NodeDescription:
    return npb.NodeDescription(
        node_id=description.node_id,
        catalog_version=description.catalog_version,
        catalog_digest=description.catalog_digest,
        project_ids=list(description.project_ids),
        scopes=[
            npb.ProjectScope(
                project_id=p.project_id,
                views=list(p.views),
                max_tier=p.max_tier,
                total_units=p.total_units,
                max_units_per_query=p.max_units_per_query,
            )
            for p in description.scopes
        ],
        audit_checkpoint=description.audit_checkpoint,
    )


def description_from_proto(msg: npb.NodeDescription) -> NodeDescription:
    if not msg.node_id or not msg.catalog_version or len(msg.node_id) > MAX_NAME:
        raise WireError("a node description has no node id or catalog version")
    return NodeDescription(
        node_id=msg.node_id,
        catalog_version=msg.catalog_version,
        catalog_digest=msg.catalog_digest,
        project_ids=tuple(msg.project_ids),
        scopes=tuple(
            ProjectScope(
                project_id=p.project_id[:MAX_NAME],
                views=tuple(v[:MAX_NAME] for v in p.views),
                max_tier=p.max_tier[:MAX_NAME],
                total_units=int(p.total_units),
                max_units_per_query=int(p.max_units_per_query),
            )
            for p in msg.scopes
        ),
        audit_checkpoint=msg.audit_checkpoint[:MAX_CHECKPOINT],
    )


def _printable(text: str, limit: int = MAX_TEXT) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])

"""The wire contract: round trips, and every malformed field refused on receipt."""

from __future__ import annotations

import math

import grpc
import pytest

from fedtre.errors import Refusal, WireError
from fedtre.plan import AggregateKind
from fedtre.protocol import (
    BudgetReport,
    Decision,
    NodeDescription,
    NodeOutcome,
    OutcomeKind,
    PrepareRequest,
)
from fedtre.result import NodeResult, ReleasedAggregate, ReleasedStatistic
from fedtre.serde.common import node_result_from_proto as result_from_wire
from fedtre.serde.common import node_result_to_proto as result_to_wire
from fedtre.serde.common import refusal_from_proto as refusal_from_wire
from fedtre.serde.common import refusal_to_proto as refusal_to_wire
from fedtre.serde.node import (
    decision_from_proto,
    decision_to_proto,
    description_from_proto,
    description_to_proto,
    node_outcome_from_proto,
    node_outcome_to_proto,
    prepare_request_from_proto,
    prepare_request_to_proto,
)
from fedtre.status import code_for
from fedtre.v2 import common_pb2 as pb
from fedtre.v2 import node_pb2 as npb


def _result() -> NodeResult:
    count = ReleasedStatistic(
        "count", (10, 20, -1), 1, 1.0, 1.35, 300_000, "opendp.discrete_laplace"
    )
    total = ReleasedStatistic(
        "sum", (100, 200, 3), 120, 400.0, 560.0, 200_000, "opendp.discrete_laplace"
    )
    persons = ReleasedStatistic(
        "count", (10, 20, 0), 10, 20.0, 27.0, 100_000, "opendp.discrete_laplace"
    )
    return NodeResult(
        query_id="q-1",
        node_id="trust-a",
        project_id="study",
        view="patients",
        catalog_version="1.0.0",
        reference_date="2025-03-31",
        group_by=("sex",),
        cells=(("female",), ("male",), ("unknown",)),
        aggregates=(
            ReleasedAggregate("n", AggregateKind.COUNT, None, (count,)),
            ReleasedAggregate("mean_age", AggregateKind.AVG, "age", (total, persons), 0, 120),
        ),
        epsilon_units=600_000,
        released_at="2026-11-23T12:00:00.000+00:00",
    )


def test_node_result_round_trips_exactly() -> None:
    result = _result()
    wire = result_to_wire(result)
    again = result_from_wire(pb.NodeResult.FromString(wire.SerializeToString()))
    assert again == result
    assert again.to_json() == result.to_json()


def test_values_of_every_type_round_trip() -> None:
    result = _result()
    cells = ((True, 3, "x"), (False, -2, ""), (True, 0, "é"))
    mixed = NodeResult(**{**result.__dict__, "group_by": ("a", "b", "c"), "cells": cells})
    assert result_from_wire(result_to_wire(mixed)).cells == cells


def _mutated(mutate) -> pb.NodeResult:  # type: ignore[no-untyped-def]
    msg = result_to_wire(_result())
    mutate(msg)
    return msg


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.ClearField("query_id"),
        lambda m: m.ClearField("node_id"),
        lambda m: m.ClearField("reference_date"),
        lambda m: setattr(m, "view", "x" * 500),
        lambda m: setattr(m, "epsilon_units", 0),
        lambda m: setattr(m, "epsilon_units", 999),
        lambda m: m.ClearField("cells"),
        lambda m: m.ClearField("aggregates"),
        lambda m: m.cells[0].values[0].ClearField("text"),
        lambda m: m.cells[0].values.add(text="extra"),
        lambda m: setattr(m.aggregates[0], "kind", pb.AGGREGATE_KIND_UNSPECIFIED),
        lambda m: setattr(m.aggregates[0], "kind", 99),
        lambda m: setattr(m.aggregates[0], "alias", ""),
        lambda m: m.aggregates[0].statistics[0].values.append(5),
        lambda m: setattr(m.aggregates[0].statistics[0], "noise_scale", 0.0),
        lambda m: setattr(m.aggregates[0].statistics[0], "noise_scale", math.nan),
        lambda m: setattr(m.aggregates[0].statistics[0], "noise_std", math.inf),
        lambda m: setattr(m.aggregates[0].statistics[0], "kind", pb.STATISTIC_KIND_UNSPECIFIED),
        lambda m: setattr(m.aggregates[0].statistics[0], "sensitivity", 0),
        lambda m: setattr(m.aggregates[0].statistics[0], "mechanism", ""),
        lambda m: m.aggregates[0].statistics.add().CopyFrom(m.aggregates[0].statistics[0]),
        lambda m: setattr(m.aggregates[1], "has_bounds", False),
        lambda m: setattr(m.aggregates[1], "lower", 500),
        lambda m: setattr(m.aggregates[0], "has_bounds", True),
        lambda m: m.aggregates[1].statistics.pop(),
    ],
)
def test_malformed_node_results_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError):
        result_from_wire(_mutated(mutate))


def test_empty_message_is_refused() -> None:
    with pytest.raises(WireError):
        result_from_wire(pb.NodeResult())


def test_every_refusal_has_a_wire_name_and_a_status_code() -> None:
    for refusal in Refusal:
        assert refusal_from_wire(refusal_to_wire(refusal)) is refusal
        assert isinstance(code_for(refusal), grpc.StatusCode)
    assert refusal_from_wire(pb.REFUSAL_UNSPECIFIED) is None
    assert refusal_from_wire(12345) is None
    assert code_for(Refusal.BUDGET_EXHAUSTED) is not grpc.StatusCode.RESOURCE_EXHAUSTED


# -- the node protocol ------------------------------------------------------------------------

BUDGET = BudgetReport("trust-a", "study", 5_000_000, 600_000, 4_400_000)
OUTCOMES = [
    NodeOutcome(OutcomeKind.PREPARED, "trust-a", "study", "q-1", epsilon_units=600_000),
    NodeOutcome(OutcomeKind.PREPARED, "trust-a", "study", "q-1", 600_000, replayed=True),
    NodeOutcome(
        OutcomeKind.COMMITTED, "trust-a", "study", "q-1", 600_000, result=_result(), budget=BUDGET
    ),
    NodeOutcome(OutcomeKind.ABORTED, "trust-a", "study", "q-1", 600_000, budget=BUDGET),
    NodeOutcome(OutcomeKind.BUDGET, "trust-a", "study", budget=BUDGET),
    NodeOutcome(
        OutcomeKind.REFUSED,
        "trust-a",
        "study",
        "q-1",
        refusal=Refusal.BUDGET_EXHAUSTED,
        reason="Not enough privacy budget is left for this query.",
    ),
    NodeOutcome(OutcomeKind.FAILED, "trust-a", "study", "q-1", reason="Internal error."),
]


@pytest.mark.parametrize("outcome", OUTCOMES, ids=lambda o: o.kind.value)
def test_node_replies_round_trip_exactly(outcome: NodeOutcome) -> None:
    wire = node_outcome_to_proto(outcome).SerializeToString()
    assert node_outcome_from_proto(npb.NodeReply.FromString(wire)) == outcome


def test_requests_round_trip() -> None:
    prepare = PrepareRequest("q-1", "study", "SELECT COUNT(*) FROM patients", 100_000, "alice")
    assert prepare_request_from_proto(prepare_request_to_proto(prepare)) == prepare
    decision = Decision("q-1", "study")
    assert decision_from_proto(decision_to_proto(decision)) == decision
    description = NodeDescription("trust-a", "2.0.0", "abc", ("p1", "p2"))
    assert description_from_proto(description_to_proto(description)) == description


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: setattr(m, "outcome", npb.OUTCOME_UNSPECIFIED),
        lambda m: setattr(m, "outcome", 77),
        lambda m: m.ClearField("node_id"),
        lambda m: m.ClearField("result"),  # committed without a result
        lambda m: setattr(m, "outcome", npb.OUTCOME_PREPARED),  # prepared carrying a result
        lambda m: setattr(m.result, "epsilon_units", 1),  # the result itself malformed
    ],
)
def test_malformed_node_replies_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    msg = node_outcome_to_proto(OUTCOMES[2])
    mutate(msg)
    with pytest.raises(WireError):
        node_outcome_from_proto(msg)


def test_a_refusal_without_its_code_and_a_budget_reply_without_a_budget_are_refused() -> None:
    refused = node_outcome_to_proto(OUTCOMES[5])
    refused.refusal = pb.REFUSAL_UNSPECIFIED
    with pytest.raises(WireError):
        node_outcome_from_proto(refused)
    budget = node_outcome_to_proto(OUTCOMES[4])
    budget.ClearField("budget")
    with pytest.raises(WireError):
        node_outcome_from_proto(budget)


def test_unavailable_is_never_sent_by_a_node() -> None:
    with pytest.raises(WireError):
        node_outcome_to_proto(NodeOutcome(OutcomeKind.UNAVAILABLE, "trust-a"))

"""The wire contract: round trips, and every malformed field refused on receipt."""

from __future__ import annotations

import math

import grpc
import pytest

from fedtre.errors import Refusal, WireError
from fedtre.plan import AggregateKind
from fedtre.result import NodeResult, ReleasedAggregate, ReleasedStatistic
from fedtre.serde import refusal_from_wire, refusal_to_wire, result_from_wire, result_to_wire
from fedtre.status import code_for
from fedtre.v1 import common_pb2 as pb


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

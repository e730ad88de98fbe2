"""Serde for ``common.proto``: values, cells, node results, refusal codes, and size limits.

proto3 accepts empty, missing and unknown fields silently, so everything read from the wire is
validated here, field by field, before any other code sees it:

* request fields are checked by the engines (``fedtre.request``, ``parse_query``, ε limits)
  after the request is audited, and refused with a plain reason;
* answers a client receives from another fedtre service raise ``WireError`` (an internal error:
  a bug or a misbehaving peer), never a half-read result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

from fedtre.catalog import Value
from fedtre.errors import Refusal, WireError
from fedtre.plan import AggregateKind
from fedtre.request import SignedQuery
from fedtre.result import NodeResult, ReleasedAggregate, ReleasedStatistic
from fedtre.v2 import common_pb2 as pb

MAX_TEXT = 10_000  # SQL and other free text
MAX_NAME = 128
# Wire size limits (RESOURCE_EXHAUSTED above them), checked by the servers' caller policy; gRPC
# refuses larger messages still (its limit: 1 MiB, or 8 MiB where answers arrive), and the policy
# audits those too (fedtre.tls.NO_REQUEST).
MAX_REQUEST_BYTES = 64 * 1024
MAX_RESULT_BYTES = 8 * 1024 * 1024

_AGGREGATE_KINDS = {
    AggregateKind.COUNT: pb.AGGREGATE_KIND_COUNT,
    AggregateKind.COUNT_PERSONS: pb.AGGREGATE_KIND_COUNT_PERSONS,
    AggregateKind.SUM: pb.AGGREGATE_KIND_SUM,
    AggregateKind.AVG: pb.AGGREGATE_KIND_AVG,
}
_AGGREGATE_KINDS_BACK = {v: k for k, v in _AGGREGATE_KINDS.items()}
_STATISTIC_KINDS = {
    "count": pb.STATISTIC_KIND_COUNT,
    "count_persons": pb.STATISTIC_KIND_COUNT_PERSONS,
    "sum": pb.STATISTIC_KIND_SUM,
}
_STATISTIC_KINDS_BACK = {v: k for k, v in _STATISTIC_KINDS.items()}


# -- refusals ---------------------------------------------------------------------------------


def signed_query_to_proto(signed: SignedQuery | None) -> pb.SignedQuery | None:
    if signed is None:
        return None
    return pb.SignedQuery(
        statement=signed.statement, signature=signed.signature, certificate=signed.certificate
    )


def signed_query_from_proto(msg: pb.SignedQuery, present: bool) -> SignedQuery | None:
    """``present``: the field was set (proto3 gives an empty message otherwise)."""
    if not present:
        return None
    return SignedQuery(bytes(msg.statement), bytes(msg.signature), bytes(msg.certificate))


def refusal_to_proto(refusal: Refusal) -> pb.Refusal:
    return cast(pb.Refusal, pb.Refusal.Value(f"REFUSAL_{refusal.name}"))


def refusal_from_proto(value: int) -> Refusal | None:
    try:
        name = pb.Refusal.Name(value)
    except ValueError:
        return None
    try:
        return Refusal[name.removeprefix("REFUSAL_")]
    except KeyError:
        return None


def refusal_from_name(name: str) -> Refusal | None:
    try:
        return Refusal(name)
    except ValueError:
        return None


def aggregate_kind_to_proto(kind: AggregateKind) -> pb.AggregateKind:
    return _AGGREGATE_KINDS[kind]


def aggregate_kind_from_proto(value: int) -> AggregateKind:
    try:
        return _AGGREGATE_KINDS_BACK[value]  # type: ignore[index]
    except KeyError:
        raise WireError("unknown aggregate kind") from None


# -- values -----------------------------------------------------------------------------------


def value_to_proto(value: Value) -> pb.Value:
    if isinstance(value, bool):
        return pb.Value(boolean=value)
    if isinstance(value, int):
        return pb.Value(integer=value)
    return pb.Value(text=value)


def value_from_proto(msg: pb.Value) -> Value:
    which = msg.WhichOneof("kind")
    if which == "text":
        return str(msg.text)
    if which == "integer":
        return int(msg.integer)
    if which == "boolean":
        return bool(msg.boolean)
    raise WireError("a cell value is empty")


def cells_to_proto(cells: Sequence[Sequence[Value]]) -> list[pb.Cell]:
    return [pb.Cell(values=[value_to_proto(v) for v in cell]) for cell in cells]


def cells_from_proto(cells: Sequence[pb.Cell], width: int) -> tuple[tuple[Value, ...], ...]:
    out = []
    for cell in cells:
        if len(cell.values) != width:
            raise WireError("a cell has the wrong number of group values")
        out.append(tuple(value_from_proto(v) for v in cell.values))
    return tuple(out)


# -- node results -----------------------------------------------------------------------------


def node_result_to_proto(result: NodeResult) -> pb.NodeResult:
    return pb.NodeResult(
        query_id=result.query_id,
        node_id=result.node_id,
        project_id=result.project_id,
        view=result.view,
        catalog_version=result.catalog_version,
        reference_date=result.reference_date,
        group_by=list(result.group_by),
        cells=cells_to_proto(result.cells),
        aggregates=[
            pb.Aggregate(
                alias=a.alias,
                kind=aggregate_kind_to_proto(a.kind),
                column=a.column or "",
                has_bounds=a.lower is not None,
                lower=a.lower or 0,
                upper=a.upper or 0,
                statistics=[
                    pb.Statistic(
                        kind=_STATISTIC_KINDS[s.kind],
                        values=list(s.values),
                        sensitivity=s.sensitivity,
                        noise_scale=s.noise_scale,
                        noise_std=s.noise_std,
                        epsilon_units=s.epsilon_units,
                        mechanism=s.mechanism,
                    )
                    for s in a.statistics
                ],
            )
            for a in result.aggregates
        ],
        epsilon_units=result.epsilon_units,
        released_at=result.released_at,
        data_as_of=result.data_as_of,
    )


def _as_of(text: str) -> str:
    """A trust's extract date: YYYY-MM-DD, or "" (answers stored before it was recorded)."""
    if text and not (len(text) == 10 and text[4] == "-" and text[7] == "-"):
        raise WireError("node result's data date is not a date")
    return text


def node_result_from_proto(msg: pb.NodeResult) -> NodeResult:
    """Read a node's answer, refusing anything that does not fit the contract."""
    names = ("query_id", "node_id", "project_id", "view", "catalog_version", "released_at")
    for name in (*names, "reference_date"):
        value = getattr(msg, name)
        if not value or len(value) > MAX_NAME:
            raise WireError(f"node result field {name} is missing or too long")
    if msg.epsilon_units <= 0:
        raise WireError("node result has no ε")
    cells = cells_from_proto(msg.cells, len(msg.group_by))
    if not cells:
        raise WireError("node result has no cells")
    if not msg.aggregates:
        raise WireError("node result has no aggregates")
    aggregates = tuple(_aggregate_from_proto(a, len(cells)) for a in msg.aggregates)
    if sum(s.epsilon_units for a in aggregates for s in a.statistics) != msg.epsilon_units:
        raise WireError("node result's ε shares do not add up")
    return NodeResult(
        query_id=msg.query_id,
        node_id=msg.node_id,
        project_id=msg.project_id,
        view=msg.view,
        catalog_version=msg.catalog_version,
        reference_date=msg.reference_date,
        group_by=tuple(msg.group_by),
        cells=cells,
        aggregates=aggregates,
        epsilon_units=int(msg.epsilon_units),
        released_at=msg.released_at,
        data_as_of=_as_of(msg.data_as_of),
    )


def _aggregate_from_proto(msg: pb.Aggregate, n_cells: int) -> ReleasedAggregate:
    kind = aggregate_kind_from_proto(msg.kind)
    expected = 2 if kind is AggregateKind.AVG else 1
    if len(msg.statistics) != expected:
        raise WireError("an aggregate has the wrong number of statistics")
    if not msg.alias:
        raise WireError("an aggregate has no name")
    needs_bounds = kind in (AggregateKind.SUM, AggregateKind.AVG)
    if msg.has_bounds != needs_bounds or (needs_bounds and msg.lower > msg.upper):
        raise WireError("an aggregate's bounds are missing or invalid")
    stats = []
    for s in msg.statistics:
        stat_kind = _STATISTIC_KINDS_BACK.get(s.kind)
        if stat_kind is None:
            raise WireError("unknown statistic kind")
        if len(s.values) != n_cells:
            raise WireError("a statistic has the wrong number of values")
        if not (math.isfinite(s.noise_scale) and s.noise_scale > 0):
            raise WireError("a statistic has no valid noise scale")
        if not (math.isfinite(s.noise_std) and s.noise_std > 0):
            raise WireError("a statistic has no valid noise std")
        if s.epsilon_units <= 0 or s.sensitivity <= 0 or not s.mechanism:
            raise WireError("a statistic has no ε, sensitivity or mechanism")
        stats.append(
            ReleasedStatistic(
                kind=stat_kind,
                values=tuple(int(v) for v in s.values),
                sensitivity=int(s.sensitivity),
                noise_scale=float(s.noise_scale),
                noise_std=float(s.noise_std),
                epsilon_units=int(s.epsilon_units),
                mechanism=s.mechanism,
            )
        )
    return ReleasedAggregate(
        alias=msg.alias,
        kind=kind,
        column=msg.column or None,
        statistics=tuple(stats),
        lower=int(msg.lower) if needs_bounds else None,
        upper=int(msg.upper) if needs_bounds else None,
    )

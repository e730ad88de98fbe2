"""Fan-out: one persistent mutual-TLS channel per trust; every call carries a deadline.

Calls to all trusts are started at once (gRPC futures, no thread per trust) and collected when
each finishes or its deadline passes, so the slowest or a frozen trust bounds the wait, never the
sum. A trust's outcome is one of: answered, unavailable (down, unreachable, deadline), refused
(its own checks said no, with its reason), failed (an internal error or a malformed answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import grpc

from coordinator.config import TrustEndpoint
from fedtre.errors import Refusal, WireError
from fedtre.result import NodeResult
from fedtre.serde import MAX_REQUEST_BYTES, MAX_RESULT_BYTES, result_from_wire
from fedtre.status import failure_from
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v1 import node_pb2 as npb
from fedtre.v1 import node_pb2_grpc


class TrustState(Enum):
    ANSWERED = "answered"
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True)
class TrustOutcome:
    node_id: str
    state: TrustState
    result: NodeResult | None = None
    replayed: bool = False
    refusal: Refusal | None = None
    reason: str = ""
    remaining_units: int | None = None
    handling_ms: float = 0.0


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RESULT_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    # A restarted trust is found again within seconds, not after gRPC's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
]


class Trusts:
    """Channels to every configured trust, opened once and reused."""

    def __init__(self, endpoints: Mapping[str, TrustEndpoint], tls: TlsFiles | None) -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, node_pb2_grpc.NodeServiceStub] = {}
        for node_id, endpoint in endpoints.items():
            if tls is None:
                channel = grpc.insecure_channel(endpoint.address, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.secure_channel(
                    endpoint.address,
                    channel_credentials(tls),
                    options=[*_CHANNEL_OPTIONS, *channel_options(node_id)],
                )
            channel.subscribe(_ignore, try_to_connect=True)  # connect now, not at the first query
            self._channels[node_id] = channel
            self._stubs[node_id] = node_pb2_grpc.NodeServiceStub(channel)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.unsubscribe(_ignore)
            channel.close()

    def answer(
        self, node_ids: Sequence[str], request: npb.AnswerRequest, deadline_seconds: float
    ) -> list[TrustOutcome]:
        calls = {
            nid: self._stubs[nid].Answer.future(request, timeout=deadline_seconds)
            for nid in node_ids
        }
        return [_collect(nid, call, request) for nid, call in calls.items()]

    def budget(
        self, node_ids: Sequence[str], project_id: str, deadline_seconds: float
    ) -> list[TrustOutcome]:
        request = npb.NodeBudgetRequest(project_id=project_id)
        calls = {
            nid: self._stubs[nid].Budget.future(request, timeout=deadline_seconds)
            for nid in node_ids
        }
        outcomes = []
        for nid, call in calls.items():
            try:
                budget = call.result()
            except grpc.RpcError as exc:
                outcomes.append(_failed_call(nid, exc))
                continue
            outcomes.append(
                TrustOutcome(nid, TrustState.ANSWERED, remaining_units=budget.remaining_units)
            )
        return outcomes


def _ignore(state: grpc.ChannelConnectivity) -> None:
    pass


def _collect(node_id: str, call: grpc.Future, request: npb.AnswerRequest) -> TrustOutcome:
    try:
        response = call.result()
    except grpc.RpcError as exc:
        return _failed_call(node_id, exc)
    try:
        result = result_from_wire(response.result)
    except WireError:
        return TrustOutcome(node_id, TrustState.FAILED, reason="sent a malformed answer")
    if (
        result.node_id != node_id
        or result.query_id != request.query_id
        or result.project_id != request.project_id
    ):
        return TrustOutcome(node_id, TrustState.FAILED, reason="answered a different query")
    if result.epsilon_units != request.epsilon_units:
        return TrustOutcome(node_id, TrustState.FAILED, reason="charged a different ε")
    return TrustOutcome(
        node_id,
        TrustState.ANSWERED,
        result=result,
        replayed=response.replayed,
        remaining_units=response.budget.remaining_units if response.HasField("budget") else None,
        handling_ms=response.handling_ms,
    )


def _failed_call(node_id: str, exc: grpc.RpcError) -> TrustOutcome:
    failure = failure_from(exc)
    if failure.unavailable:
        return TrustOutcome(node_id, TrustState.UNAVAILABLE, reason=failure.message)
    if failure.refusal is not None:
        return TrustOutcome(
            node_id, TrustState.REFUSED, refusal=failure.refusal, reason=failure.message
        )
    if failure.code is grpc.StatusCode.PERMISSION_DENIED:
        return TrustOutcome(
            node_id, TrustState.REFUSED, refusal=Refusal.NOT_AUTHORISED, reason=failure.message
        )
    return TrustOutcome(node_id, TrustState.FAILED, reason=failure.message)

"""Fan-out: one persistent mutual-TLS channel per trust; every call carries a deadline.

Calls to all trusts are started at once on a persistent thread pool (gRPC's own ``.future()``
starts a new OS thread per idle channel per call: measurably slower at 20 trusts) and collected
when each finishes or the query's deadline passes, so the slowest or a frozen trust bounds the
wait, never the sum. The deadline is fixed when the query starts: time a call waits for a pool
thread counts against it. A trust's outcome is one of: answered, unavailable (down,
unreachable, deadline), refused (its own checks said no, with its reason), failed (an internal
error or a malformed answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
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
    handling_ms: float = 0.0  # the trust's own time, its answer slot included: operators only


# One call to one trust: the stub, the trust's id and the time left until the query's deadline.
Call = Callable[[node_pb2_grpc.NodeServiceStub, str, float], TrustOutcome]

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
            grpc.channel_ready_future(channel)  # connect now, not at the first query
            self._channels[node_id] = channel
            self._stubs[node_id] = node_pb2_grpc.NodeServiceStub(channel)
        self._pool = futures.ThreadPoolExecutor(
            max_workers=min(256, max(8, 4 * len(endpoints))), thread_name_prefix="fanout"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for channel in self._channels.values():
            channel.close()

    def answer(
        self, node_ids: Sequence[str], request: npb.AnswerRequest, deadline_seconds: float
    ) -> list[TrustOutcome]:
        def call(stub: node_pb2_grpc.NodeServiceStub, nid: str, timeout: float) -> TrustOutcome:
            return _answered(nid, stub.Answer(request, timeout=timeout), request)

        return self._fan_out(node_ids, call, deadline_seconds)

    def budget(
        self, node_ids: Sequence[str], project_id: str, deadline_seconds: float
    ) -> list[TrustOutcome]:
        request = npb.NodeBudgetRequest(project_id=project_id)

        def call(stub: node_pb2_grpc.NodeServiceStub, nid: str, timeout: float) -> TrustOutcome:
            remaining = stub.Budget(request, timeout=timeout).remaining_units
            return TrustOutcome(nid, TrustState.ANSWERED, remaining_units=remaining)

        return self._fan_out(node_ids, call, deadline_seconds)

    def _fan_out(
        self, node_ids: Sequence[str], call: Call, deadline_seconds: float
    ) -> list[TrustOutcome]:
        deadline_at = time.monotonic() + deadline_seconds
        pending = [self._pool.submit(self._one, nid, call, deadline_at) for nid in node_ids]
        return [p.result() for p in pending]

    def _one(self, node_id: str, call: Call, deadline_at: float) -> TrustOutcome:
        timeout = max(0.001, deadline_at - time.monotonic())
        try:
            return call(self._stubs[node_id], node_id, timeout)
        except grpc.RpcError as exc:
            return _failed_call(node_id, exc)


def _answered(
    node_id: str, response: npb.AnswerResponse, request: npb.AnswerRequest
) -> TrustOutcome:
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

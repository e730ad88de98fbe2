"""``DialInLink``: the coordinator dials a trust's ``NodeService`` over mutual TLS.

One persistent channel per trust; every call carries the deadline it is given. Refusals come
inside the reply; a gRPC error means the trust could not be asked (``UNAVAILABLE``) or the
call itself failed (``FAILED``; ``PERMISSION_DENIED`` from the node's certificate policy is a
refusal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.links import LinkDown
from fedtre.errors import Refusal, WireError
from fedtre.pki import Role
from fedtre.protocol import Decision, NodeDescription, NodeOutcome, OutcomeKind, PrepareRequest
from fedtre.serde.common import MAX_REQUEST_BYTES, MAX_RESULT_BYTES
from fedtre.serde.node import (
    budget_request_to_proto,
    decision_to_proto,
    describe_request_to_proto,
    description_from_proto,
    node_outcome_from_proto,
    prepare_request_to_proto,
)
from fedtre.status import failure_from
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v2 import node_pb2 as npb
from fedtre.v2 import node_pb2_grpc

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RESULT_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    # A restarted trust is found again within seconds, not after gRPC's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
]


class DialInLink:
    def __init__(self, node_id: str, address: str, tls: TlsFiles | None) -> None:
        self.node_id = node_id
        self.address = address
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                address,
                channel_credentials(tls),
                options=[*CHANNEL_OPTIONS, *channel_options(node_id, Role.NODE)],
            )
        self._state = grpc.ChannelConnectivity.IDLE
        # Connect now, not at the first query, and follow the channel's state for operators.
        self._channel.subscribe(self._track, try_to_connect=True)
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _track(self, state: grpc.ChannelConnectivity) -> None:
        self._state = state

    def prepare(self, request: PrepareRequest, timeout: float) -> NodeOutcome:
        message = prepare_request_to_proto(request)
        return self._reply(lambda: self._stub.Prepare(message, timeout=timeout), request.query_id)

    def commit(self, decision: Decision, timeout: float) -> NodeOutcome:
        message = decision_to_proto(decision)
        return self._reply(lambda: self._stub.Commit(message, timeout=timeout), decision.query_id)

    def abort(self, decision: Decision, timeout: float) -> NodeOutcome:
        message = decision_to_proto(decision)
        return self._reply(lambda: self._stub.Abort(message, timeout=timeout), decision.query_id)

    def budget(self, project_id: str, timeout: float) -> NodeOutcome:
        message = budget_request_to_proto(project_id)
        return self._reply(lambda: self._stub.Budget(message, timeout=timeout), "")

    def describe(self, timeout: float, checkpoints: tuple[str, ...] = ()) -> NodeDescription:
        try:
            reply = self._stub.Describe(describe_request_to_proto(checkpoints), timeout=timeout)
            return description_from_proto(reply)
        except grpc.RpcError as exc:
            raise LinkDown(failure_from(exc).message) from None
        except WireError as exc:
            raise LinkDown(f"sent a malformed description ({exc})") from None

    def reachable(self) -> bool:
        """The node's standard health service says SERVING (not audited, reads no data)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def status(self) -> str:
        return f"dial-in {self.address}, channel {self._state.name.lower()}"

    def close(self) -> None:
        self._channel.unsubscribe(self._track)
        self._channel.close()

    def _reply(self, call: Callable[[], npb.NodeReply], query_id: str) -> NodeOutcome:
        try:
            return node_outcome_from_proto(call())
        except WireError:
            return NodeOutcome(
                OutcomeKind.FAILED, self.node_id, query_id=query_id, reason="sent a malformed reply"
            )
        except grpc.RpcError as exc:
            return call_failed(self.node_id, exc, query_id)


def call_failed(node_id: str, exc: grpc.RpcError, query_id: str = "") -> NodeOutcome:
    failure = failure_from(exc)
    if failure.unavailable:
        return NodeOutcome(
            OutcomeKind.UNAVAILABLE, node_id, query_id=query_id, reason=failure.message
        )
    if failure.code is grpc.StatusCode.PERMISSION_DENIED:
        return NodeOutcome(
            OutcomeKind.REFUSED,
            node_id,
            query_id=query_id,
            refusal=Refusal.NOT_AUTHORISED,
            reason=failure.message,
            before_handler=True,
        )
    return NodeOutcome(OutcomeKind.FAILED, node_id, query_id=query_id, reason=failure.message)

"""The node's gRPC servicer (``fedtre.v2.NodeService``): thin. Convert from the wire, call the
handler, convert back.

Who the caller is comes from its certificate (``fedtre.tls``), checked by the server's
``CallerPolicy`` before this code runs; everything the request claims is checked by the
engine, after the engine has written the request to the audit log. Refusals travel inside the
reply (``NodeReply``), never as status codes.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from fedtre.serde.node import (
    budget_request_from_proto,
    decision_from_proto,
    describe_request_from_proto,
    description_to_proto,
    node_outcome_to_proto,
    prepare_request_from_proto,
)
from fedtre.status import abort
from fedtre.v2 import node_pb2 as npb
from fedtre.v2 import node_pb2_grpc
from node.handler import NodeHandler


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, handler: NodeHandler, caller: Callable[[grpc.ServicerContext], str]) -> None:
        self.handler = handler
        self._caller = caller

    def Prepare(self, request: npb.PrepareRequest, context: grpc.ServicerContext) -> npb.NodeReply:
        outcome = self.handler.prepare(
            prepare_request_from_proto(request),
            self._caller(context),
            time_left=context.time_remaining(),
            cancelled=lambda: not context.is_active(),
        )
        return node_outcome_to_proto(outcome)

    def Commit(self, request: npb.DecisionRequest, context: grpc.ServicerContext) -> npb.NodeReply:
        outcome = self.handler.commit(decision_from_proto(request), self._caller(context))
        return node_outcome_to_proto(outcome)

    def Abort(self, request: npb.DecisionRequest, context: grpc.ServicerContext) -> npb.NodeReply:
        outcome = self.handler.abort(decision_from_proto(request), self._caller(context))
        return node_outcome_to_proto(outcome)

    def Budget(self, request: npb.BudgetRequest, context: grpc.ServicerContext) -> npb.NodeReply:
        project_id = budget_request_from_proto(request)
        return node_outcome_to_proto(self.handler.budget(project_id, self._caller(context)))

    def Describe(
        self, request: npb.DescribeRequest, context: grpc.ServicerContext
    ) -> npb.NodeDescription:
        try:
            description = self.handler.describe(
                self._caller(context), describe_request_from_proto(request)
            )
        except Exception as exc:  # the audit log failed: nothing is described
            abort(context, exc)
        return description_to_proto(description)

"""Serde for ``link.proto``: the outbound link's envelopes (``fedtre.protocol.LinkRequest`` and
``LinkReply``), carrying the node protocol's requests and replies (``fedtre.serde.node``)."""

from __future__ import annotations

import math

from fedtre.errors import WireError
from fedtre.protocol import Call, Hello, LinkReply, LinkRequest
from fedtre.serde.common import MAX_NAME
from fedtre.serde.node import (
    budget_request_from_proto,
    budget_request_to_proto,
    decision_from_proto,
    decision_to_proto,
    describe_request_from_proto,
    describe_request_to_proto,
    description_from_proto,
    description_to_proto,
    node_outcome_from_proto,
    node_outcome_to_proto,
    prepare_request_from_proto,
    prepare_request_to_proto,
)
from fedtre.v2 import link_pb2 as lpb


def link_request_to_proto(r: LinkRequest) -> lpb.CoordinatorToNode:
    msg = lpb.CoordinatorToNode(call_id=r.call_id, time_left_seconds=r.time_left)
    if r.call is Call.PREPARE:
        assert r.prepare is not None
        msg.prepare.CopyFrom(prepare_request_to_proto(r.prepare))
    elif r.call in (Call.COMMIT, Call.ABORT):
        assert r.decision is not None
        target = msg.commit if r.call is Call.COMMIT else msg.abort
        target.CopyFrom(decision_to_proto(r.decision))
    elif r.call is Call.BUDGET:
        msg.budget.CopyFrom(budget_request_to_proto(r.project_id))
    elif r.call is Call.DESCRIBE:
        msg.describe.CopyFrom(describe_request_to_proto(r.checkpoints))
    elif r.call is Call.CANCEL:
        msg.cancel.CopyFrom(lpb.Cancel())
    else:
        msg.heartbeat.sequence = r.sequence
    return msg


def link_request_from_proto(msg: lpb.CoordinatorToNode) -> LinkRequest:
    which = msg.WhichOneof("call")
    call_id = int(msg.call_id)
    left = msg.time_left_seconds if math.isfinite(msg.time_left_seconds) else 0.0
    left = max(0.0, left)
    if which == "prepare":
        prepare = prepare_request_from_proto(msg.prepare)
        return LinkRequest(call_id, Call.PREPARE, left, prepare=prepare)
    if which in ("commit", "abort"):
        decision = decision_from_proto(getattr(msg, which))
        return LinkRequest(call_id, Call(which), left, decision=decision)
    if which == "budget":
        project_id = budget_request_from_proto(msg.budget)
        return LinkRequest(call_id, Call.BUDGET, left, project_id=project_id)
    if which == "describe":
        checkpoints = describe_request_from_proto(msg.describe)
        return LinkRequest(call_id, Call.DESCRIBE, left, checkpoints=checkpoints)
    if which == "cancel":
        return LinkRequest(call_id, Call.CANCEL)
    if which == "heartbeat":
        return LinkRequest(call_id, Call.HEARTBEAT, left, sequence=int(msg.heartbeat.sequence))
    raise WireError("a link message carries no call")


def link_reply_to_proto(r: LinkReply) -> lpb.NodeToCoordinator:
    msg = lpb.NodeToCoordinator(call_id=r.call_id)
    if r.hello is not None:
        msg.hello.node_id = r.hello.node_id
        msg.hello.catalog_version = r.hello.catalog_version
    elif r.outcome is not None:
        msg.reply.CopyFrom(node_outcome_to_proto(r.outcome))
    elif r.description is not None:
        msg.description.CopyFrom(description_to_proto(r.description))
    else:
        msg.heartbeat.sequence = r.heartbeat or 0
    return msg


def link_reply_from_proto(msg: lpb.NodeToCoordinator) -> LinkReply:
    which = msg.WhichOneof("body")
    call_id = int(msg.call_id)
    if which == "hello":
        if not msg.hello.node_id or len(msg.hello.node_id) > MAX_NAME:
            raise WireError("a hello names no node")
        return LinkReply(call_id, hello=Hello(msg.hello.node_id, msg.hello.catalog_version))
    if which == "reply":
        return LinkReply(call_id, outcome=node_outcome_from_proto(msg.reply))
    if which == "description":
        return LinkReply(call_id, description=description_from_proto(msg.description))
    if which == "heartbeat":
        return LinkReply(call_id, heartbeat=int(msg.heartbeat.sequence))
    raise WireError("a link message carries nothing")

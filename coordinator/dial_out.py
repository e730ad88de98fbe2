"""Outbound-only trusts: the node dials the coordinator (``TrustLinkService.Connect``) and holds
one stream; the coordinator sends calls down it and matches replies by call id.

``LinkHub`` is the servicer: it admits a stream only from a node certificate whose name is a
configured dial-out trust (checked by the server's ``CallerPolicy`` and again here against the
node's hello), keeps the newest stream per trust, sends heartbeats when idle and drops a stream
that has been silent for ``3 × HEARTBEAT_SECONDS``. ``DialOutLink`` is the ``TrustLink`` over
it: a trust that is not connected is ``UNAVAILABLE`` at once, never waited for.

Each open stream holds one of the server's worker threads (gRPC's synchronous server), so the
coordinator's pool is sized for its dial-out trusts on top of ``max_workers``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from coordinator.links import LinkDown
from fedtre import logs
from fedtre.errors import WireError
from fedtre.protocol import (
    HEARTBEAT_SECONDS,
    SILENCE_LIMIT,
    Call,
    Decision,
    LinkReply,
    LinkRequest,
    NodeDescription,
    NodeOutcome,
    OutcomeKind,
    PrepareRequest,
)
from fedtre.serde.link import link_reply_from_proto, link_request_to_proto
from fedtre.tls import peer_identity
from fedtre.v2 import link_pb2 as lpb
from fedtre.v2 import link_pb2_grpc

log = logs.get("coordinator")

CONNECT = "/fedtre.v2.TrustLinkService/Connect"
NOT_CONNECTED = "is not connected (a dial-out trust: its node has not dialled in)"
LOST = "lost its connection during the call"
LATE = "did not answer within the deadline"


class _Waiter:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: LinkReply | None = None
        self.lost = False


class Session:
    """One node's open stream."""

    def __init__(self, node_id: str, address: str) -> None:
        self.node_id = node_id
        self.address = address
        self.connected_at = time.time()
        self.last_heard = time.monotonic()
        self.outbox: queue.Queue[LinkRequest | None] = queue.Queue()
        self.closed = threading.Event()
        self.close_reason = ""
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def call(self, make: Callable[[int], LinkRequest], timeout: float) -> LinkReply | str:
        """Send one call and wait for its reply; or the reason there is none."""
        with self._lock:
            if self.closed.is_set():
                return LOST
            call_id = next(self._ids)
            waiter = _Waiter()
            self._pending[call_id] = waiter
        self.outbox.put(make(call_id))
        answered = waiter.event.wait(timeout)
        with self._lock:
            self._pending.pop(call_id, None)
        if waiter.reply is not None:
            return waiter.reply
        return LOST if (waiter.lost or (not answered and self.closed.is_set())) else LATE

    def deliver(self, reply: LinkReply) -> None:
        with self._lock:
            waiter = self._pending.get(reply.call_id)
        if waiter is not None:
            waiter.reply = reply
            waiter.event.set()

    def close(self, reason: str) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.close_reason = reason
            self.closed.set()
            waiters = list(self._pending.values())
        for w in waiters:
            w.lost = True
            w.event.set()
        self.outbox.put(None)


@dataclass(frozen=True)
class LinkState:
    node_id: str
    connected: bool
    since: float | None  # unix time the current stream opened
    address: str


class LinkHub(link_pb2_grpc.TrustLinkServiceServicer):
    def __init__(
        self,
        dial_out: frozenset[str],
        catalog_version: str,
        on_change: Callable[[str, bool, str], None] = lambda node, up, why: None,
        on_refused: Callable[[str, str, str], None] = lambda method, who, why: None,
    ) -> None:
        self.dial_out = dial_out
        self._on_refused = on_refused
        self.catalog_version = catalog_version
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._on_change = on_change
        self._closing = threading.Event()

    def session(self, node_id: str) -> Session | None:
        with self._lock:
            s = self._sessions.get(node_id)
        return s if s is not None and not s.closed.is_set() else None

    def state(self, node_id: str) -> LinkState:
        s = self.session(node_id)
        if s is None:
            return LinkState(node_id, False, None, "")
        return LinkState(node_id, True, s.connected_at, s.address)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.close("the coordinator is stopping")

    def Connect(
        self, request_iterator: Iterator[lpb.NodeToCoordinator], context: grpc.ServicerContext
    ) -> Iterator[lpb.CoordinatorToNode]:
        peer = peer_identity(context)
        name = peer.name if peer is not None else ""
        who = f"node:{name}"

        def refuse(code: grpc.StatusCode, why: str) -> None:
            self._on_refused(CONNECT, who, why)
            context.abort(code, why)

        if name not in self.dial_out:  # CallerPolicy admits only these; checked again here
            refuse(grpc.StatusCode.PERMISSION_DENIED, "not a dial-out trust of this hub")
        try:
            first = link_reply_from_proto(next(request_iterator))
        except (StopIteration, WireError, grpc.RpcError):
            refuse(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
            return
        hello = first.hello
        if hello is None or hello.node_id != name:
            refuse(grpc.StatusCode.PERMISSION_DENIED, "the hello must name the certificate's node")
            return
        if hello.catalog_version != self.catalog_version:
            log.warning(
                "trust link refused: catalog differs",
                extra={"node": name, "catalog_version": hello.catalog_version[:32]},
            )
            refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this coordinator serves catalog {self.catalog_version}; load the same "
                "catalog at the node",
            )
        session = Session(name, context.peer())
        with self._lock:
            old = self._sessions.get(name)
            self._sessions[name] = session
        if old is not None:
            old.close("replaced by a new connection")
        context.add_callback(lambda: session.close("the connection closed"))
        threading.Thread(
            target=self._read, args=(session, request_iterator), daemon=True, name=f"link-{name}"
        ).start()
        self._on_change(name, True, "connected")
        try:
            yield from self._send(session)
        finally:
            session.close("the stream ended")
            with self._lock:
                if self._sessions.get(name) is session:
                    del self._sessions[name]
            self._on_change(name, False, session.close_reason)

    def _send(self, session: Session) -> Iterator[lpb.CoordinatorToNode]:
        beats = itertools.count(1)
        yield link_request_to_proto(LinkRequest(0, Call.HEARTBEAT, sequence=0))  # welcome
        while not session.closed.is_set():
            try:
                item = session.outbox.get(timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                if time.monotonic() - session.last_heard > SILENCE_LIMIT:
                    session.close(f"silent for over {SILENCE_LIMIT:g} s")
                    return
                item = LinkRequest(0, Call.HEARTBEAT, sequence=next(beats))
            if item is None:
                return
            yield link_request_to_proto(item)

    def _read(self, session: Session, requests: Iterator[lpb.NodeToCoordinator]) -> None:
        try:
            for msg in requests:
                session.last_heard = time.monotonic()
                try:
                    reply = link_reply_from_proto(msg)
                except WireError:
                    bad = NodeOutcome(
                        OutcomeKind.FAILED, session.node_id, reason="sent a malformed reply"
                    )
                    session.deliver(LinkReply(int(msg.call_id), outcome=bad))
                    continue
                if reply.call_id:
                    session.deliver(reply)
        except grpc.RpcError:
            pass
        finally:
            session.close("the connection was lost")


class DialOutLink:
    """``TrustLink`` for a trust whose node dials in to ``hub``."""

    def __init__(self, node_id: str, hub: LinkHub) -> None:
        self.node_id = node_id
        self._hub = hub

    def prepare(self, request: PrepareRequest, timeout: float) -> NodeOutcome:
        return self._outcome(
            lambda i: LinkRequest(i, Call.PREPARE, timeout, prepare=request),
            timeout,
            request.query_id,
        )

    def commit(self, decision: Decision, timeout: float) -> NodeOutcome:
        return self._outcome(
            lambda i: LinkRequest(i, Call.COMMIT, timeout, decision=decision),
            timeout,
            decision.query_id,
        )

    def abort(self, decision: Decision, timeout: float) -> NodeOutcome:
        return self._outcome(
            lambda i: LinkRequest(i, Call.ABORT, timeout, decision=decision),
            timeout,
            decision.query_id,
        )

    def budget(self, project_id: str, timeout: float) -> NodeOutcome:
        return self._outcome(
            lambda i: LinkRequest(i, Call.BUDGET, timeout, project_id=project_id), timeout, ""
        )

    def describe(self, timeout: float, checkpoints: tuple[str, ...] = ()) -> NodeDescription:
        session = self._hub.session(self.node_id)
        if session is None:
            raise LinkDown(NOT_CONNECTED)
        reply = session.call(
            lambda i: LinkRequest(i, Call.DESCRIBE, timeout, checkpoints=checkpoints), timeout
        )
        if isinstance(reply, str) or reply.description is None:
            raise LinkDown(reply if isinstance(reply, str) else "sent no description")
        return reply.description

    def reachable(self) -> bool:
        return self._hub.session(self.node_id) is not None

    def status(self) -> str:
        state = self._hub.state(self.node_id)
        if not state.connected:
            return "dial-out, not connected"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.since or 0))
        return f"dial-out, connected since {since}"

    def close(self) -> None:
        pass  # the hub closes every stream

    def _outcome(
        self, make: Callable[[int], LinkRequest], timeout: float, query_id: str
    ) -> NodeOutcome:
        session = self._hub.session(self.node_id)
        if session is None:
            return NodeOutcome(
                OutcomeKind.UNAVAILABLE, self.node_id, query_id=query_id, reason=NOT_CONNECTED
            )
        reply = session.call(make, timeout)
        if isinstance(reply, str):
            return NodeOutcome(
                OutcomeKind.UNAVAILABLE, self.node_id, query_id=query_id, reason=reply
            )
        if reply.outcome is None:
            return NodeOutcome(
                OutcomeKind.FAILED, self.node_id, query_id=query_id, reason="sent no reply"
            )
        return reply.outcome

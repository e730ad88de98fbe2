"""Outbound-only mode: the node dials the coordinator and holds one stream per coordinator
address (``[server] mode = "dial-out"``). The trust opens no inbound port; its firewall allows
one outbound connection to the coordinator's address.

The node authenticates the coordinator by its certificate (the name in ``[server]
coordinator``) and presents its own node certificate; the coordinator checks it in turn. Every
call that arrives on the stream goes to the same ``NodeHandler`` as a dial-in call, so the node
checks everything itself, exactly as in dial-in mode. The stream is redialled with exponential
backoff and jitter when it breaks, and dropped when the coordinator has been silent (no call and
no heartbeat) for ``SILENCE_LIMIT`` seconds.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from fedtre import logs
from fedtre.pki import Role
from fedtre.protocol import HEARTBEAT_SECONDS, SILENCE_LIMIT, Call, Hello, LinkReply, LinkRequest
from fedtre.serde.common import MAX_REQUEST_BYTES, MAX_RESULT_BYTES
from fedtre.serde.link import link_reply_to_proto, link_request_from_proto
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v2 import link_pb2 as lpb
from fedtre.v2 import link_pb2_grpc
from node.handler import NodeHandler

log = logs.get("node")

BACKOFF_FIRST, BACKOFF_MAX = 0.25, 30.0

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_RESULT_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class DialOut:
    def __init__(
        self,
        handler: NodeHandler,
        addresses: tuple[str, ...],
        coordinator: str,
        tls: TlsFiles | None,
        catalog_version: str,
        workers: int,
        on_connected: Callable[[str], None] = lambda address: None,
    ) -> None:
        self.handler = handler
        self.addresses = addresses
        self.coordinator = coordinator
        self.tls = tls
        self.catalog_version = catalog_version
        self.on_connected = on_connected
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="link")
        self._stop = threading.Event()
        self._order_lock = threading.Lock()
        self._streams: dict[str, Any] = {}
        self._threads = [
            threading.Thread(target=self._run, args=(a,), name=f"dial-{a}", daemon=True)
            for a in addresses
        ]
        self.connected: dict[str, bool] = {a: False for a in addresses}

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for stream in list(self._streams.values()):
            stream.cancel()
        for t in self._threads:
            t.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- one coordinator address --------------------------------------------------------------

    def _run(self, address: str) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            started = time.monotonic()
            reason = self._session(address)
            if self._stop.is_set():
                return
            if time.monotonic() - started > SILENCE_LIMIT:  # it had been up: start over
                backoff = BACKOFF_FIRST
            wait = backoff * random.uniform(0.5, 1.5)
            log.warning(
                "coordinator link down; redialling",
                extra={"coordinator": address, "reason": reason, "retry_in_s": round(wait, 2)},
            )
            self._stop.wait(wait)
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _session(self, address: str) -> str:
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=_OPTIONS)
        else:
            channel = grpc.secure_channel(
                address,
                channel_credentials(self.tls),
                options=[*_OPTIONS, *channel_options(self.coordinator, Role.COORDINATOR)],
            )
        outbox: queue.Queue[LinkReply | None] = queue.Queue()
        node_id = self.handler.node_id
        outbox.put(LinkReply(0, hello=Hello(node_id, self.catalog_version)))
        alive = threading.Event()
        alive.set()
        last_heard = [time.monotonic()]
        cancelled: set[int] = set()  # call ids whose deadline passed at the coordinator
        order: dict[tuple[str, str], futures.Future[None]] = {}

        def outgoing() -> Iterator[lpb.NodeToCoordinator]:
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield link_reply_to_proto(item)

        stream = link_pb2_grpc.TrustLinkServiceStub(channel).Connect(outgoing())
        self._streams[address] = stream
        watchdog = threading.Thread(
            target=self._watch, args=(stream, alive, last_heard), daemon=True
        )
        watchdog.start()
        reason = "the stream ended"
        try:
            for msg in stream:
                last_heard[0] = time.monotonic()
                request = link_request_from_proto(msg)
                if not self.connected[address]:
                    self.connected[address] = True
                    log.info("coordinator link up", extra={"coordinator": address})
                    self.on_connected(address)
                if request.call is Call.HEARTBEAT:
                    outbox.put(LinkReply(0, heartbeat=request.sequence))
                    continue
                if request.call is Call.CANCEL:
                    if len(cancelled) > 10_000:  # ids only grow: old ones never recur
                        cancelled.clear()
                    cancelled.add(request.call_id)
                    continue
                self._dispatch(request, outbox, alive, cancelled, order)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else ""
            reason = f"{code.name if code else 'error'}: {(details or '')[:200]}"
        except Exception as exc:  # a malformed message: drop this stream, dial again
            reason = f"malformed message from the coordinator ({type(exc).__name__})"
        finally:
            self.connected[address] = False
            alive.clear()
            outbox.put(None)
            self._streams.pop(address, None)
            stream.cancel()
            channel.close()
        return reason

    def _watch(self, stream: Any, alive: threading.Event, last_heard: list[float]) -> None:
        while alive.is_set() and not self._stop.wait(HEARTBEAT_SECONDS / 2):
            if time.monotonic() - last_heard[0] > SILENCE_LIMIT:
                log.warning("coordinator silent; dropping the link", extra={})
                stream.cancel()
                return

    def _dispatch(
        self,
        request: LinkRequest,
        outbox: queue.Queue[LinkReply | None],
        alive: threading.Event,
        cancelled: set[int],
        order: dict[tuple[str, str], futures.Future[None]],
    ) -> None:
        """Run the call on the pool. Calls about one query id run in the order they arrived
        (an abort never overtakes its prepare); others run side by side. A call starts only
        after every earlier one (FIFO pool), so waiting for an earlier one cannot deadlock."""
        key = _query_key(request)
        with self._order_lock:
            before = order.get(key) if key else None

        def run() -> None:
            if before is not None:
                with contextlib.suppress(Exception):
                    before.result()
            self._handle(request, outbox, alive, cancelled)

        future = self._pool.submit(run)
        if key:
            order[key] = future
            future.add_done_callback(
                lambda f: order.pop(key, None) if order.get(key) is f else None
            )

    def _handle(
        self,
        request: LinkRequest,
        outbox: queue.Queue[LinkReply | None],
        alive: threading.Event,
        cancelled: set[int],
    ) -> None:
        caller = f"coordinator:{self.coordinator}"
        h = self.handler
        if request.call is Call.PREPARE and request.prepare is not None:
            call_id = request.call_id
            reply = LinkReply(
                request.call_id,
                outcome=h.prepare(
                    request.prepare,
                    caller,
                    time_left=request.time_left,
                    cancelled=lambda: not alive.is_set() or call_id in cancelled,
                ),
            )
        elif request.call is Call.COMMIT and request.decision is not None:
            reply = LinkReply(request.call_id, outcome=h.commit(request.decision, caller))
        elif request.call is Call.ABORT and request.decision is not None:
            reply = LinkReply(request.call_id, outcome=h.abort(request.decision, caller))
        elif request.call is Call.BUDGET:
            reply = LinkReply(request.call_id, outcome=h.budget(request.project_id, caller))
        elif request.call is Call.DESCRIBE:
            try:
                described = h.describe(caller, request.checkpoints)
                reply = LinkReply(request.call_id, description=described)
            except Exception:  # the audit log failed: the coordinator sees no description
                return
        else:
            return
        if alive.is_set():
            outbox.put(reply)


def _query_key(request: LinkRequest) -> tuple[str, str] | None:
    if request.prepare is not None:
        return (request.prepare.project_id, request.prepare.query_id)
    if request.decision is not None:
        return (request.decision.project_id, request.decision.query_id)
    return None

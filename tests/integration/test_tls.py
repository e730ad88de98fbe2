"""Mutual TLS and the caller policy on a real gRPC server (loopback, ephemeral ports).

The server plays a trust node (certificate ``node-trust-a``) whose one method only the
coordinator may call. Each refusal is checked twice: by the status the client sees, and by the
handler never having run.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtre import pki
from fedtre.pki import Role
from fedtre.tls import (
    INSECURE_PEER,
    NO_CERTIFICATE,
    NO_REQUEST,
    CallerPolicy,
    Peer,
    TlsFiles,
    caller,
    channel_credentials,
    channel_options,
    server_credentials,
)

TIMEOUT = 5.0
SERVICE = "fedtre.test.Probe"
UNARY = f"/{SERVICE}/Call"
STREAM = f"/{SERVICE}/Stream"
DENIED = "this service accepts only the federation coordinator's certificate"


@dataclass
class Calls:
    """What the handlers saw; refusals must leave this untouched."""

    peers: list[Peer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.peers.append(caller(context))

    def count(self) -> int:
        with self.lock:
            return len(self.peers)


@dataclass(frozen=True)
class Pki:
    home: Path
    foreign: Path

    def files(self, role: Role, name: str, *, foreign: bool = False) -> TlsFiles:
        return TlsFiles.in_pki_dir(self.foreign if foreign else self.home, role, name)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("tls")
    home, foreign = base / "pki", base / "foreign"
    pki.init_ca(home)
    pki.init_ca(foreign, common_name="some other CA")
    for role, name in [
        (Role.NODE, "trust-a"),
        (Role.NODE, "trust-b"),
        (Role.COORDINATOR, "hub"),
        (Role.RESEARCHER, "alice"),
    ]:
        pki.issue(home, role, name)
    pki.issue(foreign, Role.COORDINATOR, "hub")  # same name, wrong CA
    now = dt.datetime.now(dt.UTC)
    pki.issue(
        home,
        Role.COORDINATOR,
        "stale",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    return Pki(home, foreign)


def _start(calls: Calls, policy: CallerPolicy, creds: grpc.ServerCredentials | None) -> Any:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.record(context)
        return b"ok:" + request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.record(context)
        yield b"one"
        yield b"two"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[policy])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Call": grpc.unary_unary_rpc_method_handler(call),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            )
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def node(certs: Pki) -> Iterator[tuple[int, Calls]]:
    """A TLS server with trust-a's certificate that admits only the coordinator."""
    calls = Calls()
    policy = CallerPolicy(lambda p: p.role is Role.COORDINATOR, denied_message=DENIED)
    server, port = _start(calls, policy, server_credentials(certs.files(Role.NODE, "trust-a")))
    yield port, calls
    server.stop(None)


def _channel(
    port: int, creds: grpc.ChannelCredentials | None, expect: str = "trust-a"
) -> grpc.Channel:
    target = f"127.0.0.1:{port}"
    if creds is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, creds, options=channel_options(expect))


def _call(channel: grpc.Channel, **kwargs: Any) -> bytes:
    with channel:
        return channel.unary_unary(UNARY)(b"ping", timeout=TIMEOUT, **kwargs)


def _refused(channel: grpc.Channel, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, **kwargs)
    return info.value


def _health(channel: grpc.Channel) -> int:
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status


def test_the_coordinator_is_served_and_named_by_its_certificate(
    certs: Pki, node: tuple[int, Calls]
) -> None:
    port, calls = node
    before = calls.count()
    creds = channel_credentials(certs.files(Role.COORDINATOR, "hub"))
    assert _call(_channel(port, creds)) == b"ok:ping"
    assert calls.count() == before + 1
    assert calls.peers[-1] == Peer(Role.COORDINATOR, "hub")


def test_a_researcher_certificate_from_the_same_ca_is_denied_before_the_handler(
    certs: Pki, node: tuple[int, Calls]
) -> None:
    port, calls = node
    before = calls.count()
    creds = channel_credentials(certs.files(Role.RESEARCHER, "alice"))
    err = _refused(_channel(port, creds))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == DENIED
    # claiming to be the coordinator in metadata changes nothing: identity is the certificate
    err = _refused(
        _channel(port, creds), metadata=(("x-fedtre-role", "coordinator"), ("x-fedtre-name", "hub"))
    )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert calls.count() == before


def test_another_node_is_denied(certs: Pki, node: tuple[int, Calls]) -> None:
    port, calls = node
    before = calls.count()
    err = _refused(_channel(port, channel_credentials(certs.files(Role.NODE, "trust-b"))))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert calls.count() == before


def test_streaming_methods_are_guarded_too(certs: Pki, node: tuple[int, Calls]) -> None:
    port, calls = node
    before = calls.count()
    researcher = channel_credentials(certs.files(Role.RESEARCHER, "alice"))
    with _channel(port, researcher) as ch, pytest.raises(grpc.RpcError) as info:
        list(ch.unary_stream(STREAM)(b"x", timeout=TIMEOUT))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert calls.count() == before
    with _channel(port, channel_credentials(certs.files(Role.COORDINATOR, "hub"))) as ch:
        assert list(ch.unary_stream(STREAM)(b"x", timeout=TIMEOUT)) == [b"one", b"two"]
    assert calls.count() == before + 1
    assert calls.peers[-1] == Peer(Role.COORDINATOR, "hub")  # caller() works in a generator


@pytest.mark.parametrize(
    "case",
    [
        "foreign CA",
        "expired certificate",
        "no client certificate",
        "plaintext client",
        "server is not the expected node",
    ],
)
def test_handshake_failures_are_unavailable_and_never_reach_the_handler(
    certs: Pki, node: tuple[int, Calls], case: str
) -> None:
    port, calls = node
    before = calls.count()
    expect = "trust-a"
    creds: grpc.ChannelCredentials | None
    if case == "foreign CA":
        # trusts the home CA (so the server passes), presents a foreign-CA "hub" certificate
        foreign = certs.files(Role.COORDINATOR, "hub", foreign=True)
        creds = grpc.ssl_channel_credentials(
            root_certificates=(certs.home / "ca.pem").read_bytes(),
            private_key=foreign.key.read_bytes(),
            certificate_chain=foreign.cert.read_bytes(),
        )
    elif case == "expired certificate":
        creds = channel_credentials(certs.files(Role.COORDINATOR, "stale"))
    elif case == "no client certificate":
        creds = grpc.ssl_channel_credentials(root_certificates=(certs.home / "ca.pem").read_bytes())
    elif case == "plaintext client":
        creds = None
    else:
        creds = channel_credentials(certs.files(Role.COORDINATOR, "hub"))
        expect = "trust-b"  # the coordinator meant trust-b, but this address serves trust-a
    err = _refused(_channel(port, creds, expect))
    assert err.code() is grpc.StatusCode.UNAVAILABLE, (case, err.code(), err.details())
    assert calls.count() == before


def test_a_client_that_does_not_trust_our_ca_refuses_the_server(
    certs: Pki, node: tuple[int, Calls]
) -> None:
    port, calls = node
    before = calls.count()
    err = _refused(
        _channel(port, channel_credentials(certs.files(Role.COORDINATOR, "hub", foreign=True)))
    )
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert calls.count() == before


def test_a_researcher_certificate_cannot_serve(certs: Pki) -> None:
    """Researcher certificates carry clientAuth only; a client refuses one offered as a server's."""
    calls = Calls()
    server, port = _start(
        calls,
        CallerPolicy(lambda p: True),
        server_credentials(certs.files(Role.RESEARCHER, "alice")),
    )
    try:
        creds = channel_credentials(certs.files(Role.COORDINATOR, "hub"))
        err = _refused(_channel(port, creds, expect="alice"))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert "unsupported certificate purpose" in (err.details() or "")
        assert calls.count() == 0
    finally:
        server.stop(None)


def test_health_is_open_to_any_federation_certificate_only(
    certs: Pki, node: tuple[int, Calls]
) -> None:
    port, _ = node
    serving = health_pb2.HealthCheckResponse.SERVING
    for role, name in [
        (Role.COORDINATOR, "hub"),
        (Role.RESEARCHER, "alice"),
        (Role.NODE, "trust-b"),
    ]:
        assert _health(_channel(port, channel_credentials(certs.files(role, name)))) == serving
    with pytest.raises(grpc.RpcError) as info:
        _health(_channel(port, None))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_server_refuses_calls_unless_dev_mode_allows_them() -> None:
    calls = Calls()
    strict, strict_port = _start(calls, CallerPolicy(lambda p: True), None)
    dev, dev_port = _start(calls, CallerPolicy(lambda p: False, allow_insecure=True), None)
    try:
        err = _refused(_channel(strict_port, None))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == NO_CERTIFICATE
        assert calls.count() == 0
        assert _health(_channel(strict_port, None)) == health_pb2.HealthCheckResponse.SERVING

        # dev mode: admitted without consulting `allowed`, and named as insecure
        assert _call(_channel(dev_port, None)) == b"ok:ping"
        assert calls.peers == [INSECURE_PEER]
        assert not INSECURE_PEER.authenticated
    finally:
        strict.stop(None)
        dev.stop(None)


def test_a_connection_that_never_starts_its_handshake_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent connections cannot hold a server's descriptors (gRPC's default: 120 s)."""
    import socket
    import time

    from fedtre import serving
    from fedtre.pki import Role, init_ca, issue
    from fedtre.tls import TlsFiles

    init_ca(tmp_path)
    issue(tmp_path, Role.NODE, "n1")
    monkeypatch.setattr(serving, "HANDSHAKE_TIMEOUT_MS", 500)
    server, port, _health = serving.build_server(
        address="127.0.0.1:0",
        tls=TlsFiles.in_pki_dir(tmp_path, Role.NODE, "n1"),
        policy=None,
        max_workers=2,
        max_receive_bytes=1024,
        max_send_bytes=1024,
        service_names=(),
        add_services=lambda s: None,
    )
    try:
        with socket.create_connection(("127.0.0.1", port)) as silent:
            silent.settimeout(10)
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server
            assert time.monotonic() - started < 5
    finally:
        server.stop(0)


def test_requests_grpc_itself_refuses_are_audited_by_the_policy(certs: Pki) -> None:
    """Over gRPC's own message limit, over the policy's limit, or no request at all: the
    handler never runs, and the policy reports each (who, which method, why) for the audit."""
    calls = Calls()
    refused: list[tuple[str, str, str]] = []
    policy = CallerPolicy(
        lambda p: p.role is Role.COORDINATOR,
        on_refused=lambda method, who, why: refused.append((method, who, why)),
        max_request_bytes=100,
    )

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.record(context)
        return b"ok"

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[policy],
        options=[("grpc.max_receive_message_length", 1000)],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Call": grpc.unary_unary_rpc_method_handler(
                        call,
                        request_deserializer=health_pb2.HealthCheckRequest.FromString,
                        response_serializer=lambda r: r,
                    )
                },
            )
        ]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(certs.files(Role.NODE, "trust-a"))
    )
    server.start()
    hub = channel_credentials(certs.files(Role.COORDINATOR, "hub"))
    try:
        with _channel(port, hub) as ch:
            assert ch.unary_unary(UNARY)(_message(50), timeout=TIMEOUT) == b"ok"
            for i, size in enumerate((500, 5_000, 2_000_000)):  # the policy's limit, then gRPC's
                with pytest.raises(grpc.RpcError) as info:
                    ch.unary_unary(UNARY)(_message(size), timeout=TIMEOUT)
                assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                # gRPC answers the caller itself; the policy's handler learns of it just after
                _wait_for(lambda n=i + 1: len(refused) == n)
            with pytest.raises(grpc.RpcError) as empty:  # a call that sends no message
                ch.stream_unary(UNARY)(iter(()), timeout=TIMEOUT)
            assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # a caller the policy refuses is refused before its (oversized) message is read
        alice = channel_credentials(certs.files(Role.RESEARCHER, "alice"))
        with _channel(port, alice) as ch, pytest.raises(grpc.RpcError) as denied:
            ch.unary_unary(UNARY)(_message(5_000), timeout=TIMEOUT)
        assert denied.value.code() in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    finally:
        server.stop(None)
    assert calls.count() == 1
    assert [m for m, _, _ in refused] == [UNARY] * 5
    assert [w for _, w, _ in refused] == ["coordinator:hub"] * 4 + ["researcher:alice"]
    reasons = [why for _, _, why in refused]
    assert reasons[0] == "request larger than 100 bytes"
    assert reasons[1:4] == [NO_REQUEST] * 3, reasons
    assert reasons[4] == "certificate not allowed to call this method"


def _message(size: int) -> bytes:
    return health_pb2.HealthCheckRequest(service="x" * size).SerializeToString()


def _wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

"""Mutual TLS for the federation's gRPC services, and who is calling.

* ``server_credentials`` makes a server that completes a handshake only with a client whose
  certificate the federation CA signed (missing, foreign-CA and expired certificates fail in the
  handshake: the client sees UNAVAILABLE and no handler runs).
* ``channel_credentials`` + ``channel_options`` make a client that presents its own certificate
  and accepts the server only if the server's certificate names the peer it meant to reach
  (the coordinator dials an address but checks the node by its federation name).
* ``CallerPolicy`` decides, per call, whether the authenticated peer may use the service at all
  (e.g. a node accepts only the coordinator). It refuses with PERMISSION_DENIED before the
  handler runs. ``caller(context)`` gives a handler the peer the policy admitted.

Identity comes only from the verified certificate (CN = name, OU = role; see ``fedtre/pki.py``),
never from metadata or request fields.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

from fedtre.pki import CA_CERT, PkiError, Role, read_identity, role_host

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
NO_CERTIFICATE = "this service accepts only callers with a federation certificate"
NOT_ALLOWED = "this service does not accept calls from this certificate's role"
NO_REQUEST = (
    "no request received: larger than the server's message limit, cancelled by the caller, "
    "or none sent"
)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @staticmethod
    def in_pki_dir(directory: Path, role: Role, name: str) -> TlsFiles:
        directory = Path(directory)
        return TlsFiles(
            ca=directory / CA_CERT,
            cert=directory / f"{role.value}-{name}.pem",
            key=directory / f"{role.value}-{name}.key",
        )

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) as bytes; PkiError naming the file that cannot be read."""
        out = []
        for path in (self.ca, self.cert, self.key):
            try:
                out.append(Path(path).read_bytes())
            except OSError as exc:
                raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return out[0], out[1], out[2]


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server side of mutual TLS: clients must present a certificate signed by the CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: trust only the CA, and present our own certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(expected_server_name: str, role: Role | None = None) -> list[tuple[str, Any]]:
    """Check the server's certificate against ``expected_server_name`` instead of the address.

    Every federation certificate carries its holder's name as a DNS SAN, and its role and name as
    ``<name>.<role>.role.fedtre``; with ``role`` the check is against the latter, so a
    coordinator that dials ``10.1.2.3:50051`` with ``channel_options("trust-a", Role.NODE)``
    talks only to trust-a's node certificate, never to another role's certificate named trust-a.
    """
    name = expected_server_name if role is None else role_host(role, expected_server_name)
    return [("grpc.ssl_target_name_override", name)]


@dataclass(frozen=True)
class Peer:
    """An authenticated caller. ``role`` is None only for ``INSECURE_PEER`` (development)."""

    role: Role | None
    name: str

    @property
    def authenticated(self) -> bool:
        return self.role is not None


INSECURE_PEER = Peer(role=None, name="insecure")


def peer_identity(context: grpc.ServicerContext) -> Peer | None:
    """The peer named by the verified client certificate, or None if there is none (or it does
    not name a federation role and name)."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if len(pems) != 1:
        return None
    try:
        role, name = read_identity(pems[0])
    except PkiError as exc:
        log.warning("client certificate without a federation identity: %s", exc)
        return None
    return Peer(role=role, name=name)


def is_plaintext(context: grpc.ServicerContext) -> bool:
    """True when the call came over an insecure (non-TLS) port."""
    auth = context.auth_context() or {}
    return list(auth.get("transport_security_type") or [b"insecure"]) == [b"insecure"]


# Set by CallerPolicy for the duration of an admitted call (its own copied context, so nothing
# leaks between calls that share a worker thread).
_ADMITTED: contextvars.ContextVar[tuple[grpc.ServicerContext, Peer]] = contextvars.ContextVar(
    "fedtre_admitted_peer"
)


def caller(context: grpc.ServicerContext) -> Peer:
    """The peer this call comes from, for use inside a handler.

    Under ``CallerPolicy`` this is the peer the policy admitted (``INSECURE_PEER`` in dev mode).
    Without a policy it is the certificate's peer, and a call with no certificate is aborted with
    PERMISSION_DENIED: never an anonymous caller by accident.
    """
    admitted = _ADMITTED.get(None)
    if admitted is not None and admitted[0] is context:
        return admitted[1]
    peer = peer_identity(context)
    if peer is None:
        _deny(context, NO_CERTIFICATE)
    return peer


class CallerPolicy(grpc.ServerInterceptor):
    """Refuse, before the handler runs, every call whose certificate ``allowed`` rejects.

    Methods under ``exempt_prefixes`` (the standard health service) are not checked: the TLS
    handshake has already demanded a federation certificate. With ``allow_insecure=True``
    (development only) calls over a plaintext port are admitted as ``INSECURE_PEER`` without
    consulting ``allowed``; a TLS call without a usable certificate is refused even then.
    """

    def __init__(
        self,
        allowed: Callable[[Peer], bool],
        exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,),
        *,
        allow_insecure: bool = False,
        denied_message: str = NOT_ALLOWED,
        by_prefix: Mapping[str, Callable[[Peer], bool]] | None = None,
        on_refused: Callable[[str, str, str], None] | None = None,
        max_request_bytes: int | None = None,
        revoked: Callable[[bytes], str] | None = None,
    ) -> None:
        # Told the caller's certificate (PEM): "" if it may be used, else why not (a CRL).
        self._revoked = revoked
        self._allowed = allowed
        # Told (method, who, why) before every refusal here, so that the service audits it.
        self._on_refused = on_refused or (lambda method, who, why: None)
        # Unary requests above this are refused here, audited (gRPC's own, higher, limit
        # refuses larger ones before any Python code runs).
        self._max_request_bytes = max_request_bytes
        # Methods under one of these prefixes are checked by its own rule instead of ``allowed``
        # (e.g. the coordinator: researchers on its researcher service, nodes on its link).
        self._by_prefix = dict(by_prefix or {})
        self._exempt = tuple(exempt_prefixes)
        self._allow_insecure = allow_insecure
        self._denied_message = denied_message

    def admit(self, context: grpc.ServicerContext, method: str) -> Peer:
        """The peer if it may call ``method``; otherwise abort with PERMISSION_DENIED."""
        peer = peer_identity(context)
        if peer is None:
            if self._allow_insecure and is_plaintext(context):
                return INSECURE_PEER
            log.warning("refused %s: no federation certificate", method)
            self._on_refused(method, "no federation certificate", "no federation certificate")
            _deny(context, NO_CERTIFICATE)
        allowed = next(
            (rule for prefix, rule in self._by_prefix.items() if method.startswith(prefix)),
            self._allowed,
        )
        if not allowed(peer):
            log.warning("refused %s from %s %r", method, peer.role, peer.name)
            who = f"{peer.role.value if peer.role else 'unknown'}:{peer.name}"
            self._on_refused(method, who, "certificate not allowed to call this method")
            _deny(context, self._denied_message)
        if self._revoked is not None:
            pems = (context.auth_context() or {}).get("x509_pem_cert") or [b""]
            why = self._revoked(pems[0])
            if why:
                log.warning("refused %s from %s %r: %s", method, peer.role, peer.name, why)
                self._on_refused(method, _who(peer), why)
                _deny(context, f"Refused: {why}.")
        return peer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        if handler.unary_unary is not None:
            # Served as a stream of (one) request, so that a request gRPC itself refuses (over
            # its message limit) reaches this policy as an error and is audited; on the wire a
            # unary call and a one-message stream are the same.
            return grpc.stream_unary_rpc_method_handler(
                self._one_request(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_response(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"unknown kind of gRPC handler for {method}")  # fail closed

    def _one_request(
        self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
    ) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
        """A unary handler served from a request stream: admitted before its request is read."""
        checked = self._unary_response(behavior, method)

        def first(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            peer = self.admit(context, method)
            try:
                request = next(requests)
            except (StopIteration, grpc.RpcError):
                # gRPC ended the call before a request arrived: over its message limit (the
                # caller was told RESOURCE_EXHAUSTED), cancelled by the caller, or none sent.
                # Which of these gRPC does not say reliably (it races its own cancellation).
                self._on_refused(method, _who(peer), NO_REQUEST)
                if context.is_active():
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "The call carried no request.")
                return None
            return checked(request, context, peer)

        return first

    def _unary_response(
        self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
    ) -> Callable[..., Any]:
        def checked(request: Any, context: grpc.ServicerContext, peer: Peer | None = None) -> Any:
            if peer is None:
                peer = self.admit(context, method)
            limit = self._max_request_bytes
            if limit is not None and hasattr(request, "ByteSize") and request.ByteSize() > limit:
                self._on_refused(method, _who(peer), f"request larger than {limit} bytes")
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"The request is larger than {limit // 1024} KiB.",
                )
            ctx = contextvars.copy_context()
            ctx.run(_ADMITTED.set, (context, peer))
            return ctx.run(behavior, request, context)

        return checked

    def _stream_response(
        self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def checked(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            peer = self.admit(context, method)  # before the handler exists, not on first next()
            ctx = contextvars.copy_context()
            ctx.run(_ADMITTED.set, (context, peer))
            return _run_in(ctx, ctx.run(behavior, request, context))

        return checked


def _who(peer: Peer) -> str:
    return f"{peer.role.value if peer.role else 'insecure'}:{peer.name}"


def _run_in(ctx: contextvars.Context, responses: Iterator[Any]) -> Iterator[Any]:
    """Iterate ``responses`` inside ``ctx`` (a generator handler's body runs lazily)."""
    iterator = iter(responses)
    while True:
        try:
            item = ctx.run(next, iterator)
        except StopIteration:
            return
        yield item


def _deny(context: grpc.ServicerContext, message: str) -> NoReturn:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
    raise AssertionError("grpc's abort() returned")  # abort always raises

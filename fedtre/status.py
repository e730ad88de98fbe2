"""Errors on the wire: how fedtre's exceptions become gRPC statuses, in one place, and back.

A refusal travels as a gRPC status whose details are the plain-words reason (data-free by
construction: ``UserError`` messages never contain data) and whose trailing metadata key
``fedtre-refusal`` names the ``Refusal``. Internal errors travel as INTERNAL with a generic text:
details stay in the service's own logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import grpc

from fedtre.errors import AuditUnavailable, Refusal, UserError
from fedtre.serde.common import refusal_from_name

REFUSAL_KEY = "fedtre-refusal"
FAILED_CLOSED_KEY = "fedtre-failed-closed"  # the service is up but releasing nothing (audit)

_CODES = {
    Refusal.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNSUPPORTED_QUERY: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNKNOWN_VIEW: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNKNOWN_COLUMN: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.INVALID_VALUE: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.INVALID_EPSILON: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNKNOWN_PROJECT: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.OUT_OF_SCOPE: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.NOT_AUTHORISED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.BUDGET_EXHAUSTED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.QUERY_ID_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.DEADLINE_TOO_SHORT: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.NOT_PREPARED: grpc.StatusCode.FAILED_PRECONDITION,
}
assert set(_CODES) == set(Refusal), "every refusal needs a status code"


def code_for(refusal: Refusal) -> grpc.StatusCode:
    return _CODES[refusal]


def abort(context: grpc.ServicerContext, exc: BaseException, query_id: str = "") -> NoReturn:
    """End the call with the status for ``exc``. Only ``UserError`` text reaches the caller."""
    if isinstance(exc, UserError):
        context.set_trailing_metadata(((REFUSAL_KEY, exc.refusal.value),))
        context.abort(code_for(exc.refusal), exc.message)
    suffix = f" (query id {query_id})" if query_id else ""
    if isinstance(exc, AuditUnavailable):
        context.set_trailing_metadata(((FAILED_CLOSED_KEY, "audit"),))
        context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"This service cannot write its audit log, so it is releasing nothing{suffix}.",
        )
    context.abort(grpc.StatusCode.INTERNAL, f"Internal error{suffix}; operators have details.")
    raise AssertionError("context.abort returned")  # it raises; this keeps the type NoReturn


@dataclass(frozen=True)
class CallFailure:
    """What a client learns from a failed call, in words fit to show a person."""

    code: grpc.StatusCode
    refusal: Refusal | None
    message: str

    @property
    def unavailable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def failure_from(error: grpc.RpcError) -> CallFailure:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    refusal = None
    if isinstance(error, grpc.Call):
        for key, value in error.trailing_metadata() or ():
            if key == REFUSAL_KEY and isinstance(value, str):
                refusal = refusal_from_name(value)
    details = error.details() if isinstance(error, grpc.Call) else None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message = "did not answer within the deadline"
    elif code is grpc.StatusCode.UNAVAILABLE and _failed_closed(error):
        message = (
            "is running but cannot write its audit log, so it answers nothing for now; try "
            "again later"
        )
    elif code is grpc.StatusCode.UNAVAILABLE and refusal is None:
        message = "could not be reached (down, or the connection was refused)"
    else:
        message = _printable(details or code.name.lower())
    return CallFailure(code, refusal, message)


def _failed_closed(error: grpc.RpcError) -> bool:
    """The service itself said it is failing closed (not a transport failure)."""
    if not isinstance(error, grpc.Call):
        return False
    return any(key == FAILED_CLOSED_KEY for key, _ in error.trailing_metadata() or ())


def _printable(text: str, limit: int = 500) -> str:
    clean = "".join(ch if ch.isprintable() else " " for ch in text)
    return clean[:limit]

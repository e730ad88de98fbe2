"""Exceptions shared by node and coordinator.

Two families, kept apart on purpose:

* ``UserError``: the request cannot be served as asked. Its message is shown to the researcher
  as is, so it must be plain words and must never contain data: no row values, no counts, nothing
  computed from the trust's records. Each carries a ``Refusal`` code that maps to a wire status.
* ``InternalError``: something in our system failed. Its message goes to operators' logs; the
  researcher sees a generic "internal error" with the query id.
"""

from __future__ import annotations

from enum import Enum


class Refusal(Enum):
    """Why a request was refused. Stable names: they appear in audit logs and on the wire."""

    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_QUERY = "unsupported_query"
    UNKNOWN_VIEW = "unknown_view"
    UNKNOWN_COLUMN = "unknown_column"
    INVALID_VALUE = "invalid_value"
    TOO_LARGE = "too_large"
    UNKNOWN_PROJECT = "unknown_project"
    OUT_OF_SCOPE = "out_of_scope"
    INVALID_EPSILON = "invalid_epsilon"
    BUDGET_EXHAUSTED = "budget_exhausted"
    QUERY_ID_CONFLICT = "query_id_conflict"
    NOT_AUTHORISED = "not_authorised"
    DEADLINE_TOO_SHORT = "deadline_too_short"
    NOT_PREPARED = "not_prepared"  # a commit for an id with no live prepared answer


class FedtreError(Exception):
    """Base of every error fedtre raises on purpose."""


class UserError(FedtreError):
    """A request refused for a reason the caller can act on. The message is data-free."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message

    def __str__(self) -> str:
        return self.message


class QueryRefused(UserError):
    """The query text or its parameters are outside what fedtre will run."""


class ConfigError(FedtreError):
    """An operator-supplied file (catalog, config, mapping) is invalid. Raised at start-up."""


class InternalError(FedtreError):
    """A failure inside fedtre (storage, audit, a bug). Never shown in detail to researchers."""


class WireError(InternalError):
    """A message from another fedtre service does not fit the contract (a bug or a bad peer)."""


class AuditUnavailable(InternalError):
    """The audit log cannot be written: the service fails closed and releases nothing."""

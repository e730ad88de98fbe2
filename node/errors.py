"""Node-side exceptions. User-facing refusals come from ``fedtre.errors``."""

from __future__ import annotations

from fedtre.errors import AuditUnavailable, ConfigError, InternalError

__all__ = [
    "AuditUnavailable",
    "CallerGone",
    "DatabaseError",
    "LedgerUnavailable",
    "LoadError",
    "StateMismatch",
]


class LoadError(ConfigError):
    """The OMOP source cannot be loaded; the message tells trust IT what to fix."""


class LedgerUnavailable(InternalError):
    """The budget ledger cannot be read or written: the node fails closed."""


class DatabaseError(InternalError):
    """The node's research database is missing, stale or failed while running a query."""


class CallerGone(InternalError):
    """The caller cancelled or its deadline passed before the debit: nothing is spent."""


class StateMismatch(ConfigError):
    """The state directory is not the one the node last used (lost, moved, or an older backup):
    the node refuses to start rather than give budgets back."""

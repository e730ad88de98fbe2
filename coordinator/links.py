"""``TrustLink``: how the coordinator talks to one trust, whoever dialled whom.

Two implementations: ``coordinator.dial_in.DialInLink`` (the coordinator dials the node's
``NodeService``) and ``coordinator.dial_out.DialOutLink`` (the node dialled the coordinator and
holds a stream). Both take and return the node protocol's domain types (``fedtre.protocol``);
a transport failure is an ``UNAVAILABLE`` or ``FAILED`` outcome, never an exception, so the
fan-out treats every trust alike.
"""

from __future__ import annotations

from typing import Protocol

from fedtre.errors import InternalError
from fedtre.protocol import Decision, NodeDescription, NodeOutcome, PrepareRequest


class LinkDown(InternalError):
    """The trust could not be asked (down, unreachable, not connected, deadline passed)."""


class TrustLink(Protocol):
    node_id: str

    def prepare(self, request: PrepareRequest, timeout: float) -> NodeOutcome: ...

    def commit(self, decision: Decision, timeout: float) -> NodeOutcome: ...

    def abort(self, decision: Decision, timeout: float) -> NodeOutcome: ...

    def budget(self, project_id: str, timeout: float) -> NodeOutcome: ...

    def describe(self, timeout: float, checkpoints: tuple[str, ...] = ()) -> NodeDescription:
        """Raises ``LinkDown`` when the trust cannot be asked. ``checkpoints``: signed audit
        checkpoints for the trust to keep."""
        ...

    def reachable(self) -> bool:
        """Cheap, without a call: could the trust be asked now?"""
        ...

    def status(self) -> str:
        """For operators: e.g. "dial-in", "connected since ...", "not connected"."""
        ...

    def close(self) -> None: ...

"""What the coordinator tells a researcher about each trust, and about the query as a whole."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from coordinator.combine import Combined
from coordinator.config import Project
from fedtre.errors import Refusal
from fedtre.result import NodeResult


class TrustState(Enum):
    ANSWERED = "answered"  # committed: its answer is in the result, its ε spent
    UNAVAILABLE = "unavailable"  # down, unreachable, not connected, or past the deadline
    REFUSED = "refused"  # its own checks said no, with its reason: nothing spent
    FAILED = "failed"  # an internal error or a malformed reply
    WITHDRAWN = "withdrawn"  # prepared, then aborted because the project's rule was not met


@dataclass(frozen=True)
class TrustOutcome:
    node_id: str
    state: TrustState
    result: NodeResult | None = None
    replayed: bool = False  # released earlier under this query id: nothing new spent
    refusal: Refusal | None = None
    reason: str = ""
    remaining_units: int | None = None
    handling_ms: float = 0.0  # the trust's own time, its answer slot included: operators only
    before_handler: bool = False  # refused by the trust's call policy (no query entry there)


@dataclass(frozen=True)
class Outcome:
    query_id: str
    project: Project
    epsilon_units: int
    trusts: tuple[TrustOutcome, ...]
    combined: Combined | None  # None when withheld
    withheld_reason: str = ""

"""The node protocol in domain terms: what a coordinator asks a trust and what the trust says.

Both transports carry exactly these values (``fedtre.serde.node`` converts them): the
coordinator dialling the node (``NodeService``) and the node dialling the coordinator
(``TrustLinkService``, one long-lived stream). Refusals and failures travel inside the reply,
never as transport status codes, so they read the same on a unary call and on a stream.

Two phases per query id:

* ``prepare``: the trust validates, reserves ε, computes the noisy answer and stores it; the
  reply says only ``PREPARED`` (nothing data-dependent leaves the trust);
* ``commit``: the trust releases the stored answer (``COMMITTED``, with the result), or
  ``abort``: it refunds the reservation and destroys the answer (``ABORTED``). A reservation
  that is never decided expires at the end of the trust's lease and is refunded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from fedtre.errors import Refusal
from fedtre.request import SignedQuery
from fedtre.result import NodeResult


@dataclass(frozen=True)
class PrepareRequest:
    query_id: str
    project_id: str
    sql: str  # re-parsed and re-validated by the node
    epsilon_units: int  # micro-ε the query may spend at this trust
    researcher: str  # as the coordinator authenticated them: audit only, never trusted
    approval: bytes = b""  # the project's signed approval bundle: verified by the node
    signed: SignedQuery | None = None  # the researcher's signature over the query: verified too


@dataclass(frozen=True)
class Decision:
    """Phase 2 for one query id of one project: commit it or abort it."""

    query_id: str
    project_id: str


class OutcomeKind(Enum):
    PREPARED = "prepared"  # phase 1 done: answer stored, ε reserved, nothing released
    COMMITTED = "committed"  # released: ``result`` holds the noisy answer
    ABORTED = "aborted"  # refunded (or nothing was held); the answer is destroyed
    BUDGET = "budget"  # a budget report
    REFUSED = "refused"  # the trust's own rules said no: ``refusal`` and ``reason``
    FAILED = "failed"  # an internal error at the trust; ``reason`` is generic
    UNAVAILABLE = "unavailable"  # set by the coordinator's link: the trust did not answer


@dataclass(frozen=True)
class BudgetReport:
    node_id: str
    project_id: str
    total_units: int
    spent_units: int
    remaining_units: int  # what the next query may spend: project and node ceiling


@dataclass(frozen=True)
class NodeOutcome:
    """A trust's reply to one call. Data-free except ``result`` on ``COMMITTED``."""

    kind: OutcomeKind
    node_id: str
    project_id: str = ""
    query_id: str = ""
    epsilon_units: int = 0  # reserved (prepared), charged (committed) or refunded (aborted)
    replayed: bool = False  # prepared/committed earlier: nothing new spent
    result: NodeResult | None = None
    refusal: Refusal | None = None
    reason: str = ""  # plain words, data-free
    budget: BudgetReport | None = None  # the project's budget here after this call
    handling_ms: float = 0.0  # the trust's own time, slot included: operators only
    # refused by the trust's call policy before any handler ran (its log has a call.refused
    # entry, which names no query): set by the coordinator's link, never sent
    before_handler: bool = False

    @property
    def remaining_units(self) -> int | None:
        return None if self.budget is None else self.budget.remaining_units


@dataclass(frozen=True)
class ProjectScope:
    """What one trust approved a project for: public facts about the approval, never data."""

    project_id: str
    views: tuple[str, ...]
    max_tier: str
    total_units: int
    max_units_per_query: int


@dataclass(frozen=True)
class NodeDescription:
    node_id: str
    catalog_version: str
    catalog_digest: str
    project_ids: tuple[str, ...]
    scopes: tuple[ProjectScope, ...] = ()
    audit_checkpoint: str = ""  # the trust's audit log, signed at this call (JSON)


# -- the outbound link: the same calls, carried on one stream the node opened ---------------


# Both ends of a link: the coordinator sends a heartbeat when idle this often, and either end
# drops a stream on which it has heard nothing for SILENCE_LIMIT seconds.
HEARTBEAT_SECONDS = 2.0
SILENCE_LIMIT = 3 * HEARTBEAT_SECONDS


class Call(Enum):
    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"
    BUDGET = "budget"
    DESCRIBE = "describe"
    HEARTBEAT = "heartbeat"
    CANCEL = "cancel"  # the call ``call_id`` names passed its deadline: drop it


@dataclass(frozen=True)
class LinkRequest:
    """Coordinator to node: one call, matched to its reply by ``call_id`` (0: heartbeat)."""

    call_id: int
    call: Call
    time_left: float = 0.0  # seconds until the call's deadline
    prepare: PrepareRequest | None = None
    decision: Decision | None = None  # commit and abort
    project_id: str = ""  # budget
    sequence: int = 0  # heartbeat
    checkpoints: tuple[str, ...] = ()  # describe: audit checkpoints for the trust to keep


@dataclass(frozen=True)
class Hello:
    """The node's first message on every stream."""

    node_id: str
    catalog_version: str


@dataclass(frozen=True)
class LinkReply:
    """Node to coordinator: exactly one of the bodies is set."""

    call_id: int
    hello: Hello | None = None
    outcome: NodeOutcome | None = None
    description: NodeDescription | None = None
    heartbeat: int | None = None

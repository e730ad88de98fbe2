"""Every kind of event an audit log records: one enum, documented for auditors.

An entry is ``{"seq", "ts", "<role>": actor, "event", ...fields}``: ``role`` is ``node`` or
``coordinator`` (``registry`` for a governance registry's own log), ``actor`` the trust or
coordinator id. Fields carry identifiers, the query text the researcher wrote, refusal
reasons, ε in units (millionths) and noise scales: never a row value, an exact aggregate or a
count of persons. ``docs/AUDIT.md`` is generated from this module (``fedtre audit events``).
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    # the log itself
    LOG_CREATED = "log.created"
    CHECKPOINT_SIGNED = "checkpoint.signed"
    CHECKPOINT_WITNESSED = "checkpoint.witnessed"
    AUDIT_RESUMED = "audit.resumed"
    # services (servers only; command-line tools never log a start or stop)
    NODE_STARTED = "node.started"
    NODE_SERVING = "node.serving"
    NODE_STOPPED = "node.stopped"
    COORDINATOR_STARTED = "coordinator.started"
    COORDINATOR_SERVING = "coordinator.serving"
    COORDINATOR_STOPPED = "coordinator.stopped"
    CONFIG_CHANGED = "config.changed"
    DATABASE_RELOADED = "database.reloaded"
    DATABASE_RELOAD_REFUSED = "database.reload_refused"
    # calls refused before any handler ran (certificate policy, oversized, TLS handshakes)
    CALL_REFUSED = "call.refused"
    # queries
    QUERY_RECEIVED = "query.received"
    QUERY_REFUSED = "query.refused"
    QUERY_FAILED = "query.failed"
    QUERY_RESERVED = "query.reserved"
    QUERY_PREPARED = "query.prepared"
    QUERY_COMMIT = "query.commit"
    QUERY_RELEASED = "query.released"
    QUERY_REPLAYED = "query.replayed"
    QUERY_WITHHELD = "query.withheld"
    QUERY_ABORT = "query.abort"
    QUERY_ABORTED = "query.aborted"
    QUERY_ABORT_IGNORED = "query.abort_ignored"
    QUERY_EXPIRED = "query.expired"
    # other requests
    BUDGET_REQUESTED = "budget.requested"
    BUDGET_REFUSED = "budget.refused"
    NODE_DESCRIBED = "node.described"
    PROJECTS_LISTED = "projects.listed"
    CATALOG_REQUESTED = "catalog.requested"
    # governance and consent, as each side saw them
    PROJECT_SUBMITTED = "project.submitted"
    PROJECT_REVIEWED = "project.reviewed"
    PROJECT_REVOKED = "project.revoked"
    PROJECT_PARTICIPATION = "project.participation"
    APPROVAL_IMPORTED = "approval.imported"
    OPTOUTS_CHANGED = "optouts.changed"
    DISPUTES_CHANGED = "disputes.changed"


MEANING: dict[Event, str] = {
    Event.LOG_CREATED: "The log was created: its id, the actor, and the public key that signs "
    "its checkpoints (and the digest of an older JSON-lines log it follows, if any).",
    Event.CHECKPOINT_SIGNED: "The log's size and head hash were signed (a checkpoint); anyone "
    "holding it can later prove the log was not rewritten up to that size.",
    Event.CHECKPOINT_WITNESSED: "Another service's signed checkpoint was received and kept "
    "here, so that its log cannot be rewritten unnoticed.",
    Event.AUDIT_RESUMED: "The log could be written again after a failure (disk full or "
    "unwritable); nothing was released in between.",
    Event.NODE_STARTED: "A trust's node server started (catalog version, settings digest).",
    Event.NODE_SERVING: "A trust's node is serving (mode: dial-in or dial-out, address, TLS).",
    Event.NODE_STOPPED: "A trust's node server stopped.",
    Event.COORDINATOR_STARTED: "The coordinator started (catalog version, settings digest).",
    Event.COORDINATOR_SERVING: "The coordinator is listening (address, TLS on or off).",
    Event.COORDINATOR_STOPPED: "The coordinator stopped.",
    Event.CONFIG_CHANGED: "The service started with other settings than at its last start "
    "(digests of the settings before and after; the files themselves stay with the operator).",
    Event.DATABASE_RELOADED: "A newly loaded research database was switched to.",
    Event.DATABASE_RELOAD_REFUSED: "A newly loaded research database was refused (reason); the "
    "previous one is still served.",
    Event.CALL_REFUSED: "A call was refused before any handler ran: who (certificate), which "
    "method, why (certificate policy, revoked certificate, oversized message, TLS handshake).",
    Event.QUERY_RECEIVED: "A query arrived (query id, project, caller or researcher, ε, SQL as "
    "written). Logged before anything is acted on.",
    Event.QUERY_REFUSED: "A query was refused (the rule, in plain words); nothing was spent.",
    Event.QUERY_FAILED: "A query failed inside the service (error type only); nothing released.",
    Event.QUERY_RESERVED: "A trust reserved the query's ε in its ledger (phase 1).",
    Event.QUERY_PREPARED: "A trust computed and stored the noisy answer; nothing left the trust.",
    Event.QUERY_COMMIT: "The coordinator asked a trust to release a prepared answer (phase 2).",
    Event.QUERY_RELEASED: "An answer was released: the release record (approval, plan hash, ε, "
    "mechanisms, noise scales, bounds, output rules, versions). At a trust it is written in the "
    "same transaction as the ledger's final debit.",
    Event.QUERY_REPLAYED: "An answer released earlier was returned again for the same query id; "
    "nothing new was spent (spent ε 0).",
    Event.QUERY_WITHHELD: "The coordinator withheld a result (the project's rule on answering "
    "trusts was not met); prepared trusts were told to abort, so nothing was spent there.",
    Event.QUERY_ABORT: "The coordinator asked a trust to abort a reservation.",
    Event.QUERY_ABORTED: "A reservation was refunded and its answer destroyed.",
    Event.QUERY_ABORT_IGNORED: "An abort that had nothing to refund (unknown or released id).",
    Event.QUERY_EXPIRED: "A reservation's lease ended before a commit: refunded, answer destroyed.",
    Event.BUDGET_REQUESTED: "Someone asked for a project's budget.",
    Event.BUDGET_REFUSED: "A budget request was refused (the rule).",
    Event.NODE_DESCRIBED: "The coordinator asked a trust which projects it serves.",
    Event.PROJECTS_LISTED: "A researcher listed their projects.",
    Event.CATALOG_REQUESTED: "A researcher read the federation's catalog.",
    Event.PROJECT_SUBMITTED: "An application was submitted to the registry (digest).",
    Event.PROJECT_REVIEWED: "A committee member signed a decision on an application.",
    Event.PROJECT_REVOKED: "The committee revoked a project.",
    Event.PROJECT_PARTICIPATION: "A trust's data guardian signed (or declined) participation.",
    Event.APPROVAL_IMPORTED: "A trust imported a signed approval or revocation itself.",
    Event.OPTOUTS_CHANGED: "A trust imported or removed opt-outs (kind and a random import id "
    "only; never identifiers, a digest of them, or counts).",
    Event.DISPUTES_CHANGED: "A trust marked or cleared disputed records (view and a random "
    "import id only).",
}


def parse_event(text: str) -> Event:
    """An event kind from its name; unknown names are refused (``ValueError``)."""
    return Event(text)

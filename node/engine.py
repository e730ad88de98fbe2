"""Answering a query at a node: the one path every request takes, whoever dialled whom.

Phase 1, ``prepare`` (each step refuses with a data-free reason before the next can run):

1. write the request to the audit log: nothing is acted on before it is logged;
2. decide everything that can refuse without touching the data (``node.prepare``): ids,
   project, ε (the node's minimum and the project's per-query cap), plan, views, tier, and the
   split of ε over the statistics, with every OpenDP measurement built;
3. a query id already prepared or committed reserves nothing new (a different request under
   that id is refused); a caller whose deadline cannot fit the answer slot, or who has gone, is
   refused;
4. reserve the budget (project and node ceiling) in the ledger, with a lease, its audit entry
   in the same transaction;
5. only now read the data: run the compiled plan in the locked-down database, add the planned
   OpenDP noise, and store the noisy answer under the query id. Reply "prepared" on the answer
   slot (every reply leaves a multiple of ``answer_slot_ms`` after receipt), and nothing else.

Phase 2: ``commit`` releases the stored answer, durably committed in the ledger first (the one
fsync per release that waits in line); ``abort`` refunds the reservation and destroys the
answer; a lease that ends first does the same (``expire``). A committed id is never refunded,
and a retry returns its stored answer verbatim. ``answer_detail`` runs both phases at once for
a trust's own local queries.

The audit log lives in the ledger's database: every change of a query id's state
(``query.reserved``, ``query.prepared``, ``query.released`` with its release record,
``query.aborted``, ``query.expired``) is an audit entry committed in the same transaction as the
change itself, so a release is one durable write. Request entries are committed before they
are acted on and become durable with the release's fsync; a refusal's entry is durable before
the refusal is returned.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import duckdb
import pyarrow as pa

from fedtre import logs
from fedtre.audit.checkpoint import Publisher
from fedtre.audit.events import Event
from fedtre.audit.records import trust_release
from fedtre.audit.witness import Witness
from fedtre.dp import units_to_epsilon
from fedtre.errors import AuditUnavailable, InternalError, QueryRefused, Refusal, UserError
from fedtre.request import QueryRequest, check_ids
from fedtre.result import NodeResult
from node.approvals import Projects
from node.audit import open_audit
from node.compiler import CompiledQuery, run_exact
from node.config import NodeConfig, ProjectPolicy
from node.database import ResearchDatabase
from node.errors import CallerGone, DatabaseError
from node.generation import Generation
from node.ledger import NODE_SCOPE, Entry, Hook, Ledger, State, project_scope
from node.optouts import OptOuts
from node.prepare import Planner, PreparedQuery
from node.release import release

log = logs.get("node")
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    result: NodeResult
    replayed: bool  # the stored answer of an earlier request with this query id


@dataclass(frozen=True)
class Prepared:
    units: int  # reserved for this query id at this trust
    replayed: bool  # prepared (or committed) by an earlier request: nothing new reserved


@dataclass(frozen=True)
class Aborted:
    refunded_units: int  # 0 when nothing was held
    committed: bool  # the id had been committed already: never refunded


@dataclass(frozen=True)
class BudgetStatus:
    project_id: str
    total_units: int
    spent_units: int
    node_total_units: int
    node_spent_units: int

    @property
    def remaining_units(self) -> int:
        return max(
            0,
            min(
                self.total_units - self.spent_units,
                self.node_total_units - self.node_spent_units,
            ),
        )

    @property
    def remaining(self) -> float:
        return units_to_epsilon(self.remaining_units)


class _Unslotted(Exception):
    """Wraps a refusal that is answered at once rather than on the slot (the caller cannot wait
    for it, or has gone): decided from the request alone, before anything else."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_CHANGES = {
    State.RESERVED: Event.QUERY_RESERVED,
    State.PREPARED: Event.QUERY_PREPARED,
    State.COMMITTED: Event.QUERY_RELEASED,
    State.ABORTED: Event.QUERY_ABORTED,
    State.EXPIRED: Event.QUERY_EXPIRED,
}


class NodeEngine:
    def __init__(self, config: NodeConfig, serving: bool = False) -> None:
        """``serving``: this engine is the node's server (it alone logs start and stop and
        signs checkpoints); command-line tools share the same logs without claiming either."""
        self.config = config
        self.catalog = config.catalog
        self.serving = serving
        self.audit, self.audit_key = open_audit(config)
        # other services' audit checkpoints: signed ones kept, one per service an hour recorded
        self.witnessed = Witness(self.audit, record_every=3600.0, judge=False)
        self.checkpoints = Publisher(self.audit, self.audit_key)
        self.ledger = Ledger(config.ledger_path)
        self.generation = Generation(config, self.ledger)  # refuses a lost or older ledger
        try:
            self.projects = Projects(config)
            self.optouts = OptOuts(config.state_dir)
            self.planner = Planner(config, self.projects)
            self.database = ResearchDatabase(
                config.database,
                config.catalog,
                config.duckdb_threads,
                config.duckdb_memory_limit,
                on_reload=self._reloaded,
            )
        except BaseException:
            self.generation.close()
            raise
        self._closing = threading.Event()
        self._sweeper: threading.Thread | None = None
        if serving:
            self.audit.started(
                Event.NODE_STARTED,
                catalog_version=self.catalog.version,
                config_sha256=config.config_digest,
            )
            self.checkpoint()
        if config.answer_slot_ms == 0:
            log.warning(
                "answer slot off: answer times can reveal the data (answer_slot_ms = 0)",
                extra={"node": config.node_id},
            )

    def start_expiry(self) -> None:
        """Refund ended leases in the background (a server's job; every call also checks)."""
        if self._sweeper is not None:
            return
        interval = min(5.0, self.config.prepare_lease_seconds / 4)

        def sweep() -> None:
            while not self._closing.wait(interval):
                try:
                    self.expire()
                except InternalError as exc:  # the next request reports it to its caller
                    log.error("lease expiry failed", extra={"error": type(exc).__name__})

        self._sweeper = threading.Thread(target=sweep, name="lease-expiry", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Release everything, once; a broken audit log does not keep resources open."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
        if self.serving:
            try:
                self.audit.write(Event.NODE_STOPPED)
                self.checkpoint()
            except AuditUnavailable:
                log.error("could not audit the stop: the audit log is unwritable")
        self.generation.close()
        self.database.close()
        self.audit.close()

    @property
    def lost_writes(self) -> str | None:
        """Why the node's database refuses writes until restart (an I/O error), or None."""
        return self.audit.lost_writes or self.ledger.lost_writes

    def checkpoint(self) -> str:
        """Sign the audit log's head now; returns the checkpoint (JSON) to publish."""
        return self.checkpoints.sign()

    def budget(self, project_id: str) -> BudgetStatus:
        project = self.projects.known(project_id).policy
        return BudgetStatus(
            project_id=project_id,
            total_units=project.total_units,
            spent_units=self.ledger.spent(project_scope(project_id)),
            node_total_units=self.config.node_total_units,
            node_spent_units=self.ledger.spent(NODE_SCOPE),
        )

    def answer(self, request: QueryRequest) -> NodeResult:
        return self.answer_detail(request).result

    # -- the two phases --------------------------------------------------------------------

    def prepare(
        self,
        request: QueryRequest,
        cancelled: Callable[[], bool] | None = None,
        time_left: float | None = None,
    ) -> Prepared:
        """Phase 1, on the answer slot: check, reserve, compute and store the noisy answer.

        ``time_left`` (seconds the caller will wait, if it has a deadline) must fit the slot, or
        the request is refused at once; ``cancelled`` is asked just before the budget is
        reserved, so a caller that has already given up costs nothing.
        """
        return self._slotted(
            request, lambda at: self._prepare_audited(request, at, cancelled, time_left)
        )

    def commit(self, project_id: str, query_id: str, caller: str) -> Answer:
        """Phase 2: release a prepared answer (durably committed before it is returned). A
        committed id returns its stored answer again; anything else is refused, spending
        nothing."""
        self.audit.note(
            Event.QUERY_COMMIT,
            query_id=str(query_id)[:128],
            project=str(project_id)[:64],
            caller=caller,
        )
        try:
            check_ids(query_id, project_id)
            held = self.ledger.entry(project_id, query_id)
            if held is not None and held.state is State.RESERVED:
                raise QueryRefused(
                    Refusal.NOT_PREPARED,
                    "This trust is still preparing that query id; nothing was released. Commit "
                    "after it has answered 'prepared'.",
                )
            if held is not None and held.state is State.PREPARED:
                # the approval it was prepared under must hold still: one revoked since then
                # releases nothing (the reservation expires and is refunded)
                self.projects.for_commit(project_id, held.approval)
            entry, committed = self.ledger.commit(project_id, query_id, self._recorder(caller))
            if committed:
                self.generation.released()
            if entry is None or entry.state is not State.COMMITTED or entry.result is None:
                raise QueryRefused(
                    Refusal.NOT_PREPARED,
                    "This trust holds no prepared answer for that query id (it was never "
                    "prepared, was aborted, or its reservation expired); nothing was spent. "
                    "Retry with the same query id.",
                )
        except Exception as exc:
            self._audit_outcome(query_id, project_id, caller, exc)
            raise
        result = NodeResult.from_json(entry.result)
        if not committed:  # released before: nothing new is spent
            self.audit.write(
                Event.QUERY_REPLAYED,
                query_id=query_id,
                project=project_id,
                caller=caller,
                epsilon_units=0,
                released_at=result.released_at,
            )
        return Answer(result, replayed=not committed)

    def abort(self, project_id: str, query_id: str, caller: str) -> Aborted:
        """Phase 2, the other way: refund a reserved or prepared id and destroy its answer. A
        committed id is never refunded; an unknown id has nothing to refund."""
        self.audit.note(
            Event.QUERY_ABORT,
            query_id=str(query_id)[:128],
            project=str(project_id)[:64],
            caller=caller,
        )
        try:
            check_ids(query_id, project_id)  # a refund is never refused for the project's sake
            entry, aborted = self.ledger.abort(project_id, query_id, self._recorder(caller))
        except Exception as exc:
            self._audit_outcome(query_id, project_id, caller, exc)
            raise
        committed = entry is not None and entry.state is State.COMMITTED
        refunded = entry.units if aborted and entry is not None else 0
        if not aborted:
            self.audit.note(
                Event.QUERY_ABORT_IGNORED,
                query_id=query_id,
                project=project_id,
                caller=caller,
                state=None if entry is None else entry.state.value,
            )
        return Aborted(refunded_units=refunded, committed=committed)

    def expire(self) -> int:
        """Refund every reservation whose lease has ended (audited); returns how many."""
        return len(self.ledger.expire_due(self._recorder("lease")))

    def answer_detail(
        self,
        request: QueryRequest,
        cancelled: Callable[[], bool] | None = None,
        time_left: float | None = None,
    ) -> Answer:
        """Both phases at once, on the answer slot: for a trust's own local queries."""

        def both(received_at: str) -> Answer:
            self._prepare_audited(request, received_at, cancelled, time_left)
            return self.commit(request.project_id, request.query_id, request.caller)

        return self._slotted(request, both)

    # -- internals -------------------------------------------------------------------------

    def _slotted(self, request: QueryRequest, work: Callable[[str], T]) -> T:
        received = time.monotonic()
        # The release's timestamp: when the request arrived, to the second. Taken before any
        # work, so it says nothing about how long the data took to read.
        received_at = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            out = work(received_at)
        except _Unslotted as unslotted:
            raise unslotted.error from None
        except BaseException:
            self._hold(received, request)
            raise
        self._hold(received, request)
        return out

    def _prepare_audited(
        self,
        request: QueryRequest,
        received_at: str,
        cancelled: Callable[[], bool] | None,
        time_left: float | None,
    ) -> Prepared:
        # Logged before anything is acted on; durable with the release's (or refusal's) fsync.
        self.audit.note(
            Event.QUERY_RECEIVED,
            query_id=str(request.query_id)[:128],
            project=str(request.project_id)[:64],
            caller=request.caller,
            epsilon=request.epsilon if isinstance(request.epsilon, int | float) else None,
            sql=request.sql if isinstance(request.sql, str) else None,
        )
        try:
            prepared = self._prepare(request, received_at, cancelled, time_left)
        except _Unslotted as unslotted:
            self._audit_outcome(
                request.query_id, request.project_id, request.caller, unslotted.error
            )
            raise
        except Exception as exc:
            self._audit_outcome(request.query_id, request.project_id, request.caller, exc)
            raise
        return prepared

    def _audit_outcome(
        self, query_id: object, project_id: object, caller: str, exc: Exception
    ) -> None:
        if isinstance(exc, UserError):
            self.audit.write(
                Event.QUERY_REFUSED,
                query_id=str(query_id)[:128],
                project=str(project_id)[:64],
                caller=caller,
                refusal=exc.refusal.value,
                reason=exc.message,
            )
        else:  # internal errors and bugs: audited, nothing released
            with contextlib.suppress(InternalError):  # the audit log itself may have failed
                self.audit.write(
                    Event.QUERY_FAILED,
                    query_id=str(query_id)[:128],
                    project=str(project_id)[:64],
                    caller=caller,
                    error=type(exc).__name__,
                )

    def _recorder(self, caller: str) -> Hook:
        """The audit entry for each change of a query id's state, in the ledger's own
        transaction; a release's entry carries its release record."""

        def record(con: sqlite3.Connection, e: Entry) -> None:
            fields: dict[str, object] = {
                "query_id": e.query_id,
                "project": e.project_id,
                "caller": caller,
            }
            if e.state in (State.ABORTED, State.EXPIRED):
                fields["refunded_epsilon_units"] = e.units
            else:
                fields["epsilon_units"] = e.units
            if e.state is State.COMMITTED and e.result is not None:
                fields["release"] = trust_release(
                    NodeResult.from_json(e.result), e.fingerprint, e.approval
                )
            try:
                self.audit.append(con, _CHANGES[e.state], **fields)
            except sqlite3.Error as exc:
                self.audit.failed(exc)

        return record

    def _hold(self, received: float, request: QueryRequest) -> None:
        """Wait for the end of the answer slot: the first multiple of the slot after receipt
        at which the work is done. An overrun is logged for trust IT (``fedtre node
        calibrate`` suggests a slot); the answer then leaves on the next multiple."""
        slot = self.config.answer_slot_ms / 1000.0
        done = time.monotonic()
        if slot <= 0:
            return
        slots = max(1, math.ceil((done - received) / slot))
        if slots > 1:
            log.warning(
                "answer overran its slot",
                extra={
                    "node": self.config.node_id,
                    "query_id": str(request.query_id)[:128],
                    "slots": slots,
                    "slot_ms": self.config.answer_slot_ms,
                },
            )
        time.sleep(max(0.0, received + slots * slot - time.monotonic()))

    def describe(
        self, caller: str, checkpoints: tuple[str, ...] = ()
    ) -> Mapping[str, ProjectPolicy]:
        """Audited: the projects this trust serves, by id. ``checkpoints`` (the coordinator's
        audit checkpoint and those it holds of other trusts) are kept in this trust's log."""
        self.audit.write(Event.NODE_DESCRIBED, caller=caller)
        for text in checkpoints[:64]:
            self.witnessed.see(text)
        return self.projects.held()

    def published_checkpoint(self) -> str:
        """The checkpoint sent with a description: signed now, at most once a minute."""
        return self.checkpoints.recent()

    def budget_request(self, project_id: str, caller: str) -> BudgetStatus:
        """A remote budget request: audited before it is answered, refusals included."""
        self.audit.write(Event.BUDGET_REQUESTED, project=str(project_id)[:64], caller=caller)
        try:
            self.expire()
            return self.budget(project_id)
        except UserError as exc:
            self.audit.write(
                Event.BUDGET_REFUSED,
                project=str(project_id)[:64],
                caller=caller,
                refusal=exc.refusal.value,
            )
            raise

    def _prepare(
        self,
        request: QueryRequest,
        received_at: str,
        cancelled: Callable[[], bool] | None,
        time_left: float | None,
    ) -> Prepared:
        prepared = self.planner.prepare(request)
        project_id, query_id = request.project_id, request.query_id
        entry = self.ledger.entry(project_id, query_id)
        if entry is not None and entry.fingerprint != prepared.fingerprint:
            raise _conflict()
        if entry is not None and entry.state in (State.PREPARED, State.COMMITTED):
            return Prepared(entry.units, replayed=True)
        slot = self.config.answer_slot_ms / 1000.0
        if time_left is not None and time_left < slot:
            raise _Unslotted(
                QueryRefused(
                    Refusal.DEADLINE_TOO_SHORT,
                    f"This trust answers on a fixed {self.config.answer_slot_ms} ms time slot; "
                    "the request's deadline is shorter. Allow more time.",
                )
            )
        if cancelled is not None and cancelled():
            raise _Unslotted(CallerGone("the caller gave up before the debit; nothing was spent"))
        self.expire()  # refunds that are due count before this reservation is judged
        reservation = self.ledger.reserve(
            project_id,
            query_id,
            prepared.fingerprint,
            prepared.units,
            received_at,
            {
                project_scope(prepared.project.project_id): prepared.project.total_units,
                NODE_SCOPE: self.config.node_total_units,
            },
            self.config.prepare_lease_seconds,
            prepared.approval,
            self._recorder(request.caller),
        )
        entry = reservation.entry
        if entry.fingerprint != prepared.fingerprint:
            raise _conflict()
        if entry.state in (State.PREPARED, State.COMMITTED):  # a concurrent request won
            return Prepared(entry.units, replayed=True)
        # The cost is fixed and debited; only now is the data read.
        result = self._compute(request, prepared, entry.reserved_at)
        stored = self.ledger.prepare(entry, result.to_json(), self._recorder(request.caller))
        if stored.state not in (State.PREPARED, State.COMMITTED):
            # aborted or expired while the data was read: the answer is destroyed
            raise QueryRefused(
                Refusal.NOT_PREPARED,
                "The reservation for this query id was aborted or expired while the answer "
                "was computed; nothing was spent. Retry with the same query id.",
            )
        return Prepared(entry.units, replayed=not reservation.created)

    def _compute(
        self, request: QueryRequest, prepared: PreparedQuery, released_at: str
    ) -> NodeResult:
        disputed = prepared.views if self.catalog.disputed_records == "exclude" else frozenset()
        exact = self._run(prepared.compiled, self.optouts.ids(prepared.optouts, disputed))
        as_of = self.database.data_as_of
        aggregates = release(prepared.release, exact)
        del exact
        return NodeResult(
            query_id=request.query_id,
            node_id=self.config.node_id,
            project_id=request.project_id,
            view=prepared.plan.view,
            catalog_version=self.catalog.version,
            reference_date=self.catalog.reference_date.isoformat(),
            group_by=prepared.plan.group_by,
            cells=prepared.compiled.cells,
            aggregates=aggregates,
            epsilon_units=prepared.units,
            released_at=released_at,
            data_as_of=as_of,
        )

    def _reloaded(self, ok: bool, detail: str) -> None:
        """A newly loaded database is switched to between queries (audited first: a switch that
        cannot be audited waits), or refused (audited)."""
        if ok:
            self.audit.write(Event.DATABASE_RELOADED, loaded_at=detail or None)
            log.info("database reloaded", extra={"node": self.config.node_id, "loaded_at": detail})
        else:
            self.audit.write(Event.DATABASE_RELOAD_REFUSED, reason=detail[:300])
            log.error(
                "newly loaded database refused; still serving the previous one",
                extra={"node": self.config.node_id, "reason": detail[:300]},
            )

    def _run(self, compiled: CompiledQuery, excluded: pa.Table) -> list[list[int]]:
        try:
            with self.database.reading() as cursor:
                return run_exact(cursor, compiled, excluded)
        except duckdb.Error as exc:
            raise DatabaseError(f"query execution failed: {type(exc).__name__}") from exc


def _conflict() -> QueryRefused:
    return QueryRefused(
        Refusal.QUERY_ID_CONFLICT,
        "This query id was already used for a different query; use a new id.",
    )

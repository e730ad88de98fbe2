"""Answering a query at a node: the one path every request takes, whoever dialled whom.

Order of work (each step refuses with a data-free reason before the next can run):

1. write the request to the audit log: nothing is acted on before it is logged (its fsync
   starts at once, runs while steps 2-5 do, and has finished before anything is returned);
2. decide everything that can refuse without touching the data (``node.prepare``): ids,
   project, ε (the node's minimum and the project's per-query cap), plan, views, tier, and the
   split of ε over the statistics, with every OpenDP measurement built;
3. a query id with a stored answer returns it (a different request under that id is refused);
   a caller whose deadline cannot fit the answer slot, or who has gone, is refused;
4. reserve the budget (project and node ceiling) in one durable transaction, the debit, and
   audit it (``query.reserved``);
5. only now read the data: run the compiled plan in the locked-down database, add the planned
   OpenDP noise, and store the noisy result under the query id;
6. audit the release, and hand it over on the answer slot: every answer leaves a multiple of
   ``answer_slot_ms`` after it was received, so its timing does not depend on the data.

Per release, one fsync waits in line: the ledger's stored answer (which also makes the
reservation durable). The request's audit line is fsynced alongside the work (shared by
concurrent requests), and the ``query.reserved`` and ``query.released`` lines reach the disk
with the next fsync or flush: their authoritative records (the reservation, the stored answer)
are the ledger's. A refusal's line is durable before the refusal is returned.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from fedtre import logs
from fedtre.audit import AuditLog
from fedtre.dp import units_to_epsilon
from fedtre.errors import InternalError, QueryRefused, Refusal, UserError
from fedtre.request import QueryRequest
from fedtre.result import NodeResult
from node.compiler import CompiledQuery, run_exact
from node.config import NodeConfig
from node.database import ResearchDatabase
from node.errors import CallerGone, DatabaseError
from node.ledger import NODE_SCOPE, Ledger, Reservation, project_scope
from node.prepare import Planner, PreparedQuery, find_project
from node.release import release

log = logs.get("node")


@dataclass(frozen=True)
class Answer:
    result: NodeResult
    replayed: bool  # the stored answer of an earlier request with this query id


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


class NodeEngine:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.catalog = config.catalog
        self.audit = AuditLog(config.audit_path, config.node_id)
        self.ledger = Ledger(config.ledger_path)
        self.planner = Planner(config)
        self.database = ResearchDatabase(
            config.database, config.catalog, config.duckdb_threads, config.duckdb_memory_limit
        )
        self.audit.write("node.started", catalog_version=self.catalog.version)
        if config.answer_slot_ms == 0:
            log.warning(
                "answer slot off: answer times can reveal the data (answer_slot_ms = 0)",
                extra={"node": config.node_id},
            )

    def close(self) -> None:
        self.audit.write("node.stopped")
        self.database.close()
        self.audit.close()

    def budget(self, project_id: str) -> BudgetStatus:
        project = find_project(self.config, project_id)
        return BudgetStatus(
            project_id=project_id,
            total_units=project.total_units,
            spent_units=self.ledger.spent(project_scope(project_id)),
            node_total_units=self.config.node_total_units,
            node_spent_units=self.ledger.spent(NODE_SCOPE),
        )

    def answer(self, request: QueryRequest) -> NodeResult:
        return self.answer_detail(request).result

    def answer_detail(
        self,
        request: QueryRequest,
        cancelled: Callable[[], bool] | None = None,
        time_left: float | None = None,
    ) -> Answer:
        """Answer a request, on the answer slot.

        ``time_left`` (seconds the caller will wait, if it has a deadline) must fit the slot, or
        the request is refused at once; ``cancelled`` is asked just before the budget is
        reserved, so a caller that has already given up costs nothing.
        """
        received = time.monotonic()
        # The release's timestamp: when the request arrived, to the second. Taken before any
        # work, so it says nothing about how long the data took to read.
        received_at = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            answer = self._audited(request, received_at, cancelled, time_left)
        except _Unslotted as unslotted:
            raise unslotted.error from None
        except BaseException:
            self._hold(received, request)
            raise
        self._hold(received, request)
        return answer

    def _audited(
        self,
        request: QueryRequest,
        received_at: str,
        cancelled: Callable[[], bool] | None,
        time_left: float | None,
    ) -> Answer:
        # Logged before anything is acted on; its fsync runs on the audit log's flusher while
        # the request is checked and the data read, and it is durable before anything leaves.
        received = self.audit.begin(
            "query.received",
            query_id=str(request.query_id)[:128],
            project=str(request.project_id)[:64],
            caller=request.caller,
            epsilon=request.epsilon if isinstance(request.epsilon, int | float) else None,
            sql=request.sql if isinstance(request.sql, str) else None,
        )
        try:
            result, replayed, charged = self._answer(request, received_at, cancelled, time_left)
        except _Unslotted as unslotted:
            self._audit_outcome(request, unslotted.error)
            raise
        except Exception as exc:
            self._audit_outcome(request, exc)
            raise
        # A replay spends nothing now; it names the units charged when the answer was first
        # stored, so the audit log reconciles with the ledger even if that release's own audit
        # line was never written. The ledger's stored answer (durable before this line) is the
        # release record; this line reaches the disk with the next fsync (group commit).
        self.audit.note(
            "query.replayed" if replayed else "query.released",
            query_id=request.query_id,
            project=request.project_id,
            caller=request.caller,
            epsilon_units=charged,
            charged_epsilon_units=result.epsilon_units,
            released_at=result.released_at,
        )
        self.audit.wait(received)
        return Answer(result, replayed)

    def _audit_outcome(self, request: QueryRequest, exc: Exception) -> None:
        if isinstance(exc, UserError):
            self.audit.write(
                "query.refused",
                query_id=str(request.query_id)[:128],
                project=str(request.project_id)[:64],
                caller=request.caller,
                refusal=exc.refusal.value,
                reason=exc.message,
            )
        else:  # internal errors and bugs: audited, nothing released
            self._audit_failure(request, exc)

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

    def describe(self, caller: str) -> tuple[str, ...]:
        """Audited: the ids of the projects this trust serves."""
        self.audit.write("node.described", caller=caller)
        return tuple(sorted(self.config.projects))

    def budget_request(self, project_id: str, caller: str) -> BudgetStatus:
        """A remote budget request: audited before it is answered, refusals included."""
        self.audit.write("budget.requested", project=str(project_id)[:64], caller=caller)
        try:
            return self.budget(project_id)
        except UserError as exc:
            self.audit.write(
                "budget.refused",
                project=str(project_id)[:64],
                caller=caller,
                refusal=exc.refusal.value,
            )
            raise

    def _audit_failure(self, request: QueryRequest, exc: Exception) -> None:
        with contextlib.suppress(InternalError):  # the audit log itself may be what failed
            self.audit.write(
                "query.failed",
                query_id=str(request.query_id)[:128],
                project=str(request.project_id)[:64],
                caller=request.caller,
                error=type(exc).__name__,
            )

    def _answer(
        self,
        request: QueryRequest,
        received_at: str,
        cancelled: Callable[[], bool] | None,
        time_left: float | None,
    ) -> tuple[NodeResult, bool, int]:
        """(result, replayed, units this request charged)."""
        prepared = self.planner.prepare(request)
        stored = self.ledger.lookup(request.query_id)
        if stored is not None:
            return self._replay(stored.fingerprint, stored.result, prepared.fingerprint), True, 0
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
        reservation = self.ledger.reserve(
            request.query_id,
            request.project_id,
            prepared.fingerprint,
            prepared.units,
            received_at,
            {
                project_scope(prepared.project.project_id): prepared.project.total_units,
                NODE_SCOPE: self.config.node_total_units,
            },
        )
        if reservation.fingerprint != prepared.fingerprint:
            raise _conflict()
        if reservation.stored is not None:  # a concurrent request of this id stored it first
            return NodeResult.from_json(reservation.stored.result), True, 0
        if reservation.created:  # the debit is in the audit log before any data is read
            self.audit.note(  # the ledger's reservation is the authoritative record
                "query.reserved",
                query_id=request.query_id,
                project=request.project_id,
                caller=request.caller,
                epsilon_units=reservation.units,
            )
        # The cost is fixed and debited; only now is the data read.
        result = self._compute(request, prepared, reservation)
        text = result.to_json()
        stored_release = self.ledger.store(reservation, text)
        charged = reservation.units if reservation.created else 0
        if stored_release.result != text:  # another request of this id stored its answer first
            return NodeResult.from_json(stored_release.result), True, charged
        return result, False, charged

    def _compute(
        self, request: QueryRequest, prepared: PreparedQuery, reservation: Reservation
    ) -> NodeResult:
        exact = self._run(prepared.compiled)
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
            released_at=reservation.reserved_at,
        )

    def _run(self, compiled: CompiledQuery) -> list[list[int]]:
        try:
            cursor = self.database.cursor()
            try:
                return run_exact(cursor, compiled)
            finally:
                cursor.close()
        except duckdb.Error as exc:
            raise DatabaseError(f"query execution failed: {type(exc).__name__}") from exc

    def _replay(self, stored_fingerprint: str, stored_result: str, fingerprint: str) -> NodeResult:
        if stored_fingerprint != fingerprint:
            raise _conflict()
        return NodeResult.from_json(stored_result)


def _conflict() -> QueryRefused:
    return QueryRefused(
        Refusal.QUERY_ID_CONFLICT,
        "This query id was already used for a different query; use a new id.",
    )

"""Answering a query at a node: the one path every request takes, whoever dialled whom.

Order of work (each step refuses with a data-free reason before the next can run):

1. write the request to the audit log (fsync) - nothing is acted on before it is logged;
2. check fields, project, ε (against the project's per-query cap), plan, view and tier scope;
3. a known query id with the same request returns the stored answer; a different request under
   the same id is refused;
4. check the remaining budget (project and node ceiling) before DuckDB runs;
5. run the compiled plan in the locked-down database and add OpenDP noise;
6. in one durable transaction: debit project and node budget and store the noisy result;
7. audit the release, then return it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from fedtre.audit import AuditLog
from fedtre.dp import epsilon_to_units, units_to_epsilon
from fedtre.errors import InternalError, QueryRefused, Refusal, UserError
from fedtre.parse import parse_query, query_tier
from fedtre.plan import QueryPlan, cohort_views
from fedtre.request import QueryRequest
from fedtre.result import NodeResult
from node.compiler import compile_plan, run_exact
from node.config import NodeConfig, ProjectPolicy
from node.database import open_research_db
from node.errors import CallerGone, DatabaseError
from node.ledger import NODE_SCOPE, Ledger, budget_refusal, project_scope
from node.release import release


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


class NodeEngine:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.catalog = config.catalog
        self.audit = AuditLog(config.audit_path, config.node_id)
        self.ledger = Ledger(config.ledger_path)
        self._db = open_research_db(
            config.database, config.catalog, config.duckdb_threads, config.duckdb_memory_limit
        )
        self._db_lock = threading.Lock()
        self.audit.write("node.started", catalog_version=self.catalog.version)

    def close(self) -> None:
        self.audit.write("node.stopped")
        self._db.close()
        self.audit.close()

    def budget(self, project_id: str) -> BudgetStatus:
        project = self._project(project_id)
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
        self, request: QueryRequest, cancelled: Callable[[], bool] | None = None
    ) -> Answer:
        """Answer a request; ``cancelled`` is asked just before the durable debit, so a caller
        that has already given up (deadline passed) costs nothing."""
        self.audit.write(
            "query.received",
            query_id=str(request.query_id)[:128],
            project=str(request.project_id)[:64],
            caller=request.caller,
            epsilon=request.epsilon if isinstance(request.epsilon, int | float) else None,
            sql=request.sql if isinstance(request.sql, str) else None,
        )
        try:
            result, replayed = self._answer(request, cancelled)
        except UserError as exc:
            self.audit.write(
                "query.refused",
                query_id=str(request.query_id)[:128],
                project=str(request.project_id)[:64],
                caller=request.caller,
                refusal=exc.refusal.value,
                reason=exc.message,
            )
            raise
        except Exception as exc:  # internal errors and bugs: audited, nothing released
            self._audit_failure(request, exc)
            raise
        # A replay spends nothing now; it names the units charged when the answer was first
        # stored, so the audit log reconciles with the ledger even if that release's own audit
        # line was never written.
        self.audit.write(
            "query.replayed" if replayed else "query.released",
            query_id=request.query_id,
            project=request.project_id,
            caller=request.caller,
            epsilon_units=0 if replayed else result.epsilon_units,
            charged_epsilon_units=result.epsilon_units,
            released_at=result.released_at,
        )
        return Answer(result, replayed)

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
        self, request: QueryRequest, cancelled: Callable[[], bool] | None
    ) -> tuple[NodeResult, bool]:
        request.check_fields()
        project = self._project(request.project_id)
        units = epsilon_to_units(request.epsilon)
        if units > project.max_units_per_query:
            raise QueryRefused(
                Refusal.OUT_OF_SCOPE,
                f"ε {units_to_epsilon(units):g} is above this project's per-query limit of "
                f"{units_to_epsilon(project.max_units_per_query):g}.",
            )
        plan = parse_query(request.sql, self.catalog)
        self._check_scope(plan, project)
        fingerprint = _fingerprint(request.project_id, plan, units)

        stored = self.ledger.lookup(request.query_id)
        if stored is not None:
            return self._replay(stored.fingerprint, stored.result, fingerprint), True

        limits = {
            project_scope(project.project_id): project.total_units,
            NODE_SCOPE: self.config.node_total_units,
        }
        for scope, total in limits.items():
            if self.ledger.spent(scope) + units > total:
                racing = self.ledger.lookup(request.query_id)
                if racing is not None:  # the original of this retry committed meanwhile
                    return self._replay(racing.fingerprint, racing.result, fingerprint), True
                raise budget_refusal(scope)

        compiled = compile_plan(plan, self.catalog)
        try:
            with self._db_lock:
                cursor = self._db.cursor()
            try:
                exact = run_exact(cursor, compiled)
            finally:
                cursor.close()
        except duckdb.Error as exc:
            raise DatabaseError(f"query execution failed: {type(exc).__name__}") from exc
        aggregates = release(plan, compiled.view, len(compiled.cells), exact, units)
        del exact
        result = NodeResult(
            query_id=request.query_id,
            node_id=self.config.node_id,
            project_id=request.project_id,
            view=plan.view,
            catalog_version=self.catalog.version,
            group_by=plan.group_by,
            cells=compiled.cells,
            aggregates=aggregates,
            epsilon_units=units,
            released_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )
        if cancelled is not None and cancelled():
            raise CallerGone("the caller gave up before the release; nothing was spent")
        stored_release, created = self.ledger.commit_release(
            request.query_id,
            request.project_id,
            fingerprint,
            units,
            result.to_json(),
            result.released_at,
            limits,
        )
        if not created:
            return self._replay(
                stored_release.fingerprint, stored_release.result, fingerprint
            ), True
        return result, False

    def _replay(self, stored_fingerprint: str, stored_result: str, fingerprint: str) -> NodeResult:
        if stored_fingerprint != fingerprint:
            raise QueryRefused(
                Refusal.QUERY_ID_CONFLICT,
                "This query id was already used for a different query; use a new id.",
            )
        return NodeResult.from_json(stored_result)

    def _project(self, project_id: str) -> ProjectPolicy:
        project = self.config.projects.get(project_id)
        if project is None:
            raise QueryRefused(
                Refusal.UNKNOWN_PROJECT, "This trust has no approved project with that id."
            )
        return project

    def _check_scope(self, plan: QueryPlan, project: ProjectPolicy) -> None:
        views = {plan.view} | cohort_views(plan.where)
        outside = sorted(views - project.views)
        if outside:
            raise QueryRefused(
                Refusal.OUT_OF_SCOPE,
                f"This project is not approved to use the view(s): {', '.join(outside)}.",
            )
        tier = query_tier(plan, self.catalog)
        if tier > project.max_tier:
            raise QueryRefused(
                Refusal.OUT_OF_SCOPE,
                f"This query touches {tier.value.replace('_', ' ')} data; the project is "
                f"approved up to {project.max_tier.value.replace('_', ' ')}.",
            )


def _fingerprint(project_id: str, plan: QueryPlan, units: int) -> str:
    text = json.dumps(
        {"project": project_id, "plan": plan.canonical(), "units": units}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()

"""Answering a researcher: the coordinator's plain functions, whoever the transport is.

1. audit the request (before acting on it);
2. refuse what the coordinator can judge alone: fields, project, researcher, ε cap, the query
   against the catalog; nothing is sent to any trust then, and nothing is spent;
3. fan out to the project's trusts in parallel, each call with the deadline;
4. combine the answers of the trusts that answered (noisy values only) and apply the project's
   output rules; release only if every trust answered or the project allows partial results;
5. audit the outcome with the trusts covered and the ε each charged.
A retry with the same query id replays every trust's stored answer: same numbers, no new debit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from coordinator.combine import Combined, CombineError, combine
from coordinator.config import CoordinatorConfig, Project
from coordinator.fanout import TrustOutcome, Trusts, TrustState
from fedtre import logs
from fedtre.audit import AuditLog
from fedtre.dp import epsilon_to_units, units_to_epsilon
from fedtre.errors import QueryRefused, Refusal, UserError
from fedtre.parse import parse_query
from fedtre.request import check_ids
from fedtre.v1 import node_pb2 as npb

log = logs.get("coordinator")

NO_PROJECT = "No project with that id is open to you. Ask the project lead to add your name."


@dataclass(frozen=True)
class Submission:
    query_id: str
    project_id: str
    sql: str
    epsilon: float | None  # None: the project's default; anything given is checked, 0 refused


@dataclass(frozen=True)
class Outcome:
    query_id: str
    project: Project
    epsilon_units: int
    trusts: tuple[TrustOutcome, ...]
    combined: Combined | None  # None when withheld
    withheld_reason: str = ""


class CoordinatorEngine:
    def __init__(self, config: CoordinatorConfig, trusts: Trusts) -> None:
        self.config = config
        self.trusts = trusts
        self.audit = AuditLog(config.audit_path, config.coordinator_id, role="coordinator")
        self.audit.write("coordinator.started", catalog_version=config.catalog.version)

    def close(self) -> None:
        self.audit.write("coordinator.stopped")
        self.trusts.close()
        self.audit.close()

    # -- queries ---------------------------------------------------------------------------

    def submit(self, researcher: str, sub: Submission) -> Outcome:
        query_id = sub.query_id or f"q-{uuid.uuid4()}"
        self.audit.write(
            "query.received",
            query_id=query_id[:128],
            project=sub.project_id[:64],
            researcher=researcher,
            epsilon=sub.epsilon,
            sql=sub.sql,
        )
        try:
            project, units = self._check(researcher, query_id, sub)
        except UserError as exc:
            self.audit.write(
                "query.refused",
                query_id=query_id[:128],
                project=sub.project_id[:64],
                researcher=researcher,
                refusal=exc.refusal.value,
                reason=exc.message,
            )
            raise
        request = npb.AnswerRequest(
            query_id=query_id,
            project_id=project.project_id,
            sql=sub.sql,
            epsilon_units=units,
            researcher=researcher,
        )
        outcomes = tuple(self.trusts.answer(project.trusts, request, self.config.deadline_seconds))
        outcome = self._combine(query_id, project, units, outcomes)
        # Per-trust timings go to the operator log only: never to researchers.
        log.info(
            "query.trusts",
            extra={
                "query_id": query_id,
                "handling_ms": {o.node_id: round(o.handling_ms, 3) for o in outcomes},
            },
        )
        self.audit.write(
            "query.released" if outcome.combined is not None else "query.withheld",
            query_id=query_id,
            project=project.project_id,
            researcher=researcher,
            epsilon_units=units,
            trusts={o.node_id: o.state.value for o in outcomes},
            charged={o.node_id: units for o in outcomes if o.state is TrustState.ANSWERED},
            replayed=sorted(o.node_id for o in outcomes if o.replayed),
            withheld_reason=outcome.withheld_reason or None,
        )
        return outcome

    def _check(self, researcher: str, query_id: str, sub: Submission) -> tuple[Project, int]:
        check_ids(query_id, sub.project_id)
        project = self.project_for(researcher, sub.project_id)
        units = project.default_units if sub.epsilon is None else epsilon_to_units(sub.epsilon)
        if units > project.max_units_per_query:
            raise QueryRefused(
                Refusal.OUT_OF_SCOPE,
                f"ε {units_to_epsilon(units):g} is above this project's per-query limit of "
                f"{units_to_epsilon(project.max_units_per_query):g}.",
            )
        parse_query(sub.sql, self.config.catalog)  # refuses before anything is sent
        return project, units

    def _combine(
        self, query_id: str, project: Project, units: int, outcomes: tuple[TrustOutcome, ...]
    ) -> Outcome:
        version = self.config.catalog.version
        checked = []
        for o in outcomes:
            if o.result is not None and o.result.catalog_version != version:
                o = TrustOutcome(
                    o.node_id, TrustState.FAILED, reason="uses a different catalog version"
                )
            checked.append(o)
        outcomes = tuple(checked)
        answered = [o for o in outcomes if o.state is TrustState.ANSWERED]
        missing = sorted(o.node_id for o in outcomes if o.state is not TrustState.ANSWERED)
        withheld = ""
        if not answered:
            withheld = "No trust answered, so there is nothing to release."
        elif missing and not project.allow_partial:
            withheld = (
                f"Trust(s) {', '.join(missing)} did not answer and this project releases only "
                "results that cover every trust. Retry with the same query id: trusts that "
                "already answered return their stored answer at no extra cost."
            )
        if withheld:
            return Outcome(query_id, project, units, outcomes, None, withheld)
        try:
            combined = combine([o.result for o in answered if o.result is not None], project.rules)
        except CombineError:
            return Outcome(
                query_id,
                project,
                units,
                outcomes,
                None,
                "The trusts' answers do not fit together (an internal error); operators have "
                "details.",
            )
        return Outcome(query_id, project, units, outcomes, combined)

    # -- projects and budget ---------------------------------------------------------------

    def project_for(self, researcher: str, project_id: str) -> Project:
        project = self.config.projects.get(project_id)
        if project is None or researcher not in project.researchers:
            raise QueryRefused(Refusal.NOT_AUTHORISED, NO_PROJECT)
        return project

    def projects(self, researcher: str) -> list[Project]:
        self.audit.write("projects.listed", researcher=researcher)
        return [p for _, p in sorted(self.config.projects.items()) if researcher in p.researchers]

    def budget(self, researcher: str, project_id: str) -> tuple[Project, list[TrustOutcome]]:
        self.audit.write("budget.requested", project=project_id[:64], researcher=researcher)
        try:
            project = self.project_for(researcher, project_id)
        except UserError as exc:
            self.audit.write(
                "budget.refused",
                project=project_id[:64],
                researcher=researcher,
                refusal=exc.refusal.value,
            )
            raise
        return project, self.trusts.budget(
            project.trusts, project.project_id, self.config.deadline_seconds
        )

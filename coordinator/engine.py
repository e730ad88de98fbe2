"""Answering a researcher: the coordinator's plain functions, whoever the transport is.

1. audit the request (before acting on it);
2. refuse what the coordinator can judge alone: fields, project, researcher, ε cap, the query
   against the catalog; nothing is sent to any trust then, and nothing is spent;
3. phase 1: ask every trust of the project to prepare (validate, reserve ε, compute and store
   its noisy answer; nothing data-dependent comes back), each call with the deadline;
4. phase 2: if the project's rule is met (every trust prepared, or at least one when the
   project allows partial results), commit at the prepared trusts and collect their answers;
   otherwise abort them, so that a withheld answer spends nothing anywhere;
5. combine the committed answers (noisy values only), apply the project's output rules, and
   audit the outcome with its release record: the trusts covered, the ε each newly spent
   (a trust that replayed an earlier answer spent nothing), mechanisms and output rules.
A retry with the same query id replays every committed answer: same numbers, no new debit.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from coordinator.combine import CombineError, combine
from coordinator.config import CoordinatorConfig, Project
from coordinator.fanout import Trusts
from coordinator.outcome import Outcome, TrustOutcome, TrustState
from coordinator.projects import ProjectBook
from fedtre import logs
from fedtre.audit.checkpoint import Publisher, open_signed_log
from fedtre.audit.events import Event
from fedtre.audit.records import coordinator_release
from fedtre.audit.witness import Witness
from fedtre.catalog import Catalog
from fedtre.dp import epsilon_to_units, units_to_epsilon
from fedtre.errors import QueryRefused, Refusal, UserError
from fedtre.governance.bundle import Bundle
from fedtre.governance.query_signature import verify as verify_query
from fedtre.parse import parse_query
from fedtre.pki_requests import RevocationList
from fedtre.plan import QueryPlan, fingerprint
from fedtre.protocol import NodeOutcome, OutcomeKind, PrepareRequest
from fedtre.request import Submission, check_ids

log = logs.get("coordinator")

# Phase 2 is a ledger update at each trust: it gets its own short deadline.
DECISION_SECONDS = 10.0


class CoordinatorEngine:
    def __init__(self, config: CoordinatorConfig, trusts: Trusts) -> None:
        self.config = config
        self.trusts = trusts
        self.book = ProjectBook(config)
        self._ca: bytes | None = None  # the federation CA: checks researchers' signatures
        self.crl = (
            RevocationList(config.crl, config.ca)
            if config.crl is not None and config.ca is not None
            else None
        )
        self._on_close: list[Callable[[], None]] = []
        # Told (outcome, seconds) after every query that reached the trusts (metrics).
        self.on_query: Callable[[str, float], None] = lambda outcome, seconds: None
        # Parsed plans by SQL text (the catalog is fixed): a question asked again is not
        # parsed again. Refusals raise, so they are never cached.
        self._parse = functools.lru_cache(maxsize=512)(self._parse_sql)
        self.audit, self.audit_key = open_signed_log(
            config.audit_path, config.state_dir, config.coordinator_id, role="coordinator"
        )
        self.checkpoints = Publisher(self.audit, self.audit_key)
        self.audit.started(
            Event.COORDINATOR_STARTED,
            catalog_version=config.catalog.version,
            config_sha256=config.config_digest,
        )
        self.witnessed = Witness(self.audit)
        self.checkpoint()

    def on_close(self, hook: Callable[[], None]) -> None:
        self._on_close.append(hook)

    def close(self) -> None:
        for hook in self._on_close:
            hook()
        self.audit.write(Event.COORDINATOR_STOPPED)
        self.checkpoint()
        self.trusts.close()
        self.audit.close()

    def checkpoint(self) -> str:
        """Sign the audit log's head now; returns the checkpoint (JSON) to publish."""
        return self.checkpoints.sign()

    def witness(self, trust: str, text: str) -> str:
        """Keep a trust's signed audit checkpoint in this log; returns the problem ("" if
        none): a trust whose log was replaced, shrank, or was rewritten at the same size."""
        seen = self.witnessed.see(text, expected_actor=trust)
        if seen.problem:
            log.error("trust audit log regressed", extra={"node": trust, "problem": seen.problem})
        return seen.problem

    def shared_checkpoints(self, trust: str = "") -> tuple[str, ...]:
        """Sent with each Describe: this coordinator's checkpoint, signed now at most once a
        minute, and the newest it holds of every trust (each trust keeps them all)."""
        return self.witnessed.shared(self.checkpoints.recent(), exclude=trust)

    # -- queries ---------------------------------------------------------------------------

    def submit(self, researcher: str, sub: Submission) -> Outcome:
        query_id = sub.query_id or f"q-{uuid.uuid4()}"
        # In the log before anything is acted on; it reaches the disk with the outcome's line
        # (one fsync per query: a crash before it leaves no answer released either).
        self.audit.note(
            Event.QUERY_RECEIVED,
            query_id=query_id[:128],
            project=sub.project_id[:64],
            researcher=researcher,
            epsilon=sub.epsilon,
            sql=sub.sql,
        )
        try:
            project, units, approval = self._check(researcher, query_id, sub)
        except UserError as exc:
            self.audit.write(
                Event.QUERY_REFUSED,
                query_id=query_id[:128],
                project=sub.project_id[:64],
                researcher=researcher,
                refusal=exc.refusal.value,
                reason=exc.message,
            )
            raise
        request = PrepareRequest(
            query_id=query_id,
            project_id=project.project_id,
            sql=sub.sql,
            epsilon_units=units,
            researcher=researcher,
            approval=approval,
            signed=sub.signed,
        )
        started = time.perf_counter()
        outcomes = self._two_phases(project, request)
        outcome = self._combine(query_id, project, units, outcomes)
        # Per-trust timings go to the operator log only: never to researchers.
        log.info(
            "query.trusts",
            extra={
                "query_id": query_id,
                "handling_ms": {o.node_id: round(o.handling_ms, 3) for o in outcomes},
                "states": {o.node_id: o.state.value for o in outcome.trusts},
            },
        )
        seconds = time.perf_counter() - started
        status = "released" if outcome.combined is not None else "withheld"
        log.info(
            "query",
            extra={
                "query_id": query_id,
                "project": project.project_id,
                "outcome": status,
                "epsilon_units": units,
                "trusts_answered": sum(o.state is TrustState.ANSWERED for o in outcome.trusts),
                "ms": round(seconds * 1000.0, 3),
            },
        )
        self.on_query(status, seconds)
        spent = {  # before combining: a trust that answered spent, whatever combining made of it
            o.node_id: units for o in outcomes if o.state is TrustState.ANSWERED and not o.replayed
        }
        replayed = sorted(o.node_id for o in outcome.trusts if o.replayed)
        fields: dict[str, object] = {
            "query_id": query_id,
            "project": project.project_id,
            "researcher": researcher,
            "trusts": {o.node_id: o.state.value for o in outcome.trusts},
            "spent_epsilon_units": spent,  # per trust: newly spent by this request
            "replayed": replayed,  # per trust: an earlier answer again, nothing spent
            # refused by a trust's call policy: its log has call.refused, naming no query
            "refused_at_call": sorted(o.node_id for o in outcomes if o.before_handler),
        }
        if outcome.combined is None:
            event = Event.QUERY_WITHHELD
            fields["withheld_reason"] = outcome.withheld_reason
        else:
            event = Event.QUERY_RELEASED if spent else Event.QUERY_REPLAYED
            fields["release"] = coordinator_release(
                {o.node_id: o.result for o in outcome.trusts if o.result is not None},
                fields["trusts"],  # type: ignore[arg-type]
                replayed,
                _approval_digest(approval),
                fingerprint(project.project_id, self._parse(sub.sql), units),
                units,
                {
                    "suppress_below": project.rules.suppress_below,
                    "round_to": project.rules.round_to,
                    "allow_partial": project.allow_partial,
                },
            )
        self.audit.write(event, **fields)
        return outcome

    def _two_phases(self, project: Project, request: PrepareRequest) -> tuple[TrustOutcome, ...]:
        trusts = project.trusts
        prepared = self.trusts.prepare(trusts, request, self.config.deadline_seconds)
        ready = [o.node_id for o in prepared if o.kind is OutcomeKind.PREPARED]
        silent = [
            o.node_id for o in prepared if o.kind in (OutcomeKind.UNAVAILABLE, OutcomeKind.FAILED)
        ]
        rule_met = bool(ready) and (len(ready) == len(trusts) or project.allow_partial)
        final: dict[str, TrustOutcome] = {
            o.node_id: _trust(o) for o in prepared if o.kind is not OutcomeKind.PREPARED
        }
        if silent:  # they may have prepared after all: free their reservations sooner
            self.trusts.abort_later(silent, request, DECISION_SECONDS)
        if rule_met:
            for o in self.trusts.commit(ready, request, DECISION_SECONDS):
                final[o.node_id] = _trust(o)
        elif ready:
            for o in self.trusts.abort(ready, request, DECISION_SECONDS):
                final[o.node_id] = _withdrawn(o)
        timing = {o.node_id: o.handling_ms for o in prepared}
        return tuple(
            replace(final[nid], handling_ms=timing.get(nid, 0.0) + final[nid].handling_ms)
            for nid in trusts
        )

    def _check(self, researcher: str, query_id: str, sub: Submission) -> tuple[Project, int, bytes]:
        check_ids(query_id, sub.project_id)
        listed = self.book.for_researcher(researcher, sub.project_id)
        project = listed.project
        units = project.default_units if sub.epsilon is None else epsilon_to_units(sub.epsilon)
        if units > project.max_units_per_query:
            raise QueryRefused(
                Refusal.OUT_OF_SCOPE,
                f"ε {units_to_epsilon(units):g} is above this project's per-query limit of "
                f"{units_to_epsilon(project.max_units_per_query):g}.",
            )
        self._parse(sub.sql)  # refuses before anything is sent
        if listed.application is not None and self.config.ca is not None:
            # every trust checks this itself; checked here to refuse early and say why
            signer = verify_query(
                sub.signed,
                ca_pem=self._ca_pem(),
                application=listed.application,
                project_id=sub.project_id,
                query_id=query_id,
                sql=sub.sql,
                epsilon_units=units,
                now=datetime.now(UTC),
                revoked=self.crl.problem if self.crl is not None else None,
            )
            if signer != researcher:
                raise QueryRefused(
                    Refusal.NOT_AUTHORISED,
                    "The query is signed with another researcher's certificate than the one "
                    "that sent it.",
                )
        return project, units, listed.approval

    def _ca_pem(self) -> bytes:
        if self._ca is None:
            assert self.config.ca is not None
            self._ca = self.config.ca.read_bytes()
        return self._ca

    def _parse_sql(self, sql: str) -> QueryPlan:
        return parse_query(sql, self.config.catalog)

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
        missing = sorted(
            o.node_id
            for o in outcomes
            if o.state not in (TrustState.ANSWERED, TrustState.WITHDRAWN)
        )
        withheld = ""
        if missing and (not answered or not project.allow_partial):
            withheld = (
                f"Trust(s) {', '.join(missing)} did not answer"
                + (
                    " and this project releases only results that cover every trust"
                    if not project.allow_partial
                    else ""
                )
                + ". Nothing was spent at the trusts whose answers were withdrawn. Retry with "
                "the same query id: a trust that already released its answer returns it "
                "again at no extra cost."
            )
        elif not answered:
            withheld = "No trust answered, so there is nothing to release."
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
        return self.book.for_researcher(researcher, project_id).project

    def projects(self, researcher: str) -> list[Project]:
        self.audit.write(Event.PROJECTS_LISTED, researcher=researcher)
        return [
            listed.project
            for listed in self.book.approved()
            if researcher in listed.project.researchers
        ]

    def catalog(self, researcher: str) -> Catalog:
        """The federation's catalog (public); audited like every request."""
        self.audit.write(Event.CATALOG_REQUESTED, researcher=researcher)
        return self.config.catalog

    def budget(self, researcher: str, project_id: str) -> tuple[Project, list[TrustOutcome]]:
        self.audit.write(Event.BUDGET_REQUESTED, project=project_id[:64], researcher=researcher)
        try:
            project = self.project_for(researcher, project_id)
        except UserError as exc:
            self.audit.write(
                Event.BUDGET_REFUSED,
                project=project_id[:64],
                researcher=researcher,
                refusal=exc.refusal.value,
            )
            raise
        replies = self.trusts.budget(
            project.trusts, project.project_id, self.config.deadline_seconds
        )
        return project, [_trust(o) for o in replies]


@functools.lru_cache(maxsize=64)
def _approval_digest(approval: bytes) -> str:
    """The signed application's digest, as every trust records it ("" when hand-kept)."""
    return Bundle.from_bytes(approval).digest if approval else ""


_STATES = {
    OutcomeKind.COMMITTED: TrustState.ANSWERED,
    OutcomeKind.BUDGET: TrustState.ANSWERED,
    OutcomeKind.UNAVAILABLE: TrustState.UNAVAILABLE,
    OutcomeKind.REFUSED: TrustState.REFUSED,
    OutcomeKind.FAILED: TrustState.FAILED,
    OutcomeKind.ABORTED: TrustState.WITHDRAWN,
    OutcomeKind.PREPARED: TrustState.FAILED,  # never final: prepared means phase 2 is due
}


def _trust(o: NodeOutcome) -> TrustOutcome:
    return TrustOutcome(
        node_id=o.node_id,
        state=_STATES[o.kind],
        result=o.result,
        replayed=o.replayed,
        refusal=o.refusal,
        reason=o.reason,
        remaining_units=o.remaining_units,
        handling_ms=o.handling_ms,
        before_handler=o.before_handler,
    )


def _withdrawn(o: NodeOutcome) -> TrustOutcome:
    """A prepared trust the coordinator aborted: nothing spent there (or, if the id had been
    released earlier, nothing new)."""
    if o.kind in (OutcomeKind.ABORTED, OutcomeKind.COMMITTED):
        reason = "prepared, then withdrawn because other trusts did not answer: nothing spent"
        if o.kind is OutcomeKind.COMMITTED:
            reason = "withdrawn: this id's answer was released here earlier; nothing new spent"
        return TrustOutcome(
            o.node_id,
            TrustState.WITHDRAWN,
            reason=reason,
            remaining_units=o.remaining_units,
            handling_ms=o.handling_ms,
        )
    return _trust(o)  # the abort itself failed: its lease at the trust refunds it

"""What the public register says, gathered from what actually happened.

Sources: the project registry (applications and signed statements, each verified against the
committee's keys), the committee file (members' roles), and the audit logs (the trusts' own,
in their ``ledger.sqlite``, and the coordinators'). Nothing here is taken on trust from a
summary: queries run and ε spent are counted from ``query.released`` entries, refusals from
``query.refused`` entries.

Public by design: titles, lay summaries, purposes, organisation types, approvals by role,
trusts taking part, dates, queries run, ε spent. Never: researchers' SQL, researcher names,
row-level values, or any aggregate of the data.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtre.audit.events import Event
from fedtre.audit.log import entries
from fedtre.audit.verify import verify
from fedtre.errors import ConfigError
from fedtre.governance.documents import (
    NAME,
    Application,
    DocumentError,
    Kind,
    MemberRole,
    Participation,
    Verdict,
    digest,
)
from fedtre.governance.policy import Committee
from fedtre.governance.registry import Registry
from fedtre.governance.verify import NotApproved, check

PURPOSES = {
    "public-benefit-research": "Research for public benefit",
    "nhs-service-evaluation": "NHS service evaluation",
    "commercial": "Commercial (a company's product or service)",
}
ORGANISATIONS = {
    "nhs": "NHS organisation",
    "university": "University",
    "charity": "Charity",
    "government": "Government body",
    "company": "Company",
}
ROLES = {
    "service-user": "Service user (someone with lived experience of mental-health services)",
    "clinician": "Clinician",
    "information-governance": "Information governance",
    "researcher": "Researcher",
    "lay-member": "Lay member",
}
TIERS = {
    "general": "general health records (such as age, sex and GP visits)",
    "mental_health": "mental-health records",
    "highly_sensitive": "highly sensitive records (such as self-harm and detentions)",
}
REFUSALS = {
    "invalid_request": "The request was malformed",
    "unsupported_query": "The question is not one fedtre can answer safely",
    "unknown_view": "It asked for data that is not available",
    "unknown_column": "It asked for data that is not available",
    "invalid_value": "It used a value that is not allowed",
    "too_large": "The answer would have been too detailed",
    "unknown_project": "It was not part of an approved project",
    "out_of_scope": "It asked for more than the project was approved for",
    "invalid_epsilon": "It asked for a privacy cost that is not allowed",
    "budget_exhausted": "The project's privacy budget was used up",
    "query_id_conflict": "It reused a query number for a different question",
    "not_authorised": "The person asking was not approved, or the approval had ended",
    "deadline_too_short": "It did not allow the trust enough time to answer safely",
    "not_prepared": "It asked to release an answer that had been withdrawn",
}


@dataclass(frozen=True)
class Approval:
    role: str  # MemberRole value
    verdict: str  # approve | reject
    signed_on: str  # YYYY-MM-DD


@dataclass(frozen=True)
class TrustPart:
    trust: str
    participation: str  # plain words
    queries: int  # answers released here
    epsilon_spent: float
    epsilon_budget: float


@dataclass(frozen=True)
class ProjectEntry:
    project_id: str
    title: str
    lay_summary: str
    purpose: str
    purpose_label: str
    organisation: str
    organisation_type: str
    status: str  # approved | revoked | expired | rejected | awaiting approval | not approved
    status_detail: str
    submitted_on: str
    approved_on: str
    expires_on: str
    revoked_on: str
    approvals: tuple[Approval, ...]
    service_user_signoff: bool
    data_used: tuple[str, ...]  # views
    highest_tier: str
    trusts: tuple[TrustPart, ...]
    queries_run: int  # results released to the researchers (coordinator's records)

    @property
    def epsilon_spent(self) -> float:
        return sum(t.epsilon_spent for t in self.trusts)


@dataclass(frozen=True)
class TrustEntry:
    trust: str
    projects: tuple[tuple[str, str, str, int, float], ...]  # id, title, status, queries, ε


@dataclass(frozen=True)
class Register:
    generated_at: str
    projects: tuple[ProjectEntry, ...]
    trusts: tuple[TrustEntry, ...]
    refusals: dict[str, int] = field(default_factory=dict)  # refusal kind -> requests
    left_out: tuple[str, ...] = ()  # logs that did not verify, malformed projects

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "projects": [_project_json(p) for p in self.projects],
            "trusts": [
                {
                    "trust": t.trust,
                    "projects": [
                        {"project_id": i, "title": ti, "status": s, "queries": q, "epsilon": e}
                        for i, ti, s, q, e in t.projects
                    ],
                }
                for t in self.trusts
            ],
            "refusals": [
                {"reason": k, "in_plain_words": REFUSALS.get(k, k), "requests": n}
                for k, n in sorted(self.refusals.items())
            ],
            "left_out": list(self.left_out),
        }


def _project_json(p: ProjectEntry) -> dict[str, Any]:
    return {
        "project_id": p.project_id,
        "title": p.title,
        "lay_summary": p.lay_summary,
        "purpose": p.purpose,
        "organisation": p.organisation,
        "organisation_type": p.organisation_type,
        "status": p.status,
        "status_detail": p.status_detail,
        "submitted_on": p.submitted_on,
        "approved_on": p.approved_on,
        "expires_on": p.expires_on,
        "revoked_on": p.revoked_on,
        "approvals": [
            {"role": a.role, "verdict": a.verdict, "signed_on": a.signed_on} for a in p.approvals
        ],
        "service_user_signoff": p.service_user_signoff,
        "data_used": list(p.data_used),
        "highest_tier": p.highest_tier,
        "queries_run": p.queries_run,
        "trusts": [
            {
                "trust": t.trust,
                "participation": t.participation,
                "queries": t.queries,
                "epsilon_spent": t.epsilon_spent,
                "epsilon_budget": t.epsilon_budget,
            }
            for t in p.trusts
        ],
    }


@dataclass
class _Activity:
    released: Counter[tuple[str, str]] = field(default_factory=Counter)  # (trust, project)
    units: Counter[tuple[str, str]] = field(default_factory=Counter)
    results: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # query ids
    refusals: Counter[str] = field(default_factory=Counter)


def _activity(coordinator_logs: Sequence[Path], trust_logs: Sequence[Path]) -> _Activity:
    """Releases and ε per trust and project (the trusts' own logs), results released to
    researchers (the coordinators': a query id whose result went out, first time or on a
    retry), and refused requests by reason: each request once, whether the coordinator refused
    it or one or more trusts did, and not if a retry of it was answered. A trust's own
    operators' queries (``local:``) are not counted as refusals."""
    act = _Activity()
    refused: dict[tuple[str, str], str] = {}  # (project, query id) -> reason
    answered: set[tuple[str, str]] = set()
    for path in trust_logs:
        trust = ""
        for e in entries(path, (Event.LOG_CREATED, Event.QUERY_RELEASED, Event.QUERY_REFUSED)):
            key = (str(e.get("project", "")), str(e.get("query_id", "")))
            if e["event"] == Event.LOG_CREATED.value:
                trust = str(e.get("node", ""))
            elif e["event"] == Event.QUERY_RELEASED.value:
                act.released[(trust, key[0])] += 1
                act.units[(trust, key[0])] += _units(e.get("epsilon_units"))
                answered.add(key)
            elif not str(e.get("caller", "")).startswith("local:"):
                refused.setdefault(key, str(e.get("refusal", "other")))
    for path in coordinator_logs:
        kinds = (Event.QUERY_RELEASED, Event.QUERY_REPLAYED, Event.QUERY_REFUSED)
        for e in entries(path, kinds):
            key = (str(e.get("project", "")), str(e.get("query_id", "")))
            if e["event"] == Event.QUERY_REFUSED.value:
                refused[key] = str(e.get("refusal", "other"))
            elif isinstance(e.get("release"), dict):  # a result went out
                act.results[key[0]].add(key[1])
                answered.add(key)
    act.refusals.update(r for key, r in refused.items() if key not in answered)
    return act


def _units(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def build(
    registry: Registry,
    committee: Committee,
    coordinator_logs: Sequence[Path] = (),
    trust_logs: Sequence[Path] = (),
    now: dt.datetime | None = None,
) -> Register:
    """The register's facts. Each log is verified first: one that does not verify is left
    out (and named in ``left_out``), so that no figure comes from a log that was tampered
    with; a malformed project in the registry is left out the same way."""
    now = now or dt.datetime.now(dt.UTC)
    left_out: list[str] = []
    kept: list[list[Path]] = [[], []]
    for side, logs in enumerate((coordinator_logs, trust_logs)):
        for path in logs:
            checked = verify(path)
            if checked.ok:
                kept[side].append(path)
            else:
                left_out.append(f"{path.name} of {checked.actor or 'unknown'}: does not verify")
    act = _activity(kept[0], kept[1])
    projects = []
    for project_id in registry.projects():
        try:
            projects.append(_project(registry, committee, project_id, act, now))
        except ConfigError as exc:  # malformed registry entry (RegistryError, DocumentError)
            left_out.append(f"project {project_id}: {str(exc)[:200]}")
    by_trust: dict[str, list[tuple[str, str, str, int, float]]] = defaultdict(list)
    for p in projects:
        for t in p.trusts:
            by_trust[t.trust].append((p.project_id, p.title, p.status, t.queries, t.epsilon_spent))
    for trust, _ in act.released:
        by_trust.setdefault(trust, [])
    for trust in [t for t in by_trust if not NAME.match(t)]:  # names become file names
        del by_trust[trust]
        left_out.append(f"a trust named {trust[:40]!r} (not a valid trust name)")
    return Register(
        generated_at=now.replace(microsecond=0).isoformat(),
        projects=tuple(projects),
        trusts=tuple(TrustEntry(t, tuple(ps)) for t, ps in sorted(by_trust.items())),
        refusals=dict(act.refusals),
        left_out=tuple(left_out),
    )


def _project(
    registry: Registry, committee: Committee, project_id: str, act: _Activity, now: dt.datetime
) -> ProjectEntry:
    raw = registry.application(project_id)
    app = Application.from_bytes(raw)
    app_digest = digest(raw)
    approvals, participation, revoked_on = [], {}, ""
    # The bundle holds each signer's latest decision and each trust's latest word on this
    # version, and every revocation; only signatures that verify against the committee's keys
    # are shown (a guardian's key is pinned by the trust, not here: shown as declared).
    for signed in registry.bundle(project_id).statements:
        try:
            statement = signed.statement()
        except DocumentError:
            continue
        member = committee.by_key_id(signed.key_id)
        verified = member is not None and member.key.verify(signed.signature, signed.body)
        if statement.kind is Kind.REVOCATION:
            if verified and statement.project_id == project_id:
                revoked_on = max(revoked_on, statement.signed_at.date().isoformat())
            continue
        if statement.application != app_digest:
            continue
        if statement.kind is Kind.DECISION and verified and member is not None:
            if statement.verdict is not None:
                approvals.append(
                    Approval(
                        member.role.value,
                        statement.verdict.value,
                        statement.signed_at.date().isoformat(),
                    )
                )
        elif statement.kind is Kind.PARTICIPATION and statement.trust is not None:
            participation[statement.trust] = (
                "taking part (declared by its data guardian)"
                if statement.participation is Participation.ACCEPT
                else "declined (declared by its data guardian)"
            )
    status, detail, approved_on = _status(registry, committee, app, approvals, revoked_on, now)
    parts = tuple(
        TrustPart(
            trust=t,
            participation=participation.get(
                t,
                "taking part (by the trust's own policy for this purpose)"
                if act.released[(t, project_id)]
                else "asked to take part",
            ),
            queries=act.released[(t, project_id)],
            epsilon_spent=act.units[(t, project_id)] / 1_000_000,
            epsilon_budget=app.epsilon_per_trust,
        )
        for t in app.trusts
    )
    return ProjectEntry(
        project_id=project_id,
        title=app.title,
        lay_summary=app.lay_summary,
        purpose=app.purpose.value,
        purpose_label=PURPOSES.get(app.purpose.value, app.purpose.value),
        organisation=app.organisation,
        organisation_type=ORGANISATIONS.get(app.organisation_type.value, ""),
        status=status,
        status_detail=detail,
        submitted_on=app.submitted_at.date().isoformat(),
        approved_on=approved_on,
        expires_on=app.expires.isoformat(),
        revoked_on=revoked_on,
        approvals=tuple(approvals),
        service_user_signoff=status == "approved"
        and any(
            a.role == MemberRole.SERVICE_USER.value and a.verdict == Verdict.APPROVE.value
            for a in approvals
        ),
        data_used=app.views,
        highest_tier=app.max_tier.value,
        trusts=parts,
        queries_run=len(act.results[project_id]),
    )


def _status(
    registry: Registry,
    committee: Committee,
    app: Application,
    approvals: list[Approval],
    revoked_on: str,
    now: dt.datetime,
) -> tuple[str, str, str]:
    approved = sorted(a.signed_on for a in approvals if a.verdict == Verdict.APPROVE.value)
    last = approved[-1] if approved else ""
    try:
        check(registry.bundle(app.project_id), committee, now)
    except NotApproved as exc:
        if revoked_on:
            return (
                "revoked",
                "The committee revoked this project.",
                approved[-1:][0] if approved else "",
            )
        if app.expired(now):
            return "expired", "The project's approval has ended.", last
        if any(a.verdict == Verdict.REJECT.value for a in approvals):
            return "rejected", "The committee did not approve this project.", ""
        if approvals:
            return "not approved", str(exc), ""
        return "awaiting approval", "The committee has not decided yet.", ""
    return "approved", "Approved by the committee.", last

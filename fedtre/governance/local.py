"""A committee on this machine, for the local federation (demo, tests, benchmarks): three members
(two service users and a clinician) with their keys, a committee file, a registry, and the
applications of the local projects, each approved as the default policy asks. Everything is
made with the same functions the ``fedtre committee`` and ``fedtre project`` commands use.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from fedtre.catalog import Tier
from fedtre.governance import keys, statements
from fedtre.governance.documents import (
    Application,
    MemberRole,
    OrganisationType,
    Purpose,
    Verdict,
    timestamp,
)
from fedtre.governance.policy import (
    ApprovalPolicy,
    Committee,
    Member,
    PurposeRule,
)
from fedtre.governance.registry import Registry
from fedtre.pki import write_file

MEMBERS = (
    ("ann", MemberRole.SERVICE_USER),
    ("bob", MemberRole.CLINICIAN),
    ("cleo", MemberRole.SERVICE_USER),  # a second service user: the highly sensitive tier
)
# Local federations run many queries on small budgets: the purpose rules are relaxed here only.
RELAXED = PurposeRule(10.0, 1e6, Tier.HIGHLY_SENSITIVE, 0)


@dataclass(frozen=True)
class LocalGovernance:
    directory: Path

    @property
    def committee_path(self) -> Path:
        return self.directory / "committee.toml"

    @property
    def registry(self) -> Registry:
        return Registry(self.directory / "registry")

    def key(self, member: str) -> keys.SigningKey:
        return keys.load(self.directory / f"{member}.key")

    def guardian(self, trust: str) -> keys.SigningKey:
        """The trust's data guardian's key (made on first use)."""
        path = self.directory / f"guardian-{trust}.key"
        return keys.load(path) if path.exists() else keys.generate(path)

    def create(self) -> LocalGovernance:
        self.directory.mkdir(parents=True, exist_ok=True)
        members = {}
        for name, role in MEMBERS:
            path = self.directory / f"{name}.key"
            key = keys.load(path) if path.exists() else keys.generate(path)
            members[name] = Member(name, role, key.public)
        policy = ApprovalPolicy(
            purposes=MappingProxyType({p: RELAXED for p in Purpose}),
        )
        committee = Committee(MappingProxyType(members), policy)
        write_file(self.committee_path, committee.to_toml().encode(), private=False, overwrite=True)
        return self

    def approve(self, app: Application, signers: Iterable[str] | None = None) -> bytes:
        """Submit (or resubmit) ``app`` and sign its approval by ``signers`` (default: ann
        and bob, and cleo as a second service user when the highly sensitive tier is asked)."""
        if signers is None:
            signers = (
                ("ann", "bob", "cleo")
                if app.max_tier is Tier.HIGHLY_SENSITIVE
                else (
                    "ann",
                    "bob",
                )
            )
        data = self.registry.submit(app, replace=True)
        now = dt.datetime.now(dt.UTC)
        for name in signers:
            self.registry.add(
                app.project_id,
                statements.decision(
                    self.key(name), data, Verdict.APPROVE, "approved", now, dt.timedelta(days=90)
                ),
            )
        return data

    def revoke(self, project_id: str, by: str = "ann", reason: str = "revoked") -> Path:
        """Revoke in the registry; returns the revocation as a file a trust can import."""
        data = self.registry.application(project_id)
        signed = statements.revocation(self.key(by), data, reason, dt.datetime.now(dt.UTC))
        self.registry.add(project_id, signed)
        out = self.directory / f"revocation-{project_id}-{signed.key_id}.json"
        out.write_text(json.dumps(signed.to_json()), encoding="utf-8")
        return out


def application(
    project_id: str,
    *,
    researchers: Iterable[str],
    trusts: Iterable[str],
    views: Iterable[str],
    max_tier: str,
    epsilon_per_trust: float,
    max_epsilon_per_query: float,
    default_epsilon: float | None,
    allow_partial: bool,
    suppress_below: int,
    round_to: int,
    title: str = "",
    purpose: Purpose = Purpose.PUBLIC_BENEFIT_RESEARCH,
    lay_summary: str = "",
) -> Application:
    now = dt.datetime.now(dt.UTC)
    return Application(
        project_id=project_id,
        title=title or project_id,
        lay_summary=lay_summary or f"Local federation project {project_id}.",
        purpose=purpose,
        organisation="fedtre local federation",
        organisation_type=OrganisationType.NHS,
        researchers=tuple(researchers),
        views=tuple(views),
        max_tier=Tier(max_tier),
        trusts=tuple(trusts),
        epsilon_per_trust=epsilon_per_trust,
        max_epsilon_per_query=max_epsilon_per_query,
        default_epsilon=min(default_epsilon or 0.1, max_epsilon_per_query),
        allow_partial=allow_partial,
        suppress_below=suppress_below,
        round_to=round_to,
        expires=(now + dt.timedelta(days=365)).date(),
        submitted=timestamp(now),
    )


def caps(budgets: Mapping[str, float]) -> str:
    """A trust's ``project_caps`` table body (its own lower budgets for some projects)."""
    return "".join(f"{pid} = {eps!r}\n" for pid, eps in sorted(budgets.items()))

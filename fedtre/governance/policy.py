"""The committee, its approval policy and purpose rules: what a node pins and checks against.

``committee.toml`` (written by ``fedtre committee``; every node keeps its own copy, pinned)::

    [policy]
    min_approvals = 2                        # committee members who approved
    min_service_users = 1                    # of whom service users
    min_service_users_highly_sensitive = 2   # when the highly sensitive tier is asked for
    max_approval_days = 90                   # an approval lapses unless renewed within this

    [purposes.commercial]                    # stricter defaults, see DEFAULT_PURPOSE_RULES
    max_epsilon_per_query = 0.25

    [members.ann]
    role = "service-user"
    key = "ed25519:..."
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedtre.catalog import Tier
from fedtre.errors import ConfigError
from fedtre.governance.documents import NAME, MemberRole, Purpose
from fedtre.governance.keys import PublicKey
from fedtre.settings import check_keys, read_toml


@dataclass(frozen=True)
class Member:
    name: str
    role: MemberRole
    key: PublicKey


@dataclass(frozen=True)
class PurposeRule:
    """Limits an application of this purpose must keep to, at every node."""

    max_epsilon_per_query: float
    max_epsilon_per_trust: float
    max_tier: Tier
    min_suppress_below: int  # the smallest shown count the output rules may use


# Commercial use of mental-health data is what service users trust least: by default a
# commercial project gets a quarter of the ε per query, a fifth of the budget, never the highly
# sensitive tier, and no released count below 20.
DEFAULT_PURPOSE_RULES: Mapping[Purpose, PurposeRule] = MappingProxyType(
    {
        Purpose.PUBLIC_BENEFIT_RESEARCH: PurposeRule(1.0, 10.0, Tier.HIGHLY_SENSITIVE, 10),
        Purpose.NHS_SERVICE_EVALUATION: PurposeRule(1.0, 10.0, Tier.HIGHLY_SENSITIVE, 10),
        Purpose.COMMERCIAL: PurposeRule(0.25, 2.0, Tier.MENTAL_HEALTH, 20),
    }
)


@dataclass(frozen=True)
class ApprovalPolicy:
    min_approvals: int = 2
    min_service_users: int = 1
    min_service_users_highly_sensitive: int = 2
    max_approval_days: int = 90
    purposes: Mapping[Purpose, PurposeRule] = field(default_factory=lambda: DEFAULT_PURPOSE_RULES)

    def service_users_needed(self, tier: Tier) -> int:
        if tier is Tier.HIGHLY_SENSITIVE:
            return max(self.min_service_users, self.min_service_users_highly_sensitive)
        return self.min_service_users


@dataclass(frozen=True)
class Committee:
    members: Mapping[str, Member]  # by name
    policy: ApprovalPolicy

    def by_key_id(self, key_id: str) -> Member | None:
        return self._index.get(key_id)

    @functools.cached_property
    def _index(self) -> Mapping[str, Member]:
        return {m.key.key_id: m for m in self.members.values()}

    def to_toml(self) -> str:
        p = self.policy
        lines = [
            "# The governance committee: members' public keys and the approval policy.",
            "# Every node pins its own copy: a change reaches a node when its trust copies it.",
            "[policy]",
            f"min_approvals = {p.min_approvals}",
            f"min_service_users = {p.min_service_users}",
            f"min_service_users_highly_sensitive = {p.min_service_users_highly_sensitive}",
            f"max_approval_days = {p.max_approval_days}",
        ]
        for purpose, rule in p.purposes.items():
            if DEFAULT_PURPOSE_RULES.get(purpose) == rule:
                continue
            lines += [
                "",
                f"[purposes.{purpose.value}]",
                f"max_epsilon_per_query = {rule.max_epsilon_per_query!r}",
                f"max_epsilon_per_trust = {rule.max_epsilon_per_trust!r}",
                f'max_tier = "{rule.max_tier.value}"',
                f"min_suppress_below = {rule.min_suppress_below}",
            ]
        for m in sorted(self.members.values(), key=lambda m: m.name):
            lines += [
                "",
                f"[members.{m.name}]",
                f'role = "{m.role.value}"',
                f'key = "{m.key.text}"',
            ]
        return "\n".join(lines) + "\n"


def load_committee(path: Path) -> Committee:
    return parse_committee(read_toml(Path(path), "committee file"), str(path))


def parse_committee(data: Mapping[str, Any], source: str) -> Committee:
    check_keys(data, source, {"members"}, {"members", "policy", "purposes"})
    policy = _policy(data.get("policy", {}), data.get("purposes", {}), source)
    raw = data["members"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [members] is a table of members")
    members: dict[str, Member] = {}
    seen: set[str] = set()
    for name, spec in raw.items():
        where = f"{source}: members.{name}"
        if not NAME.match(name):
            raise ConfigError(f"{where}: names are lower-case letters, digits and '-'")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a table")
        check_keys(spec, where, {"role", "key"}, {"role", "key"})
        try:
            role = MemberRole(spec["role"])
        except ValueError:
            roles = ", ".join(r.value for r in MemberRole)
            raise ConfigError(f"{where}.role: one of {roles}") from None
        key = PublicKey.parse(spec["key"], f"{where}.key")
        if key.key_id in seen:
            raise ConfigError(f"{where}: the same key is listed for two members")
        seen.add(key.key_id)
        members[name] = Member(name, role, key)
    return Committee(MappingProxyType(members), policy)


def _policy(raw: Any, purposes_raw: Any, source: str) -> ApprovalPolicy:
    where = f"{source}: [policy]"
    if not isinstance(raw, dict) or not isinstance(purposes_raw, dict):
        raise ConfigError(f"{where}: must be a table")
    names = {
        "min_approvals",
        "min_service_users",
        "min_service_users_highly_sensitive",
        "max_approval_days",
    }
    check_keys(raw, where, set(), names)
    base = ApprovalPolicy()
    values = {k: _whole(raw.get(k, getattr(base, k)), f"{where}.{k}", 0, 10_000) for k in names}
    if values["min_approvals"] < 1:
        raise ConfigError(f"{where}.min_approvals: at least 1")
    if not 1 <= values["max_approval_days"] <= 366:
        raise ConfigError(f"{where}.max_approval_days: from 1 to 366")
    if values["min_service_users"] > values["min_approvals"]:
        raise ConfigError(f"{where}.min_service_users: cannot exceed min_approvals")
    purposes = dict(DEFAULT_PURPOSE_RULES)
    for pname, spec in purposes_raw.items():
        pwhere = f"{source}: purposes.{pname}"
        try:
            purpose = Purpose(pname)
        except ValueError:
            allowed = ", ".join(p.value for p in Purpose)
            raise ConfigError(f"{pwhere}: purposes are {allowed}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{pwhere}: must be a table")
        fields = {
            "max_epsilon_per_query",
            "max_epsilon_per_trust",
            "max_tier",
            "min_suppress_below",
        }
        check_keys(spec, pwhere, set(), fields)
        rule = purposes[purpose]
        if "max_epsilon_per_query" in spec:
            rule = replace(rule, max_epsilon_per_query=_eps(spec["max_epsilon_per_query"], pwhere))
        if "max_epsilon_per_trust" in spec:
            rule = replace(rule, max_epsilon_per_trust=_eps(spec["max_epsilon_per_trust"], pwhere))
        if "max_tier" in spec:
            try:
                rule = replace(rule, max_tier=Tier(spec["max_tier"]))
            except ValueError:
                raise ConfigError(f"{pwhere}.max_tier: a catalog tier") from None
        if "min_suppress_below" in spec:
            rule = replace(
                rule, min_suppress_below=_whole(spec["min_suppress_below"], pwhere, 0, 1_000)
            )
        purposes[purpose] = rule
    return ApprovalPolicy(purposes=MappingProxyType(purposes), **values)


def _whole(v: Any, where: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ConfigError(f"{where}: a whole number from {low} to {high}")
    return v


def _eps(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1e6:
        raise ConfigError(f"{where}: ε above 0 and at most 1e6")
    return float(v)

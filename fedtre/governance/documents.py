"""The governance documents: an application, and the signed statements made about it.

Every document is a JSON object with a ``kind``, stored and signed as its exact bytes (written
canonically: sorted keys, no spaces, UTF-8). Statements about an application (a committee
member's decision, a revocation, a trust's participation) name it by the SHA-256 of its exact
bytes, so a signature can never be moved to another application, another version of the same
one, or another project. Parsing refuses unknown or missing fields: a document either means
exactly what it says or is refused.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fedtre.catalog import Tier
from fedtre.dp import MAX_EPSILON, UNITS_PER_EPSILON
from fedtre.errors import ConfigError
from fedtre.request import PROJECT_ID

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
KEY_ID = re.compile(r"^[0-9a-f]{16}\Z")
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
MAX_TEXT = 4_000
MAX_DOCUMENT_BYTES = 64 * 1024


class DocumentError(ConfigError):
    """A governance document does not parse or does not fit its schema."""


class Kind(Enum):
    APPLICATION = "fedtre.application/1"
    DECISION = "fedtre.decision/1"
    REVOCATION = "fedtre.revocation/1"
    PARTICIPATION = "fedtre.participation/1"


class Purpose(Enum):
    """Why the data is used. Shown to the public; trusts and purpose rules act on it."""

    PUBLIC_BENEFIT_RESEARCH = "public-benefit-research"
    NHS_SERVICE_EVALUATION = "nhs-service-evaluation"
    COMMERCIAL = "commercial"


class OrganisationType(Enum):
    NHS = "nhs"
    UNIVERSITY = "university"
    CHARITY = "charity"
    GOVERNMENT = "government"
    COMPANY = "company"


class MemberRole(Enum):
    """A committee member's seat. Service users sit on the committee; policy counts them."""

    SERVICE_USER = "service-user"
    CLINICIAN = "clinician"
    INFORMATION_GOVERNANCE = "information-governance"
    RESEARCHER = "researcher"
    LAY_MEMBER = "lay-member"


class Verdict(Enum):
    APPROVE = "approve"
    REJECT = "reject"


class Participation(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"


def units(epsilon: float) -> int:
    """ε in the ledger's integer units (a whole budget may exceed one query's ε limit)."""
    return round(epsilon * UNITS_PER_EPSILON)


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def timestamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Application:
    """A project as applied for. Once approved it is the single source of truth: the
    coordinator's rules and every node's scope and budget for the project come from it."""

    project_id: str
    title: str
    lay_summary: str  # plain English, shown to the public
    purpose: Purpose
    organisation: str
    organisation_type: OrganisationType
    researchers: tuple[str, ...]  # certificate names
    views: tuple[str, ...]
    max_tier: Tier
    trusts: tuple[str, ...]  # node ids asked to take part
    epsilon_per_trust: float  # the whole budget at each trust
    max_epsilon_per_query: float
    default_epsilon: float
    allow_partial: bool
    suppress_below: int
    round_to: int
    expires: dt.date  # valid through this day (UTC)
    submitted: str  # timestamp; also makes a resubmission a new document

    @property
    def total_units(self) -> int:
        return units(self.epsilon_per_trust)

    @property
    def max_units_per_query(self) -> int:
        return units(self.max_epsilon_per_query)

    @property
    def default_units(self) -> int:
        return units(self.default_epsilon)

    @property
    def submitted_at(self) -> dt.datetime:
        return dt.datetime.strptime(self.submitted, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)

    def expired(self, now: dt.datetime) -> bool:
        return now.astimezone(dt.UTC).date() > self.expires

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": Kind.APPLICATION.value,
            "project_id": self.project_id,
            "title": self.title,
            "lay_summary": self.lay_summary,
            "purpose": self.purpose.value,
            "organisation": self.organisation,
            "organisation_type": self.organisation_type.value,
            "researchers": list(self.researchers),
            "views": list(self.views),
            "max_tier": self.max_tier.value,
            "trusts": list(self.trusts),
            "epsilon_per_trust": self.epsilon_per_trust,
            "max_epsilon_per_query": self.max_epsilon_per_query,
            "default_epsilon": self.default_epsilon,
            "allow_partial": self.allow_partial,
            "suppress_below": self.suppress_below,
            "round_to": self.round_to,
            "expires": self.expires.isoformat(),
            "submitted": self.submitted,
        }

    def to_bytes(self) -> bytes:
        return canonical(self.to_json())

    @staticmethod
    def from_bytes(data: bytes) -> Application:
        d = _object(data, Kind.APPLICATION, set(APPLICATION_FIELDS))
        app = Application(
            project_id=_match(d, "project_id", PROJECT_ID),
            title=_text(d, "title", 200, line=True),
            lay_summary=_text(d, "lay_summary", MAX_TEXT),
            purpose=_enum(d, "purpose", Purpose),
            organisation=_text(d, "organisation", 200, line=True),
            organisation_type=_enum(d, "organisation_type", OrganisationType),
            researchers=_names(d, "researchers"),
            views=_names(d, "views", re.compile(r"^[a-z][a-z0-9_]{0,62}\Z")),
            max_tier=_enum(d, "max_tier", Tier),
            trusts=_names(d, "trusts"),
            epsilon_per_trust=_epsilon(d, "epsilon_per_trust", 1e6),
            max_epsilon_per_query=_epsilon(d, "max_epsilon_per_query", MAX_EPSILON),
            default_epsilon=_epsilon(d, "default_epsilon", MAX_EPSILON),
            allow_partial=_bool(d, "allow_partial"),
            suppress_below=_whole(d, "suppress_below", 0, 1_000),
            round_to=_whole(d, "round_to", 1, 1_000),
            expires=_date(d, "expires"),
            submitted=_time_text(d, "submitted"),
        )
        if app.max_epsilon_per_query > app.epsilon_per_trust:
            raise DocumentError("application: max_epsilon_per_query is above epsilon_per_trust")
        if app.default_epsilon > app.max_epsilon_per_query:
            raise DocumentError("application: default_epsilon is above max_epsilon_per_query")
        return app


APPLICATION_FIELDS = [
    "kind",
    "project_id",
    "title",
    "lay_summary",
    "purpose",
    "organisation",
    "organisation_type",
    "researchers",
    "views",
    "max_tier",
    "trusts",
    "epsilon_per_trust",
    "max_epsilon_per_query",
    "default_epsilon",
    "allow_partial",
    "suppress_below",
    "round_to",
    "expires",
    "submitted",
]


@dataclass(frozen=True)
class Statement:
    """A signed statement about one application: a decision, a revocation or a participation."""

    kind: Kind
    project_id: str
    application: str  # SHA-256 (hex) of the application's exact bytes
    signed_at: dt.datetime
    reason: str
    verdict: Verdict | None = None  # decisions
    valid_until: dt.datetime | None = None  # decisions: approvals are short-lived, renewed
    trust: str | None = None  # participation: the trust it speaks for
    participation: Participation | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value,
            "project_id": self.project_id,
            "application": self.application,
            "signed_at": timestamp(self.signed_at),
            "reason": self.reason,
        }
        if self.kind is Kind.DECISION:
            assert self.verdict is not None and self.valid_until is not None
            out["verdict"] = self.verdict.value
            out["valid_until"] = timestamp(self.valid_until)
        if self.kind is Kind.PARTICIPATION:
            assert self.participation is not None and self.trust is not None
            out["trust"] = self.trust
            out["participation"] = self.participation.value
        return out

    def to_bytes(self) -> bytes:
        return canonical(self.to_json())

    @staticmethod
    def from_bytes(data: bytes) -> Statement:
        d = _json(data)
        try:
            kind = Kind(d.get("kind"))
        except ValueError:
            raise DocumentError("statement: unknown kind") from None
        common = {"kind", "project_id", "application", "signed_at", "reason"}
        extra = {
            Kind.DECISION: {"verdict", "valid_until"},
            Kind.REVOCATION: set(),
            Kind.PARTICIPATION: {"trust", "participation"},
        }.get(kind)
        if extra is None:
            raise DocumentError("statement: an application is not a signed statement")
        d = _object(data, kind, common | extra)
        return Statement(
            kind=kind,
            project_id=_match(d, "project_id", PROJECT_ID),
            application=_match(d, "application", SHA256),
            signed_at=_time(d, "signed_at"),
            reason=_text(d, "reason", MAX_TEXT, empty=True),
            verdict=_enum(d, "verdict", Verdict) if kind is Kind.DECISION else None,
            valid_until=_time(d, "valid_until") if kind is Kind.DECISION else None,
            trust=_match(d, "trust", NAME) if kind is Kind.PARTICIPATION else None,
            participation=(
                _enum(d, "participation", Participation) if kind is Kind.PARTICIPATION else None
            ),
        )


@dataclass(frozen=True)
class Signed:
    """A statement's exact bytes, the key id that signed them, and the Ed25519 signature."""

    body: bytes
    key_id: str
    signature: bytes

    def statement(self) -> Statement:
        return Statement.from_bytes(self.body)

    def to_json(self) -> dict[str, str]:
        return {
            "body": base64.b64encode(self.body).decode("ascii"),
            "key": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @staticmethod
    def from_json(d: Any) -> Signed:
        if not isinstance(d, dict) or set(d) != {"body", "key", "signature"}:
            raise DocumentError("a signed statement has exactly: body, key, signature")
        key = d["key"]
        if not isinstance(key, str) or not KEY_ID.match(key):
            raise DocumentError("a signed statement's key is a 16-digit key id")
        try:
            body = base64.b64decode(d["body"], validate=True)
            signature = base64.b64decode(d["signature"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise DocumentError("a signed statement's body and signature are base64") from None
        if len(body) > MAX_DOCUMENT_BYTES or len(signature) != 64:
            raise DocumentError("a signed statement's body or signature has the wrong size")
        return Signed(body, key, signature)


# -- strict field readers --------------------------------------------------------------------


def _json(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError("document too large")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DocumentError("not a JSON document") from None
    if not isinstance(d, dict):
        raise DocumentError("a document is a JSON object")
    return d


def _object(data: bytes, kind: Kind, fields: set[str]) -> dict[str, Any]:
    d = _json(data)
    if d.get("kind") != kind.value:
        raise DocumentError(f"expected a document of kind {kind.value}")
    missing, unknown = sorted(fields - set(d)), sorted(set(d) - fields)
    if missing:
        raise DocumentError(f"{kind.value}: missing {', '.join(missing)}")
    if unknown:
        named = [u for u in unknown if re.fullmatch(r"[a-z_]{1,40}", u)]
        shown = ", ".join(named[:5]) if len(named) == len(unknown) else "(not shown)"
        raise DocumentError(f"{kind.value}: unknown field(s) {shown}")
    return d


def _text(
    d: Mapping[str, Any], key: str, limit: int, *, empty: bool = False, line: bool = False
) -> str:
    v = d[key]
    if not isinstance(v, str) or len(v) > limit or (not empty and not v.strip()):
        raise DocumentError(f"{key}: text of 1 to {limit} characters")
    allowed = "" if line else "\n"
    if any(not c.isprintable() and c not in allowed for c in v):
        raise DocumentError(f"{key}: control or invisible characters are not allowed")
    return v


def _match(d: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    v = d[key]
    if not isinstance(v, str) or not pattern.match(v):
        raise DocumentError(f"{key}: not a valid value")
    return v


def _names(d: Mapping[str, Any], key: str, pattern: re.Pattern[str] = NAME) -> tuple[str, ...]:
    v = d[key]
    if (
        not isinstance(v, list)
        or not v
        or len(v) > 500
        or not all(isinstance(x, str) and pattern.match(x) for x in v)
        or len(set(v)) != len(v)
    ):
        raise DocumentError(f"{key}: a non-empty list of distinct names")
    return tuple(v)


def _enum(d: Mapping[str, Any], key: str, enum: type[Any]) -> Any:
    try:
        return enum(d[key])
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise DocumentError(f"{key}: one of {allowed}") from None


def _epsilon(d: Mapping[str, Any], key: str, maximum: float) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= maximum:
        raise DocumentError(f"{key}: a number above 0 and at most {maximum:g}")
    if units(float(v)) <= 0:
        raise DocumentError(f"{key}: too small")
    return float(v)


def _whole(d: Mapping[str, Any], key: str, low: int, high: int) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise DocumentError(f"{key}: a whole number from {low} to {high}")
    return v


def _bool(d: Mapping[str, Any], key: str) -> bool:
    v = d[key]
    if not isinstance(v, bool):
        raise DocumentError(f"{key}: true or false")
    return v


def _date(d: Mapping[str, Any], key: str) -> dt.date:
    v = d[key]
    try:
        return dt.date.fromisoformat(v) if isinstance(v, str) and len(v) == 10 else _bad(key)
    except ValueError:
        raise DocumentError(f"{key}: a date, YYYY-MM-DD") from None


def _time_text(d: Mapping[str, Any], key: str) -> str:
    _time(d, key)
    return str(d[key])


def _time(d: Mapping[str, Any], key: str) -> dt.datetime:
    v = d[key]
    if not isinstance(v, str) or not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z", v):
        raise DocumentError(f"{key}: a UTC time, YYYY-MM-DDTHH:MM:SSZ")
    try:
        return dt.datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise DocumentError(f"{key}: a UTC time, YYYY-MM-DDTHH:MM:SSZ") from None


def _bad(key: str) -> Any:
    raise DocumentError(f"{key}: a date, YYYY-MM-DD")

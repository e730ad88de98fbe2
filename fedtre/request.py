"""A query request as node and coordinator both see it, validated field by field."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedtre.errors import QueryRefused, Refusal

QUERY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
PROJECT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")


@dataclass(frozen=True)
class SignedQuery:
    """A researcher's signature over their query (``fedtre.governance.query_signature``)."""

    statement: bytes  # the exact bytes signed
    signature: bytes  # ECDSA (DER) by the researcher's certificate key
    certificate: bytes  # the researcher's certificate (PEM)


@dataclass(frozen=True)
class QueryRequest:
    query_id: str
    project_id: str
    sql: str
    epsilon: float
    caller: str
    approval: bytes = b""  # the project's approval bundle, as sent: checked by the node
    signed: SignedQuery | None = None  # the researcher's signature, as sent: checked by the node
    researcher: str = ""  # who the coordinator says asked: must be who signed

    def check_fields(self) -> None:
        """Refuse malformed identifiers before anything else looks at the request."""
        check_ids(self.query_id, self.project_id)
        if not isinstance(self.sql, str):
            raise QueryRefused(Refusal.INVALID_REQUEST, "The query text is missing.")


@dataclass(frozen=True)
class Submission:
    """A researcher's query as the coordinator receives it."""

    query_id: str  # empty: the coordinator picks one
    project_id: str
    sql: str
    epsilon: float | None  # None: the project's default; anything given is checked, 0 refused
    signed: SignedQuery | None = None  # made by the researcher's client; forwarded to trusts


def check_ids(query_id: object, project_id: object) -> None:
    """Refuse a malformed query id or project id (node and coordinator alike)."""
    if not isinstance(query_id, str) or not QUERY_ID.match(query_id):
        raise QueryRefused(
            Refusal.INVALID_REQUEST,
            "The query id must be 1-128 letters, digits, '.', '_', ':' or '-'.",
        )
    if not isinstance(project_id, str) or not PROJECT_ID.match(project_id):
        raise QueryRefused(
            Refusal.INVALID_REQUEST,
            "The project id must be 1-64 lower-case letters, digits, '_' or '-'.",
        )

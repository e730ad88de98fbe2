"""Making signed statements: a member's decision, a revocation, a trust's participation."""

from __future__ import annotations

import datetime as dt

from fedtre.governance.documents import (
    Application,
    Kind,
    Participation,
    Signed,
    Statement,
    Verdict,
    digest,
)
from fedtre.governance.keys import SigningKey


def sign(key: SigningKey, statement: Statement) -> Signed:
    body = statement.to_bytes()
    return Signed(body, key.public.key_id, key.sign(body))


def decision(
    key: SigningKey,
    application: bytes,
    verdict: Verdict,
    reason: str,
    now: dt.datetime,
    valid_for: dt.timedelta,
) -> Signed:
    app = Application.from_bytes(application)
    return sign(
        key,
        Statement(
            Kind.DECISION,
            app.project_id,
            digest(application),
            now,
            reason,
            verdict=verdict,
            valid_until=now + valid_for,
        ),
    )


def revocation(key: SigningKey, application: bytes, reason: str, now: dt.datetime) -> Signed:
    app = Application.from_bytes(application)
    return sign(key, Statement(Kind.REVOCATION, app.project_id, digest(application), now, reason))


def participation(
    key: SigningKey,
    application: bytes,
    trust: str,
    choice: Participation,
    reason: str,
    now: dt.datetime,
) -> Signed:
    app = Application.from_bytes(application)
    return sign(
        key,
        Statement(
            Kind.PARTICIPATION,
            app.project_id,
            digest(application),
            now,
            reason,
            trust=trust,
            participation=choice,
        ),
    )

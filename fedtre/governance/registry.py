"""The project registry: a directory of applications and the signed statements about them.

Kept by the committee's secretariat and read by the coordinator (``[governance] registry``)::

    <registry>/<project_id>/application.json            the application's exact bytes
    <registry>/<project_id>/statements/<n>-<kind>.json   one signed statement each
    <registry>/<project_id>/superseded/<digest>/...      earlier versions, kept for the record
    <registry>/audit.sqlite                              every submission and statement, logged
                                                         (hash-chained) before it is stored

Nothing here is trusted because it is in the directory: every reader verifies signatures
against its own pinned keys (``fedtre.governance.verify``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog
from fedtre.errors import ConfigError
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import (
    Application,
    DocumentError,
    Kind,
    Signed,
    digest,
    timestamp,
)
from fedtre.pki import write_file
from fedtre.request import PROJECT_ID

APPLICATION = "application.json"
STATEMENTS = "statements"
SUPERSEDED = "superseded"
AUDIT = "audit.sqlite"  # the registry's audit log


class RegistryError(ConfigError):
    """The registry does not hold what was asked for, or holds something malformed."""


@dataclass(frozen=True)
class Registry:
    root: Path

    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if PROJECT_ID.match(p.name) and (p / APPLICATION).is_file()
        )

    def submit(self, application: Application, *, replace: bool = False) -> bytes:
        """Store a new application; ``replace`` keeps the earlier version under superseded/."""
        directory = self._dir(application.project_id)
        data = application.to_bytes()
        current = directory / APPLICATION
        if current.exists() and not replace:
            raise RegistryError(
                f"project {application.project_id} has an application already "
                "(--replace submits a new version; earlier signatures do not carry over)"
            )
        self._audit(
            Event.PROJECT_SUBMITTED,
            project=application.project_id,
            application=digest(data),
            purpose=application.purpose.value,
            replaces=digest(current.read_bytes()) if current.exists() else None,
        )
        if current.exists():
            if not replace:
                raise RegistryError(
                    f"project {application.project_id} has an application already "
                    "(--replace submits a new version; earlier signatures do not carry over)"
                )
            old = current.read_bytes()
            archive = directory / SUPERSEDED / digest(old)[:16]
            archive.mkdir(parents=True, exist_ok=True)
            os.replace(current, archive / APPLICATION)
            statements = directory / STATEMENTS
            if statements.is_dir():
                os.replace(statements, archive / STATEMENTS)
        directory.mkdir(parents=True, exist_ok=True)
        write_file(current, data, private=False, overwrite=False)
        return data

    def application(self, project_id: str) -> bytes:
        path = self._dir(project_id) / APPLICATION
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"no application for project {project_id} in {self.root}") from None

    def add(self, project_id: str, signed: Signed) -> Path:
        directory = self._dir(project_id) / STATEMENTS
        statement = signed.statement()
        event, extra = {
            Kind.DECISION: (
                Event.PROJECT_REVIEWED,
                {"verdict": statement.verdict.value if statement.verdict else None},
            ),
            Kind.REVOCATION: (Event.PROJECT_REVOKED, {}),
            Kind.PARTICIPATION: (
                Event.PROJECT_PARTICIPATION,
                {
                    "trust": statement.trust,
                    "participation": (
                        statement.participation.value if statement.participation else None
                    ),
                },
            ),
        }.get(statement.kind, (Event.PROJECT_REVIEWED, {}))
        self._audit(
            event,
            project=project_id,
            application=statement.application,
            signer_key=signed.key_id,
            signed_at=timestamp(statement.signed_at),
            **extra,
        )
        directory.mkdir(parents=True, exist_ok=True)
        kind = statement.kind.value.split(".")[1].split("/")[0]
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        path = directory / f"{stamp}-{kind}-{signed.key_id}.json"
        write_file(path, json.dumps(signed.to_json()).encode(), private=False, overwrite=False)
        return path

    def statements(self, project_id: str) -> list[Signed]:
        directory = self._dir(project_id) / STATEMENTS
        if not directory.is_dir():
            return []
        out = []
        for path in sorted(directory.glob("*.json")):
            try:
                out.append(Signed.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, DocumentError) as exc:
                raise RegistryError(f"{path}: not a signed statement ({exc})") from None
        return out

    def bundle(self, project_id: str) -> Bundle:
        """The application with what counts about it: each signer's latest decision and each
        trust's latest participation on this version, and every revocation of the project
        (a revocation revokes every version submitted before it). Superseded statements are
        left out, so renewals never make the bundle grow."""
        app = self.application(project_id)
        app_digest = digest(app)
        latest: dict[tuple[str, str, str], tuple[dt.datetime, Signed]] = {}
        revocations = []
        for signed in self.statements(project_id):
            try:
                statement = signed.statement()
            except DocumentError:
                continue
            if statement.project_id != project_id:
                continue
            if statement.kind is Kind.REVOCATION:
                revocations.append(signed)
                continue
            if statement.application != app_digest:
                continue
            key = (statement.kind.value, signed.key_id, statement.trust or "")
            if key not in latest or statement.signed_at >= latest[key][0]:
                latest[key] = (statement.signed_at, signed)
        kept = [signed for _, signed in sorted(latest.values(), key=lambda v: v[0])]
        return Bundle(app, tuple(revocations[-8:] + kept))

    def _audit(self, event: Event, **fields: object) -> None:
        """The registry's own tamper-evident log (``audit.sqlite`` in it), written before the
        registry changes."""
        self.root.mkdir(parents=True, exist_ok=True)  # as before: readable by the coordinator
        log = AuditLog(self.root / AUDIT, self.root.name or "registry", role="registry")
        try:
            log.write(event, **fields)
        finally:
            log.close()

    def _dir(self, project_id: str) -> Path:
        if not isinstance(project_id, str) or not PROJECT_ID.match(project_id):
            raise RegistryError("project ids are lower-case letters, digits, '_' and '-'")
        return self.root / project_id

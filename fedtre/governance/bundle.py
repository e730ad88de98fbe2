"""A project's approval as it travels: the application's exact bytes and every signed statement
about it (decisions, revocations, trusts' participation), in one JSON document.

The coordinator sends the bundle with every request to a node; the node trusts none of it until
``fedtre.governance.verify.check`` has verified it against keys the node pinned itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from fedtre.governance.documents import (
    Application,
    DocumentError,
    Signed,
    canonical,
    digest,
)

BUNDLE_KIND = "fedtre.approval-bundle/1"
MAX_BUNDLE_BYTES = 48 * 1024  # fits a request's 64 KiB with the query beside it
MAX_STATEMENTS = 64


@dataclass(frozen=True)
class Bundle:
    application: bytes
    statements: tuple[Signed, ...] = ()

    @property
    def digest(self) -> str:
        """The application's digest: what every statement in the bundle must name."""
        return digest(self.application)

    def parsed(self) -> Application:
        return Application.from_bytes(self.application)

    def with_statement(self, signed: Signed) -> Bundle:
        if signed in self.statements:
            return self
        return Bundle(self.application, (*self.statements, signed))

    def to_bytes(self) -> bytes:
        return canonical(
            {
                "kind": BUNDLE_KIND,
                "application": base64.b64encode(self.application).decode("ascii"),
                "statements": [s.to_json() for s in self.statements],
            }
        )

    @staticmethod
    def from_bytes(data: bytes) -> Bundle:
        if len(data) > MAX_BUNDLE_BYTES:
            raise DocumentError("the approval is larger than 48 KiB")
        try:
            d: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise DocumentError("the approval is not a JSON document") from None
        if not isinstance(d, dict) or set(d) != {"kind", "application", "statements"}:
            raise DocumentError("an approval has exactly: kind, application, statements")
        if d["kind"] != BUNDLE_KIND:
            raise DocumentError(f"expected a document of kind {BUNDLE_KIND}")
        statements = d["statements"]
        if not isinstance(statements, list) or len(statements) > MAX_STATEMENTS:
            raise DocumentError(
                f"an approval carries a list of at most {MAX_STATEMENTS} statements"
            )
        try:
            application = base64.b64decode(d["application"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise DocumentError("the approval's application is not base64") from None
        return Bundle(application, tuple(Signed.from_json(s) for s in statements))

"""Queries signed by the researcher, so that no coordinator can invent one.

The researcher's client signs the exact statement of the query (project, query id, SQL, ε; or
"the project's default ε") with the private key of their federation certificate (ECDSA P-256,
the key they already hold), and sends the statement, the signature and the certificate. The
coordinator forwards all three unchanged; every node checks, itself:

- the certificate is a researcher's, signed by the federation CA, valid now;
- the signature is that certificate's key over the statement's exact bytes;
- the statement says what the request asks (project, query id, SQL, ε units);
- the researcher is named in the project's approved application.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import load_pem_x509_certificate

from fedtre.dp import epsilon_to_units
from fedtre.errors import QueryRefused
from fedtre.governance.documents import Application, canonical
from fedtre.governance.verify import NotApproved
from fedtre.pki import PkiError, Role, verify_certificate
from fedtre.request import SignedQuery

QUERY_KIND = "fedtre.query/1"
MAX_STATEMENT_BYTES = 16 * 1024
MAX_CERTIFICATE_BYTES = 8 * 1024


def statement(project_id: str, query_id: str, sql: str, epsilon: float | None) -> bytes:
    return canonical(
        {
            "kind": QUERY_KIND,
            "project_id": project_id,
            "query_id": query_id,
            "sql": sql,
            "epsilon": epsilon,  # None: the project's default
        }
    )


def sign(
    key_path: Path, cert_path: Path, project_id: str, query_id: str, sql: str, eps: float | None
) -> SignedQuery:
    key = _private_key(Path(key_path).read_bytes())
    body = statement(project_id, query_id, sql, eps)
    signature = key.sign(body, ec.ECDSA(hashes.SHA256()))
    return SignedQuery(body, signature, Path(cert_path).read_bytes())


@functools.lru_cache(maxsize=64)
def _private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the researcher's key is not an EC key")
    return key


def verify(
    signed: SignedQuery | None,
    *,
    ca_pem: bytes,
    application: Application,
    project_id: str,
    query_id: str,
    sql: str,
    epsilon_units: int,
    now: dt.datetime,
    revoked: Callable[[bytes], str] | None = None,
) -> str:
    """The researcher's name, once every check holds; ``NotApproved`` saying which did not."""
    if signed is None or not signed.statement or not signed.signature or not signed.certificate:
        raise NotApproved(
            "the query is not signed by its researcher (signed queries are required for "
            "projects under signed approval)"
        )
    if (
        len(signed.statement) > MAX_STATEMENT_BYTES
        or len(signed.certificate) > MAX_CERTIFICATE_BYTES
    ):
        raise NotApproved("the query's signature block is too large")
    try:
        role, name = verify_certificate(signed.certificate, ca_pem, now)
    except (PkiError, ValueError) as exc:
        raise NotApproved(f"the researcher's certificate does not hold: {exc}") from None
    if role is not Role.RESEARCHER:
        raise NotApproved("the query is signed with a certificate that is not a researcher's")
    why = revoked(signed.certificate) if revoked is not None else ""
    if why:
        raise NotApproved(f"the researcher's certificate does not hold: {why}")
    if not _signature_ok(signed.certificate, signed.signature, signed.statement):
        raise NotApproved("the query does not match its researcher's signature")
    said = _parse(signed.statement)
    if (
        said.get("project_id") != project_id
        or said.get("query_id") != query_id
        or said.get("sql") != sql
    ):
        raise NotApproved("the request differs from the query its researcher signed")
    eps = said.get("epsilon")
    try:
        units = application.default_units if eps is None else _units(eps)
    except (QueryRefused, TypeError, ValueError):
        raise NotApproved("the signed query's ε is not a valid number") from None
    if units != epsilon_units:
        raise NotApproved("the request's ε differs from the ε its researcher signed")
    if name not in application.researchers:
        raise NotApproved("the researcher who signed the query is not named in the approval")
    return name


def _units(eps: Any) -> int:
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError
    return epsilon_to_units(float(eps))


def _parse(body: bytes) -> dict[str, Any]:
    try:
        d = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise NotApproved("the signed query is not a JSON document") from None
    if not isinstance(d, dict) or d.get("kind") != QUERY_KIND:
        raise NotApproved("the signed statement is not a query")
    if set(d) != {"kind", "project_id", "query_id", "sql", "epsilon"}:
        raise NotApproved("the signed query has missing or unknown fields")
    return d


@functools.lru_cache(maxsize=1024)
def _signature_ok(cert_pem: bytes, signature: bytes, body: bytes) -> bool:
    public = load_pem_x509_certificate(cert_pem).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        public.verify(signature, body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True

"""Certificates without moving keys, and certificate revocation.

* ``request``: at the trust (or the researcher's desk), make the private key and a certificate
  signing request (CSR). The key never leaves: written 0600, next to the CSR, which is public.
* ``sign_request``: the CA operator turns a CSR into a certificate. Only the CSR's public key
  and its name and role are taken from it (and checked: a valid CSR signature, a federation name,
  one name one role); everything else (usages, role name, validity) is set by the CA, as in
  ``fedtre.pki.issue``.
* ``revoke`` and ``write_crl``: the CA operator revokes a certificate and publishes a signed
  certificate revocation list (CRL, PEM). Every node and the coordinator check peers and
  researchers' query signatures against it (``RevocationList``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtre.pki import (
    _CLOCK_SKEW,
    ORGANIZATION,
    PkiError,
    Role,
    _key_pem,
    _load_ca,
    _parse_pem,
    _signed_by,
    _subject_alt_names,
    _utc,
    build_certificate,
    check_name,
    write_file,
)

REVOKED = "revoked.json"  # in the CA directory: serials the operator revoked, with reasons
CRL_DAYS = 30


def request(
    directory: Path, role: Role, name: str, hosts: Sequence[str] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path]:
    """Make ``{role}-{name}.key`` (0600) and ``{role}-{name}.csr`` in ``directory``."""
    check_name(name)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = directory / f"{role.value}-{name}.key"
    csr_path = directory / f"{role.value}-{name}.csr"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(_subject_alt_names(name, hosts, role)), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    write_file(key_path, _key_pem(key), private=True, overwrite=False)
    write_file(
        csr_path, csr.public_bytes(serialization.Encoding.PEM), private=False, overwrite=False
    )
    return key_path, csr_path


def sign_request(
    ca_dir: Path, csr_path: Path, *, valid_days: int = 825, out: Path | None = None
) -> Path:
    """The certificate for a CSR, written to ``out`` (default: ``{role}-{name}.pem`` beside
    the CSR) and kept in the CA directory's record (``issued/<serial>.pem``); give it back to
    the requester."""
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{csr_path} is not a PEM certificate signing request") from exc
    try:
        valid = csr.is_signature_valid
    except ValueError:  # a key that does not parse
        valid = False
    if not valid:
        raise PkiError(f"{csr_path}: its signature does not match its key")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise PkiError(f"{csr_path}: federation keys are ECDSA P-256")
    ous = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(ous) != 1 or len(cns) != 1:
        raise PkiError(f"{csr_path}: the request must name one role (OU) and one holder (CN)")
    try:
        role = Role(ous[0].value)
    except ValueError:
        raise PkiError(f"{csr_path}: the role is not a federation role") from None
    name = check_name(str(cns[0].value))
    hosts: list[str] = []
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        hosts += [
            h
            for h in sans.get_values_for_type(x509.DNSName)
            if h != name and not h.endswith(".role.fedtre")
        ]
    except x509.ExtensionNotFound:
        pass
    for other in Role:
        taken = (ca_dir / f"{other.value}-{name}.pem").exists() or any(
            (ca_dir / "issued").glob(f"*-{other.value}-{name}.pem")
        )
        if other is not role and taken:
            raise PkiError(f"'{name}' is already a {other.value} of this federation")
    cert_path = out or Path(csr_path).with_name(f"{role.value}-{name}.pem")
    ca_cert, ca_key = _load_ca(ca_dir)
    if valid_days < 1:
        raise PkiError("a certificate must be valid for at least one day")
    now = dt.datetime.now(dt.UTC)
    end = now + dt.timedelta(days=valid_days)
    if end > ca_cert.not_valid_after_utc:
        raise PkiError(f"the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}")
    cert = build_certificate(
        ca_cert,
        ca_key,
        role,
        name,
        public,
        _subject_alt_names(name, hosts, role),
        now - _CLOCK_SKEW,
        end,
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    record = ca_dir / "issued"
    record.mkdir(mode=0o700, exist_ok=True)
    write_file(
        record / f"{cert.serial_number:x}-{role.value}-{name}.pem", pem, private=False,
        overwrite=False,
    )  # fmt: skip
    write_file(cert_path, pem, private=False, overwrite=True)
    return cert_path


def revoke(ca_dir: Path, cert_path: Path, reason: str) -> int:
    """Record a certificate as revoked (by serial); returns the serial. Publish with
    ``write_crl``."""
    ca_cert, _ = _load_ca(ca_dir)
    cert = _parse_pem(Path(cert_path).read_bytes(), str(cert_path))
    if cert.issuer != ca_cert.subject or not _signed_by(cert, ca_cert):
        raise PkiError(f"{cert_path} was not issued by this CA")
    entries = _revoked(ca_dir)
    entries[str(cert.serial_number)] = {
        "revoked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "subject": cert.subject.rfc4514_string(),
        "reason": reason[:200],
    }
    write_file(
        ca_dir / REVOKED, json.dumps(entries, indent=2).encode(), private=True, overwrite=True
    )
    return cert.serial_number


def write_crl(ca_dir: Path, out: Path, *, days: int = CRL_DAYS) -> int:
    """Sign and write the CRL (PEM); returns how many certificates it lists. Every node and
    the coordinator need a fresh one before ``days`` pass: an expired list refuses everyone."""
    ca_cert, ca_key = _load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
    )
    entries = _revoked(ca_dir)
    for serial, info in entries.items():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial))
            .revocation_date(dt.datetime.fromisoformat(info["revoked_at"]))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    write_file(out, crl.public_bytes(serialization.Encoding.PEM), private=False, overwrite=True)
    return len(entries)


def _revoked(ca_dir: Path) -> dict[str, dict[str, str]]:
    path = ca_dir / REVOKED
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PkiError(f"{path} is not a revocation record")
    return data


class RevocationList:
    """The CRL a node or the coordinator checks certificates against: read again when the
    file changes; its signature must be the CA's; once past its next update it refuses every
    certificate (fail closed) until the operator publishes a new one."""

    def __init__(self, path: Path, ca_path: Path) -> None:
        self.path = Path(path)
        self._ca = _parse_pem(Path(ca_path).read_bytes(), str(ca_path))
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._next_update: dt.datetime | None = None
        self._load()  # a bad list stops start-up

    def problem(self, cert_pem: bytes, now: dt.datetime | None = None) -> str:
        """ "" if the certificate may be used; otherwise why not, in plain words."""
        self._maybe_reload()
        now = _utc(now or dt.datetime.now(dt.UTC))
        with self._lock:
            serials, next_update = self._serials, self._next_update
        if next_update is not None and now > next_update:
            return (
                f"the certificate revocation list expired on {next_update:%Y-%m-%d}; the CA "
                "operator must publish a new one (fedtre pki crl)"
            )
        try:
            serial = _parse_pem(cert_pem).serial_number
        except PkiError:
            return "the certificate cannot be read"
        return "the certificate has been revoked" if serial in serials else ""

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            with self._lock:
                self._serials, self._next_update = (
                    frozenset(),
                    dt.datetime.min.replace(tzinfo=dt.UTC),
                )  # gone: fail closed (reported as expired)
            return
        if (st.st_mtime_ns, st.st_ino, st.st_size) != self._stamp:
            try:
                self._load()
            except PkiError:
                with self._lock:
                    self._next_update = dt.datetime.min.replace(tzinfo=dt.UTC)

    def _load(self) -> None:
        st = os.stat(self.path)
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"{self.path} is not a PEM certificate revocation list") from exc
        public = self._ca.public_key()
        if (
            crl.issuer != self._ca.subject
            or not isinstance(public, ec.EllipticCurvePublicKey)
            or not crl.is_signature_valid(public)
        ):
            raise PkiError(f"{self.path} is not signed by the federation CA")
        with self._lock:
            self._serials = frozenset(r.serial_number for r in crl)
            self._next_update = crl.next_update_utc
            self._stamp = (st.st_mtime_ns, st.st_ino, st.st_size)

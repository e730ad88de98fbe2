"""The federation's small PKI: one CA, and one certificate per coordinator, node and researcher.

Everything is ECDSA P-256. The CA signs leaf certificates whose subject says who the holder is:
``CN`` is the holder's name and ``OU`` its role. That pair is the only identity the gRPC services
trust (``fedtre/tls.py``); nothing a caller sends in metadata or in a request counts.

Files live in one directory, which is what ``fedtre pki`` manages::

    ca.pem, ca.key                       the federation CA (keep ca.key offline in production)
    {role}-{name}.pem, {role}-{name}.key  e.g. node-trust-a.pem, coordinator-hub.key

Private keys are written unencrypted (gRPC needs them so) with mode 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtre.errors import ConfigError

ORGANIZATION = "fedtre federation"
CA_CERT, CA_KEY = "ca.pem", "ca.key"

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")

# Certificates issued now start a little in the past, so that a peer whose clock is slightly
# behind does not refuse a certificate that is seconds old.
_CLOCK_SKEW = dt.timedelta(minutes=5)


ROLE_DOMAIN = "role.fedtre"  # reserved: <name>.<role>.role.fedtre names a certificate's role


class PkiError(ConfigError):
    """A PKI file is missing, invalid or would be overwritten; or a name or host is not valid."""


class Role(Enum):
    COORDINATOR = "coordinator"
    NODE = "node"
    RESEARCHER = "researcher"


@dataclass(frozen=True)
class Issued:
    role: Role
    name: str
    cert_path: Path
    key_path: Path
    not_after: dt.datetime


def init_ca(
    directory: Path, common_name: str = "fedtre federation CA", valid_days: int = 3650
) -> Path:
    """Create the federation CA in ``directory``; refuse if one is there already."""
    if valid_days < 1:
        raise PkiError("the CA must be valid for at least one day")
    if not common_name.strip():
        raise PkiError("the CA needs a common name")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if path.exists():
            raise PkiError(f"{path} already exists; refusing to replace the federation CA")
    _ensure_dir(directory)

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_file(key_path, _key_pem(key), private=True, overwrite=False)
    write_file(
        cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=False
    )
    return cert_path


def issue(
    directory: Path,
    role: Role,
    name: str,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    valid_days: int = 825,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    overwrite: bool = False,
) -> Issued:
    """Issue a certificate and key for ``name`` in ``role``, signed by the CA in ``directory``.

    ``not_before``/``not_after`` override the validity window (tests use them to make an
    expired certificate); otherwise it starts now (less a few minutes) and lasts ``valid_days``.
    """
    if not isinstance(role, Role):
        raise PkiError(f"unknown role {role!r}; expected one of {', '.join(r.value for r in Role)}")
    check_name(name)
    sans = _subject_alt_names(name, hosts, role)
    cert_path = directory / f"{role.value}-{name}.pem"
    key_path = directory / f"{role.value}-{name}.key"
    for other in Role:
        if other is not role and (directory / f"{other.value}-{name}.pem").exists():
            raise PkiError(
                f"'{name}' is already a {other.value} of this federation: one name, one role "
                "(a certificate of another role under the same name could pose as it)"
            )
    if not overwrite:
        for path in (cert_path, key_path):
            if path.exists():
                raise PkiError(f"{path} already exists; pass overwrite to replace it")
    ca_cert, ca_key = _load_ca(directory)

    now = dt.datetime.now(dt.UTC)
    start = _utc(not_before) if not_before is not None else now - _CLOCK_SKEW
    if not_after is not None:
        end = _utc(not_after)
    else:
        if valid_days < 1:
            raise PkiError("a certificate must be valid for at least one day")
        end = now + dt.timedelta(days=valid_days)
    if end <= start:
        raise PkiError("the certificate's validity must end after it starts")
    if end > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}; issue for fewer days "
            "or renew the CA"
        )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_certificate(ca_cert, ca_key, role, name, key.public_key(), sans, start, end)
    write_file(key_path, _key_pem(key), private=True, overwrite=overwrite)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        write_file(cert_path, cert_pem, private=False, overwrite=overwrite)
    except PkiError:
        if not overwrite:
            key_path.unlink(missing_ok=True)  # no orphan key that would block a retry
        raise
    return Issued(role, name, cert_path, key_path, cert.not_valid_after_utc)


def build_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    role: Role,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    sans: list[x509.GeneralName],
    start: dt.datetime,
    end: dt.datetime,
) -> x509.Certificate:
    """A leaf certificate for (role, name) over ``public_key``, signed by the CA. Every field
    comes from here, never from a request: subject, role name, usages, validity."""
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is not Role.RESEARCHER:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=False, crl_sign=False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid coordinator, node or researcher name; else PkiError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PkiError(
            f"invalid name {name!r}: use 1-63 lower-case letters, digits and hyphens, "
            "starting with a letter or digit"
        )
    return name


@functools.lru_cache(maxsize=256)
def read_identity(cert_pem: bytes) -> tuple[Role, str]:
    """The (role, name) a federation certificate speaks for: role from OU, name from CN.

    This does not verify the certificate; the TLS handshake has done that by the time a
    service asks. Cached by the certificate's bytes (every call on a connection presents the
    same ones); a certificate without an identity raises each time.
    """
    cert = _parse_pem(cert_pem)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(ous) != 1 or len(cns) != 1:
        raise PkiError("the certificate does not name exactly one role (OU) and one holder (CN)")
    try:
        role = Role(ous[0].value)
    except ValueError:
        raise PkiError("the certificate's role (OU) is not a federation role") from None
    name = cns[0].value
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PkiError("the certificate's name (CN) is not a valid federation name")
    return role, name


def verify_certificate(cert_pem: bytes, ca_pem: bytes, now: dt.datetime) -> tuple[Role, str]:
    """The (role, name) of a leaf certificate presented outside a TLS handshake (e.g. with a
    signed query), after checking what the handshake would: signed by the federation CA,
    within its validity, and carrying its role's name. ``PkiError`` says which check failed."""
    role, name, start, end = _checked_leaf(cert_pem, ca_pem)
    if not start <= _utc(now) <= end:
        raise PkiError("the certificate is outside its validity period")
    return role, name


@functools.lru_cache(maxsize=1024)
def _checked_leaf(cert_pem: bytes, ca_pem: bytes) -> tuple[Role, str, dt.datetime, dt.datetime]:
    """What does not change with time: the CA's signature, the role and name (cached by the
    certificate's bytes: a researcher presents the same one with every query)."""
    cert = _parse_pem(cert_pem)
    ca = _parse_pem(ca_pem, "the CA certificate")
    if cert.issuer != ca.subject or not _signed_by(cert, ca):
        raise PkiError("the certificate is not signed by the federation CA")
    role, name = read_identity(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate names no role") from None
    if role_host(role, name) not in sans.get_values_for_type(x509.DNSName):
        raise PkiError("the certificate does not carry its role's name")
    return role, name, cert.not_valid_before_utc, cert.not_valid_after_utc


def describe(cert_path: Path) -> dict[str, Any]:
    """What an operator wants to know about a certificate file (JSON-serialisable)."""
    try:
        pem = Path(cert_path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {cert_path}: {exc.strerror or exc}") from exc
    cert = _parse_pem(pem, source=str(cert_path))
    role: str | None = None
    name: str | None = None
    try:
        held_role, name = read_identity(pem)
        role = held_role.value
    except PkiError:
        pass  # the CA's own certificate, or one that is not a federation certificate
    sans: list[str] = []
    eku: list[str] = []
    is_ca = False
    with contextlib.suppress(x509.ExtensionNotFound):
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [f"DNS:{v}" for v in san_ext.get_values_for_type(x509.DNSName)]
        sans += [f"IP:{v}" for v in san_ext.get_values_for_type(x509.IPAddress)]
    with contextlib.suppress(x509.ExtensionNotFound):
        eku_ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        eku = [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku_ext]
    with contextlib.suppress(x509.ExtensionNotFound):
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(dt.UTC)
    return {
        "path": str(cert_path),
        "subject": cert.subject.rfc4514_string(),
        "role": role,
        "name": name,
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "expired": now > cert.not_valid_after_utc,
        "is_ca": is_ca,
        "extended_key_usage": eku,
        "subject_alt_names": sans,
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


def _key_usage(*, digital_signature: bool, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def role_host(role: Role, name: str) -> str:
    """The DNS name every certificate carries for its role and name. Peers check the server's
    certificate against it (``fedtre.tls.channel_options``), so a certificate of another role
    cannot stand in for a coordinator or a node even under the same name."""
    return f"{name}.{role.value}.{ROLE_DOMAIN}"


def _subject_alt_names(name: str, hosts: Sequence[str], role: Role) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        raise PkiError("hosts must be a list of host names or addresses, not one string")
    sans: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName(role_host(role, name))]
    for host in hosts:
        general: x509.GeneralName
        if not isinstance(host, str):
            raise PkiError(f"invalid host {host!r}: give a DNS name or an IP address")
        try:
            general = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not _HOSTNAME.fullmatch(host):
                raise PkiError(f"invalid host {host!r}: give a DNS name or an IP address") from None
            if host.rstrip(".").lower().endswith(f".{ROLE_DOMAIN}"):
                raise PkiError(
                    f"invalid host {host!r}: names under .{ROLE_DOMAIN} are reserved"
                ) from None
            general = x509.DNSName(host.rstrip(".").lower())
        if general not in sans:
            sans.append(general)
    return sans


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"no federation CA in {directory} (run `fedtre pki init` first)") from exc
    except OSError as exc:
        raise PkiError(f"cannot read the CA in {directory}: {exc.strerror or exc}") from exc
    cert = _parse_pem(cert_pem, source=str(cert_path))
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def _parse_pem(pem: bytes, source: str = "the certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"{source} is not a PEM X.509 certificate") from exc


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _ensure_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise PkiError(f"cannot create {directory}: {exc.strerror or exc}") from exc


def write_file(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    """Write ``data`` so that no reader ever sees a partial file or a key with loose permissions.

    Without ``overwrite`` the file is created exclusively (an existing file is an error, even one
    that appeared since we checked). With it, a temporary file is renamed over the old one.
    """
    mode = 0o600 if private else 0o644
    try:
        if not overwrite:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            target = path
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            target = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)  # mkstemp makes 0600; a umask may narrow os.open
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if target != path:
                os.replace(target, path)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    except FileExistsError as exc:
        raise PkiError(f"{path} already exists") from exc
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc


def identity_problems(ca_path: Path, cert_path: Path, key_path: Path) -> list[str]:
    """What is wrong with a certificate, its key and the CA it should chain to, one plain line
    each (empty: nothing found). Checked locally, before any connection is tried, so that a
    person is told what to fix instead of "the server is unavailable"."""
    problems: list[str] = []
    try:
        ca = _parse_pem(Path(ca_path).read_bytes(), f"the CA file {ca_path}")
        cert = _parse_pem(Path(cert_path).read_bytes(), f"the certificate {cert_path}")
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, PkiError) as exc:
        return [f"cannot read the certificate files: {exc}"]
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        problems.append(
            f"your certificate {cert_path.name} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
            "ask the federation operator for a new one"
        )
    elif now < cert.not_valid_before_utc:
        problems.append(
            f"your certificate {cert_path.name} is not valid until "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)"
        )
    if cert.issuer != ca.subject or not _signed_by(cert, ca):
        problems.append(
            f"your certificate {cert_path.name} was not issued by the CA in {ca_path.name}: "
            "the profile's ca and cert come from different federations"
        )
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        problems.append(f"the key {key_path.name} does not belong to {cert_path.name}")
    return problems


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        public.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    except InvalidSignature:
        return False
    return True

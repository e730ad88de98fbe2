"""Certificates without moving keys (CSR signed by the CA), revocation, and the CRL every
node and the coordinator check."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtre import pki
from fedtre.pki import PkiError, Role, verify_certificate
from fedtre.pki_requests import RevocationList, request, revoke, sign_request, write_crl


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    home = tmp_path / "ca"
    pki.init_ca(home)
    return home


def test_a_key_made_at_the_trust_never_travels(ca: Path, tmp_path: Path) -> None:
    trust = tmp_path / "trust-a"
    key, csr = request(trust, Role.NODE, "trust-a", hosts=("trust-a.example.nhs.uk",))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in csr.read_bytes()
    cert = sign_request(ca, csr)
    assert cert == trust / "node-trust-a.pem"
    assert verify_certificate(
        cert.read_bytes(), (ca / "ca.pem").read_bytes(), dt.datetime.now(dt.UTC)
    ) == (
        Role.NODE,
        "trust-a",
    )
    # the certificate is over the trust's own key, and no key file reached the CA
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    own = serialization.load_pem_private_key(key.read_bytes(), None).public_key()
    assert issued.public_key() == own
    assert not list(ca.rglob("*trust-a*.key"))
    assert pki.identity_problems(ca / "ca.pem", cert, key) == []


def test_the_ca_sets_everything_but_the_key_name_and_role(ca: Path, tmp_path: Path) -> None:
    """A request asking for a CA certificate, a role host of another role and a long life gets
    a plain leaf of its own role, for the CA's validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "researcher"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "eve"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("hub.coordinator.role.fedtre")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "eve.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    cert = x509.load_pem_x509_certificate(sign_request(ca, path, valid_days=30).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hub.coordinator.role.fedtre" not in names.get_values_for_type(x509.DNSName)
    assert "eve.researcher.role.fedtre" in names.get_values_for_type(x509.DNSName)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=31)


def test_requests_the_ca_refuses(ca: Path, tmp_path: Path) -> None:
    _, csr = request(tmp_path / "a", Role.NODE, "trust-a")
    sign_request(ca, csr)
    _, again = request(tmp_path / "b", Role.RESEARCHER, "trust-a")
    with pytest.raises(PkiError, match="already a node"):
        sign_request(ca, again)  # one name, one role
    tampered = tmp_path / "tampered.csr"
    text = csr.read_bytes()
    tampered.write_bytes(text[:200] + (b"A" if text[200:201] != b"A" else b"B") + text[201:])
    with pytest.raises(PkiError):
        sign_request(ca, tampered)
    other = ec.generate_private_key(ec.SECP384R1())
    odd = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "trust-z"),
                ]
            )
        )
        .sign(other, hashes.SHA256())
    )
    path = tmp_path / "odd.csr"
    path.write_bytes(odd.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="P-256"):
        sign_request(ca, path)


def test_a_revoked_certificate_is_on_the_list_and_others_are_not(ca: Path, tmp_path: Path) -> None:
    _, csr_a = request(tmp_path / "a", Role.RESEARCHER, "alice")
    _, csr_b = request(tmp_path / "b", Role.RESEARCHER, "bob")
    alice, bob = sign_request(ca, csr_a), sign_request(ca, csr_b)
    crl = tmp_path / "crl.pem"
    write_crl(ca, crl)
    listed = RevocationList(crl, ca / "ca.pem")
    assert listed.problem(alice.read_bytes()) == ""
    revoke(ca, alice, "laptop stolen")
    assert listed.problem(alice.read_bytes()) == ""  # not published yet
    time.sleep(0.01)
    write_crl(ca, crl)
    assert listed.problem(alice.read_bytes()) == "the certificate has been revoked"  # re-read
    assert listed.problem(bob.read_bytes()) == ""


def test_a_list_not_from_our_ca_or_out_of_date_refuses(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other, common_name="another CA")
    forged = tmp_path / "forged.pem"
    write_crl(other, forged)
    with pytest.raises(PkiError, match="not signed by the federation CA"):
        RevocationList(forged, ca / "ca.pem")
    crl = tmp_path / "crl.pem"
    write_crl(ca, crl, days=1)
    listed = RevocationList(crl, ca / "ca.pem")
    _, csr = request(tmp_path / "a", Role.RESEARCHER, "alice")
    cert = sign_request(ca, csr).read_bytes()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert "expired" in listed.problem(cert, later)
    # replaced by a forgery while running: fail closed, not open
    os.replace(forged, crl)
    assert listed.problem(cert) != ""

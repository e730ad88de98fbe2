"""The federation PKI: what issued certificates say, how keys are stored, what is refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtre import cli, pki
from fedtre.cli import main
from fedtre.errors import ConfigError
from fedtre.pki import PkiError, Role


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki-base") / "pki"
    pki.init_ca(directory)
    return directory


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_writes_a_ca_certificate_and_a_private_key(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "pki"
    cert_path = pki.init_ca(directory)
    assert cert_path == directory / "ca.pem"
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600
    cert = _load(cert_path)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "fedtre federation CA"
    )
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= dt.timedelta(days=3650)
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_init_ca_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(tmp_path)
    assert ((tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()) == before
    (tmp_path / "ca.pem").unlink()  # a lone ca.key is still a CA we must not clobber
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before[1]
    assert not (tmp_path / "ca.pem").exists()


@pytest.mark.parametrize(
    ("role", "eku"),
    [
        (Role.COORDINATOR, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        (Role.NODE, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        (Role.RESEARCHER, [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ],
)
def test_issued_certificate_names_role_and_holder(
    ca_dir: Path, role: Role, eku: list[x509.ObjectIdentifier]
) -> None:
    issued = pki.issue(ca_dir, role, f"{role.value}-one", hosts=("node.example.nhs.uk", "10.0.0.7"))
    assert issued.cert_path == ca_dir / f"{role.value}-{role.value}-one.pem"
    assert issued.key_path == ca_dir / f"{role.value}-{role.value}-one.key"
    assert _mode(issued.key_path) == 0o600
    cert, ca = _load(issued.cert_path), _load(ca_dir / "ca.pem")

    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        NameOID.COMMON_NAME: f"{role.value}-one",
        NameOID.ORGANIZATIONAL_UNIT_NAME: role.value,
        NameOID.ORGANIZATION_NAME: "fedtre federation",
    }
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        f"{role.value}-one",
        f"{role.value}-one.{role.value}.role.fedtre",  # its role, checked by peers
        "node.example.nhs.uk",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == eku
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=825))) < dt.timedelta(minutes=1)
    assert issued.not_after == cert.not_valid_after_utc
    assert pki.read_identity(issued.cert_path.read_bytes()) == (role, f"{role.value}-one")


def test_default_hosts_and_serials(ca_dir: Path) -> None:
    a = _load(pki.issue(ca_dir, Role.NODE, "serial-a").cert_path)
    b = _load(pki.issue(ca_dir, Role.NODE, "serial-b").cert_path)
    san = a.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "serial-a",
        "serial-a.node.role.fedtre",
        "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert a.serial_number != b.serial_number
    assert a.serial_number.bit_length() > 64  # random, not sequential


def test_explicit_validity_window_can_make_an_expired_certificate(ca_dir: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    issued = pki.issue(
        ca_dir,
        Role.COORDINATOR,
        "expired",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    cert = _load(issued.cert_path)
    assert cert.not_valid_after_utc < now
    assert pki.describe(issued.cert_path)["expired"] is True


def test_issue_refuses_to_overwrite_unless_asked(ca_dir: Path) -> None:
    first = pki.issue(ca_dir, Role.NODE, "trust-overwrite")
    before = first.cert_path.read_bytes(), first.key_path.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.issue(ca_dir, Role.NODE, "trust-overwrite")
    assert (first.cert_path.read_bytes(), first.key_path.read_bytes()) == before
    second = pki.issue(ca_dir, Role.NODE, "trust-overwrite", overwrite=True)
    assert second.cert_path.read_bytes() != before[0]
    assert second.key_path.read_bytes() != before[1]
    assert _mode(second.key_path) == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    # the same name in another role is refused: it could pose as the first
    with pytest.raises(PkiError, match="one name, one role"):
        pki.issue(ca_dir, Role.RESEARCHER, "trust-overwrite")
    with pytest.raises(PkiError, match="reserved"):
        pki.issue(ca_dir, Role.NODE, "trust-x", hosts=["hub.coordinator.role.fedtre"])


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Trust-A",
        "-trust",
        "trust_a",
        "trust.a",
        "a" * 64,
        "trust a",
        "../ca",
        "tr\u00fcst",
        "x\n",
    ],
)
def test_bad_names_are_refused(ca_dir: Path, name: str) -> None:
    before = sorted(ca_dir.iterdir())
    with pytest.raises(PkiError, match="invalid name"):
        pki.issue(ca_dir, Role.NODE, name)
    assert sorted(ca_dir.iterdir()) == before  # nothing written


@pytest.mark.parametrize("host", ["", "bad host", "-x.example", "a..b", "évil.example"])
def test_bad_hosts_are_refused(ca_dir: Path, host: str) -> None:
    with pytest.raises(PkiError, match="invalid host"):
        pki.issue(ca_dir, Role.NODE, "hosty", hosts=(host,))
    assert not (ca_dir / "node-hosty.pem").exists()


def test_other_refusals(ca_dir: Path, tmp_path: Path) -> None:
    assert issubclass(PkiError, ConfigError)
    with pytest.raises(PkiError, match="no federation CA"):
        pki.issue(tmp_path, Role.NODE, "orphan")
    with pytest.raises(PkiError, match="CA expires"):
        pki.issue(ca_dir, Role.NODE, "too-long", valid_days=4000)
    with pytest.raises(PkiError, match="end after it starts"):
        now = dt.datetime.now(dt.UTC)
        pki.issue(ca_dir, Role.NODE, "backwards", not_before=now, not_after=now)
    with pytest.raises(PkiError, match="unknown role"):
        pki.issue(ca_dir, "node", "stringly")  # type: ignore[arg-type]
    # a CA key that does not match the CA certificate is noticed
    other = tmp_path / "other"
    pki.init_ca(other)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    (mixed / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(PkiError, match="does not belong"):
        pki.issue(mixed, Role.NODE, "mixed")


def test_read_identity_refuses_certificates_without_a_federation_identity(ca_dir: Path) -> None:
    with pytest.raises(PkiError, match="exactly one role"):
        pki.read_identity((ca_dir / "ca.pem").read_bytes())  # the CA has no OU
    with pytest.raises(PkiError, match="not a PEM"):
        pki.read_identity(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    # a certificate claiming an unknown role
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
            x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    from cryptography.hazmat.primitives import hashes

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="not a federation role"):
        pki.read_identity(cert.public_bytes(serialization.Encoding.PEM))


def test_describe(ca_dir: Path) -> None:
    issued = pki.issue(ca_dir, Role.RESEARCHER, "dr-jones", hosts=())
    info = pki.describe(issued.cert_path)
    cert = _load(issued.cert_path)
    assert info["role"] == "researcher" and info["name"] == "dr-jones"
    assert info["subject"] == "CN=dr-jones,OU=researcher,O=fedtre federation"
    assert info["issuer"] == "CN=fedtre federation CA,O=fedtre federation"
    assert info["serial"] == f"{cert.serial_number:x}"
    assert dt.datetime.fromisoformat(info["not_after"]) == cert.not_valid_after_utc
    assert dt.datetime.fromisoformat(info["not_before"]) == cert.not_valid_before_utc
    assert info["subject_alt_names"] == ["DNS:dr-jones", "DNS:dr-jones.researcher.role.fedtre"]
    assert info["extended_key_usage"] == ["clientAuth"]
    assert info["expired"] is False and info["is_ca"] is False
    fingerprint = info["sha256_fingerprint"]
    assert len(fingerprint.split(":")) == 32 and fingerprint == fingerprint.upper()
    json.dumps(info)  # serialisable as is
    ca_info = pki.describe(ca_dir / "ca.pem")
    assert ca_info["is_ca"] is True and ca_info["role"] is None
    with pytest.raises(PkiError, match="cannot read"):
        pki.describe(ca_dir / "missing.pem")
    with pytest.raises(PkiError, match="not a PEM"):
        pki.describe(issued.key_path)


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `fedtre pki` is wired into the real entry point, and loads only the PKI's module
    assert cli.COMMAND_MODULES["pki"] == "fedtre.pki_cli"
    directory = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(directory)]) == 0
    assert (directory / "ca.pem").exists() and _mode(directory / "ca.key") == 0o600
    assert main(["pki", "init", "--dir", str(directory)]) == 3  # refused: CA exists
    assert "already exists" in capsys.readouterr().err

    args = ["pki", "issue", "--dir", str(directory), "--role", "node", "--name", "trust-a"]
    assert main([*args, "--host", "trust-a.nhs.example", "--host", "10.1.2.3", "--days", "30"]) == 0
    out = capsys.readouterr().out
    assert "node-trust-a.pem" in out and "node-trust-a.key" in out
    assert main(args) == 3  # exists
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["pki", "issue", "--dir", str(directory), "--role", "node", "--name", "Bad"]) == 3
    assert "invalid name" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown role (exit code 2)
        main(["pki", "issue", "--dir", str(directory), "--role", "admin", "--name", "x"])
    capsys.readouterr()

    cert_path = directory / "node-trust-a.pem"
    assert main(["pki", "show", str(cert_path)]) == 0
    text = capsys.readouterr().out
    assert "CN=trust-a,OU=node,O=fedtre federation" in text
    assert (
        "DNS:trust-a, DNS:trust-a.node.role.fedtre, DNS:localhost, IP:127.0.0.1" in text
    )  # --overwrite used the defaults
    assert main(["pki", "show", str(cert_path), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == pki.describe(cert_path)
    assert info["role"] == "node" and info["name"] == "trust-a"
    assert main(["pki", "show", str(directory / "ca.key")]) == 3

"""``fedtre pki ...``: create the federation CA, issue certificates, and inspect them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedtre import pki, pki_requests
from fedtre.pki import Role


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pki", help="federation certificates: CA, nodes, coordinator, researchers"
    )
    pki_sub = parser.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    init = pki_sub.add_parser(
        "init", help="create the federation CA (ca.pem, ca.key) in a directory"
    )
    init.add_argument("--dir", type=Path, required=True, help="PKI directory (created 0700)")
    init.add_argument("--days", type=int, default=3650, help="CA validity (default 3650)")
    init.add_argument("--common-name", default="fedtre federation CA")
    init.set_defaults(func=_init)

    issue = pki_sub.add_parser("issue", help="issue a certificate and key signed by the CA")
    issue.add_argument("--dir", type=Path, required=True, help="PKI directory holding the CA")
    issue.add_argument("--role", choices=[r.value for r in Role], required=True)
    issue.add_argument("--name", required=True, help="e.g. trust-a (lower-case, digits, -)")
    issue.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="DNS name or IP the holder serves on (repeatable; default localhost, 127.0.0.1)",
    )
    issue.add_argument("--days", type=int, default=825, help="validity (default 825)")
    issue.add_argument("--overwrite", action="store_true", help="replace an existing cert/key")
    issue.set_defaults(func=_issue)

    req = pki_sub.add_parser(
        "request",
        help="make a private key and a signing request here (the key never leaves: 0600)",
    )
    req.add_argument("--dir", type=Path, required=True, help="where to write the key and CSR")
    req.add_argument("--role", choices=[r.value for r in Role], required=True)
    req.add_argument("--name", required=True)
    req.add_argument("--host", action="append", dest="hosts", metavar="HOST")
    req.set_defaults(func=_request)

    sign = pki_sub.add_parser("sign", help="CA operator: sign a request (CSR) into a certificate")
    sign.add_argument("--dir", type=Path, required=True, help="PKI directory holding the CA")
    sign.add_argument("csr", type=Path)
    sign.add_argument("--days", type=int, default=825)
    sign.set_defaults(func=_sign)

    rev = pki_sub.add_parser("revoke", help="CA operator: revoke a certificate (then: pki crl)")
    rev.add_argument("--dir", type=Path, required=True, help="PKI directory holding the CA")
    rev.add_argument("cert", type=Path)
    rev.add_argument("--reason", required=True)
    rev.set_defaults(func=_revoke)

    crl = pki_sub.add_parser(
        "crl", help="CA operator: publish the certificate revocation list every peer checks"
    )
    crl.add_argument("--dir", type=Path, required=True, help="PKI directory holding the CA")
    crl.add_argument("--out", type=Path, required=True)
    crl.add_argument("--days", type=int, default=30, help="publish a new one before (default 30)")
    crl.set_defaults(func=_crl)

    show = pki_sub.add_parser("show", help="describe a certificate file")
    show.add_argument("file", type=Path)
    show.add_argument("--format", choices=["text", "json"], default="text")
    show.set_defaults(func=_show)


def _init(args: argparse.Namespace) -> int:
    cert = pki.init_ca(args.dir, common_name=args.common_name, valid_days=args.days)
    print(f"federation CA written: {cert} and {cert.with_suffix('.key')} (mode 0600)")
    print("give ca.pem to every node, coordinator and researcher; keep ca.key offline")
    return 0


def _issue(args: argparse.Namespace) -> int:
    hosts = tuple(args.hosts) if args.hosts else ("localhost", "127.0.0.1")
    issued = pki.issue(
        args.dir,
        Role(args.role),
        args.name,
        hosts=hosts,
        valid_days=args.days,
        overwrite=args.overwrite,
    )
    print(f"issued {issued.role.value} certificate for {issued.name}")
    print(f"  certificate: {issued.cert_path}")
    print(f"  private key: {issued.key_path} (mode 0600)")
    print(f"  valid until: {issued.not_after:%Y-%m-%d %H:%M} UTC")
    return 0


def _request(args: argparse.Namespace) -> int:
    hosts = tuple(args.hosts) if args.hosts else ("localhost", "127.0.0.1")
    key, csr = pki_requests.request(args.dir, Role(args.role), args.name, hosts)
    print(f"private key: {key} (mode 0600; it stays here)")
    print(f"signing request: {csr}; send it to the federation's CA operator")
    return 0


def _sign(args: argparse.Namespace) -> int:
    cert = pki_requests.sign_request(args.dir, args.csr, valid_days=args.days)
    print(f"certificate: {cert}; send it back to the requester (it is public)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    serial = pki_requests.revoke(args.dir, args.cert, args.reason)
    print(f"revoked serial {serial:x}; publish: fedtre pki crl --dir {args.dir} --out crl.pem")
    return 0


def _crl(args: argparse.Namespace) -> int:
    n = pki_requests.write_crl(args.dir, args.out, days=args.days)
    print(
        f"wrote {args.out}: {n} revoked certificate(s), valid {args.days} days; copy it to the "
        "coordinator and every node ([server] crl / [tls] crl): they read it again when it changes"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    info = pki.describe(args.file)
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("subject", info["subject"]),
        ("role", info["role"] or ("(CA)" if info["is_ca"] else "(none)")),
        ("name", info["name"] or "(none)"),
        ("issuer", info["issuer"]),
        ("serial", info["serial"]),
        ("not before", info["not_before"]),
        ("not after", info["not_after"] + ("  (EXPIRED)" if info["expired"] else "")),
        ("usage", ", ".join(info["extended_key_usage"]) or ("CA" if info["is_ca"] else "-")),
        ("names", ", ".join(info["subject_alt_names"]) or "-"),
        ("sha256", info["sha256_fingerprint"]),
    ]
    for label, value in rows:
        print(f"{label:<11} {value}")
    return 0

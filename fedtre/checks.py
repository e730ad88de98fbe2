"""Start-up checks both servers run (``fedtre node check``, ``fedtre coordinator check``): a
certificate of the right role and name whose key belongs to it, and files that hold secrets or
person-level data readable by their owner only. Each problem is one line saying what to fix."""

from __future__ import annotations

import datetime as dt
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509

from fedtre.pki import PkiError, Role, identity_problems, read_identity

C = TypeVar("C")


@dataclass
class CheckReport(Generic[C]):
    """What a check found: ``problems`` stop ``serve``; ``warnings`` are logged only."""

    config: C | None = None
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return (
            [f"ok       {line}" for line in self.passed]
            + [f"WARNING  {line}" for line in self.warnings]
            + [f"PROBLEM  {line}" for line in self.problems]
        )

    def print_report(self, service: str) -> int:
        """``fedtre <service> check``: every line, then the verdict; exit 0 or 3."""
        print("\n".join(self.lines()))
        if self.ok:
            print(f"{service} check passed: it may serve")
            return 0
        print(f"{service} check found {len(self.problems)} problem(s): fix them before serving")
        return 3

    def refuses_to_serve(self, service: str) -> bool:
        """Before ``serve``: warnings and problems on stderr; True when it must not start."""
        for line in self.warnings:
            print(f"WARNING  {line}", file=sys.stderr)
        if self.ok and self.config is not None:
            return False
        for line in self.problems:
            print(f"PROBLEM  {line}", file=sys.stderr)
        print(
            f"refusing to serve: fix the problems above (fedtre {service} check)", file=sys.stderr
        )
        return True


def certificate_problems(
    ca: Path, cert: Path, key: Path, role: Role, name: str, where: str
) -> list[str]:
    missing = [
        f"{label} file {file} does not exist"
        for label, file in (("CA", ca), ("certificate", cert), ("key", key))
        if not file.is_file()
    ]
    if missing:
        return missing
    problems = [f"{where} {p}" for p in identity_problems(ca, cert, key)]
    try:
        found_role, found_name = read_identity(cert.read_bytes())
    except PkiError as exc:
        return [*problems, f"{where} cert {cert}: {exc}"]
    if found_role is not role:
        problems.append(
            f"{where} cert {cert.name} is a {found_role.value} certificate; this needs its own "
            f"{role.value} certificate: fedtre pki issue --role {role.value} --name {name}"
        )
    elif found_name != name:
        problems.append(
            f"{where} cert {cert.name} is for {role.value} '{found_name}', but this is "
            f"'{name}': use its own certificate or fix the name"
        )
    problems += private_file_problems(key, f"the {role.value}'s private key")
    return problems


EXPIRY_WARNING_DAYS = 30


def expiry_warnings(cert: Path, where: str, days: int = EXPIRY_WARNING_DAYS) -> list[str]:
    """A warning when ``cert`` expires within ``days``: time to rotate it (README)."""
    try:
        found = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return []  # certificate_problems says what is wrong with it
    left = found.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if dt.timedelta(0) <= left < dt.timedelta(days=days):
        return [
            f"{where} cert {cert.name} expires on {found.not_valid_after_utc:%Y-%m-%d} "
            f"({left.days} days): issue a new one and restart (README: rotating certificates)"
        ]
    return []


def private_file_problems(path: Path, what: str) -> list[str]:
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    problems = []
    if mode & 0o077:
        problems.append(
            f"{what} {path} is readable by other users (mode {mode:04o}): chmod 600 {path}"
        )
    if info.st_uid != os.geteuid():
        problems.append(
            f"{what} {path} belongs to uid {info.st_uid}, not to the user running this "
            f"service (uid {os.geteuid()}): chown it to the service user"
        )
    return problems


def private_dir_problems(path: Path, what: str) -> list[str]:
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            return [f"{what} {path} cannot be created in {path.parent}"]
        return []
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"{what} {path} is not writable by this user"]
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return [f"{what} {path} is open to other users (mode {mode:04o}): chmod 700 {path}"]
    return []

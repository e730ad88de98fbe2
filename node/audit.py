"""The node's audit log: in the ledger's database, with the node's checkpoint key. The server
and the command-line tools (opt-outs, disputes, imported approvals) append to the same log."""

from __future__ import annotations

import getpass
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtre.audit.checkpoint import open_signed_log
from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog, file_sha256
from node.config import NodeConfig


def open_audit(config: NodeConfig) -> tuple[AuditLog, Ed25519PrivateKey]:
    return open_signed_log(config.audit_path, config.state_dir, config.node_id)


def record(config: NodeConfig, event: Event, **fields: Any) -> None:
    """One durable entry from a command-line tool, written before it acts (it raises, and the
    tool does nothing, if the log cannot be written)."""
    log, _ = open_audit(config)
    try:
        log.write(event, operator=f"local:{getpass.getuser()}", **fields)
    finally:
        log.close()


def new_import_id() -> str:
    """A random id for one import of person-level data (opt-outs, disputes): the audit entry
    and the operator's own records can name the import; nothing about who is in it can be
    derived from it."""
    return uuid.uuid4().hex


def file_digest(path: Path) -> str:
    """SHA-256 of a file (signed documents only: never of person-level lists, whose digest a
    guess of their few ids would match)."""
    return file_sha256(path)[0]

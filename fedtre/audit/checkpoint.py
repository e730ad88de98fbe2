"""Signed checkpoints of an audit log: (log id, size, head link, time), signed with Ed25519.

Each service has its own checkpoint key (``state/audit.key``, 0600, made on first start); the
log's first entry names its public key. A checkpoint is published (to the coordinator, which
keeps every trust's in its own log, and to auditors with ``fedtre audit checkpoint``); anyone
holding one can later prove that the log's first ``size`` entries were not changed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog, canonical
from fedtre.errors import AuditUnavailable, ConfigError

KEY_FILE = "audit.key"


class CheckpointError(ValueError):
    """A checkpoint that is malformed or not signed by the key it names."""


@dataclass(frozen=True)
class Checkpoint:
    log_id: str
    actor: str
    role: str
    size: int
    head: str  # hex SHA-256 link of entry ``size`` (the genesis value for an empty log)
    time: str  # ISO, UTC
    public_key: str  # hex raw Ed25519
    signature: str = ""  # hex, over ``body()``

    def body(self) -> bytes:
        fields = asdict(self)
        del fields["signature"]
        return ("fedtre-audit-checkpoint-v1\n" + canonical(fields)).encode()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @staticmethod
    def from_json(text: str) -> Checkpoint:
        try:
            raw = json.loads(text)
            fields = {k: raw[k] for k in Checkpoint.__dataclass_fields__}
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"not a fedtre audit checkpoint ({exc})") from exc
        if not isinstance(fields["size"], int) or fields["size"] < 0:
            raise CheckpointError("not a fedtre audit checkpoint (size)")
        if not all(isinstance(v, str) for k, v in fields.items() if k != "size"):
            raise CheckpointError("not a fedtre audit checkpoint (field types)")
        return Checkpoint(**fields)

    def check(self, pinned_key: str | None = None) -> None:
        """Raise ``CheckpointError`` unless the signature is good (by ``pinned_key`` if given)."""
        if pinned_key is not None and pinned_key.lower() != self.public_key.lower():
            raise CheckpointError("signed by another key than the one pinned")
        try:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.public_key))
            key.verify(bytes.fromhex(self.signature), self.body())
        except (ValueError, InvalidSignature) as exc:
            raise CheckpointError("its signature does not verify") from exc


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The service's checkpoint key: made on first use (0600), then loaded."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return load_key(path)
        except OSError as exc:
            raise AuditUnavailable(f"cannot create the audit key {path}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise AuditUnavailable(f"cannot create the audit key {path}: {exc}") from exc
        return key
    return load_key(path)


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the audit checkpoint key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def open_signed_log(
    path: Path, state_dir: Path, actor: str, role: str = "node"
) -> tuple[AuditLog, Ed25519PrivateKey]:
    """A service's audit log and its checkpoint key (``state_dir/audit.key``), each made on
    first use; a new log names the key, and the JSON-lines log it follows if there is one."""
    key = load_or_create_key(state_dir / KEY_FILE)
    log = AuditLog(
        path, actor, role=role, public_key=public_hex(key), follows=state_dir / "audit.jsonl"
    )
    return log, key


class Publisher:
    """Signs a service's checkpoints: ``sign`` now; ``recent`` for what is sent to others,
    signed afresh at most once every ``every`` seconds (a caller cannot make the log grow by
    asking often)."""

    def __init__(self, log: AuditLog, key: Ed25519PrivateKey, every: float = 60.0) -> None:
        self.log = log
        self.key = key
        self.every = every
        self._last: tuple[float, str] | None = None

    def sign(self) -> str:
        text = sign_checkpoint(self.log, self.key).to_json()
        self._last = (time.monotonic(), text)
        return text

    def recent(self) -> str:
        if self._last is None or time.monotonic() - self._last[0] >= self.every:
            return self.sign()
        return self._last[1]


def sign_checkpoint(log: AuditLog, key: Ed25519PrivateKey) -> Checkpoint:
    """Sign the log's current head, keep the checkpoint beside the log and record it."""
    size, head = log.head()
    unsigned = Checkpoint(
        log_id=log.log_id,
        actor=log.actor,
        role=log.role,
        size=size,
        head=head.hex(),
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        public_key=public_hex(key),
    )
    signed = Checkpoint(**{**asdict(unsigned), "signature": key.sign(unsigned.body()).hex()})
    log.keep_checkpoint(size, signed.to_json())
    log.note(Event.CHECKPOINT_SIGNED, size=size, head=signed.head)
    return signed

"""A node's record of its own ledger, kept beside its database, outside the state directory.

If the state directory is lost, moved or restored from an old backup, a new or older ledger
would silently give every project its whole budget again. So the node keeps, next to its
database, which ledger it uses and how many answers that ledger had released, updated after
every release; at start it refuses a ledger that is not that one, or that has released fewer
answers than recorded (an older copy). Owner-only; not fsynced (a crash can only leave it
behind the ledger, which is allowed).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from node.config import NodeConfig
from node.errors import StateMismatch
from node.ledger import Ledger


def marker_path(config: NodeConfig) -> Path:
    return config.database.with_name(f".{config.database.name}.{config.node_id}.ledger.json")


RECORD_BYTES = 512  # the record is rewritten in place at this fixed length


class Generation:
    """The record of this node's ledger, kept beside its database.

    Created (or brought up to date) atomically at start; after that, every release rewrites it
    in place with one ``pwrite`` of a fixed-length record (a few microseconds, against about
    0.25 ms for a new file and a rename each time), on the release's own path: a release whose
    record cannot be written fails loudly. A torn write (a crash in the middle of those 512
    bytes) leaves a record that does not parse: the node then refuses to start and says so,
    which is safe."""

    def __init__(self, config: NodeConfig, ledger: Ledger) -> None:
        self.path = marker_path(config)
        self.ledger_id = ledger.identity()
        self.state_dir = str(config.state_dir)
        self._lock = threading.Lock()
        self.committed = ledger.committed_count()
        problem = mismatch(self.path, self.ledger_id, self.committed, config)
        if problem:
            raise StateMismatch(problem)
        self._create()
        self._fd = os.open(self.path, os.O_WRONLY)

    def released(self) -> None:
        """One more answer released by this ledger (possibly fewer than the ledger has, when
        several processes share it: the record may lag, never lead)."""
        with self._lock:
            self.committed += 1
            record = self._record()
            if os.pwrite(self._fd, record, 0) != len(record):
                raise OSError(28, f"short write to {self.path}")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _record(self) -> bytes:
        doc = {
            "ledger_id": self.ledger_id,
            "committed": self.committed,
            "state_dir": self.state_dir,
        }
        text = json.dumps(doc).encode()
        if len(text) >= RECORD_BYTES:
            raise OSError(36, f"the ledger record for {self.path} is too long")
        return text.ljust(RECORD_BYTES - 1) + b"\n"  # JSON ignores the padding

    def _create(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        os.replace(tmp, self.path)


def mismatch(path: Path, ledger_id: str, committed: int, config: NodeConfig) -> str:
    """Why this ledger is not the one the node last used ("" if it is, or nothing is known)."""
    if not path.exists():
        return ""
    try:
        doc = json.loads(path.read_text())
        known_id, known = str(doc["ledger_id"]), int(doc["committed"])
        known_dir = str(doc.get("state_dir", "?"))
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"the node's ledger record {path} is unreadable: restore it from backup with the state"
        )
    if known_id != ledger_id:
        return (
            f"the budget ledger in {config.state_dir} is not the one this node last used "
            f"(its records, {path}, name ledger {known_id[:8]} in {known_dir} with {known} "
            "released answers): with it every project's budget would start over. Restore the "
            "state directory from its latest backup, or point state_dir back at it. Only if this "
            f"trust really starts anew, delete {path}."
        )
    if committed < known:
        return (
            f"the budget ledger in {config.state_dir} has released {committed} answers but this "
            f"node's records say {known}: it is an older copy (a backup from before the last "
            "releases), and budget spent since would be spent again. Restore the latest backup."
        )
    return ""

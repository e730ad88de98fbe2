"""A node's record of its own ledger, kept beside its database, outside the state directory.

If the state directory is lost, moved or restored from an old backup, a new or older ledger
would silently give every project its whole budget again. So the node keeps, next to its
database, which ledger it uses and how many answers that ledger had released, updated after
every release; at start it refuses a ledger that is not that one, or that has released fewer
answers than recorded (an older copy). Written atomically, owner-only; not fsynced (a crash can
only leave it behind the ledger, which is allowed).
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


class Generation:
    def __init__(self, config: NodeConfig, ledger: Ledger) -> None:
        self.path = marker_path(config)
        self.ledger_id = ledger.identity()
        self.state_dir = str(config.state_dir)
        self._lock = threading.Lock()
        self.committed = ledger.committed_count()
        problem = mismatch(self.path, self.ledger_id, self.committed, config)
        if problem:
            raise StateMismatch(problem)
        self._write()

    def released(self) -> None:
        """One more answer released by this ledger (possibly fewer than the ledger has, when
        several processes share it: the record may lag, never lead)."""
        with self._lock:
            self.committed += 1
            self._write()

    def _write(self) -> None:
        doc = {
            "ledger_id": self.ledger_id,
            "committed": self.committed,
            "state_dir": self.state_dir,
        }
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc))
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

"""An audit log (node or coordinator): one JSON object per line, written and fsynced before acting.

Records are structured (``json.dumps`` escapes newlines and control characters), so nothing a
caller sends can forge a second entry. Records carry identifiers, the query text the researcher
wrote, refusal reasons and ε: never a row value or an aggregate. If the log cannot be written the
node fails closed: ``AuditUnavailable`` stops the request before anything is released.
Reconciling with the ledger: every ``query.released`` and ``query.replayed`` line names the
units its answer was charged (``charged_epsilon_units``); ``epsilon_units`` is what that request
spent (0 for a replay). Per query id, the charged units equal the ledger's debit, even when the
release's own line was lost to a crash after the ledger commit.
Tamper evidence (hash chain and signed checkpoints) comes with the auditing work.
"""

from __future__ import annotations

import json
import math
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtre.errors import AuditUnavailable

MAX_FIELD_CHARS = 10_000


class AuditLog:
    def __init__(self, path: Path, actor: str, role: str = "node") -> None:
        self.path = path
        self.actor = actor
        self.role = role
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open audit log {path}: {exc.strerror}") from exc

    def write(self, event: str, **fields: Any) -> None:
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
            self.role: self.actor,
            "event": event,
            **{k: _bounded(v) for k, v in fields.items()},
        }
        line = (
            json.dumps(record, ensure_ascii=True, sort_keys=True, allow_nan=False) + "\n"
        ).encode()
        with self._lock:
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(28, "short write to audit log")
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + "…[truncated]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN or Infinity
    return value


def read_audit(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

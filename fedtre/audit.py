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

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtre.errors import AuditUnavailable

MAX_FIELD_CHARS = 10_000


class AuditLog:
    """Append-only JSON lines with group commit.

    ``write`` returns once its line is durable: lines appended by concurrent writers share one
    fsync (the first waiter syncs everything appended so far while the others wait for it), and
    no lock is held across the fsync, so appends never queue behind the disk.

    ``begin`` appends a line and starts its fsync on the flusher thread at once; ``wait`` returns
    when it is done. The node logs a request with ``begin`` before acting on it and ``wait``s
    before anything leaves, so the fsync runs while the data is read instead of before.

    ``note`` appends a line without waiting for the disk: for outcomes whose authoritative
    record is durable elsewhere (the ledger's reservation and stored answer). It is fsynced by
    the next ``write``/``begin`` or within ``flush_seconds``.

    A line appended is in the kernel at once and survives a crash of the process; only a power
    loss before its fsync can lose it, and the node returns nothing before the request's own
    line is durable.
    """

    def __init__(
        self, path: Path, actor: str, role: str = "node", flush_seconds: float = 0.5
    ) -> None:
        self.path = path
        self.actor = actor
        self.role = role
        self._lock = threading.Lock()  # appends only; never held across an fsync
        self._sync = threading.Condition()
        self._appended = 0  # lines appended
        self._synced = 0  # lines known to be durable
        self._syncing = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # a line is waiting for its fsync
        self._failure: str | None = None  # a failed fsync: final
        self._closed = False
        # Told the duration of every fsync (metrics: audit write times); must not raise.
        self.on_fsync: Callable[[float], None] = lambda seconds: None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open audit log {path}: {exc.strerror}") from exc
        self._flusher = threading.Thread(
            target=self._flush_every, args=(flush_seconds,), name="audit-flush", daemon=True
        )
        self._flusher.start()

    def write(self, event: str, **fields: Any) -> None:
        """Append one record and return once it is on disk."""
        self._sync_to(self._append(event, fields))

    def begin(self, event: str, **fields: Any) -> int:
        """Append one record and start its fsync now; ``wait`` with the returned number."""
        seq = self._append(event, fields)
        self._wake.set()
        return seq

    def wait(self, seq: int) -> None:
        """Return once record ``seq`` (from ``begin`` or ``note``) is on disk."""
        self._sync_to(seq)

    def note(self, event: str, **fields: Any) -> int:
        """Append one record; it reaches the disk with the next fsync or flush."""
        return self._append(event, fields)

    def _append(self, event: str, fields: dict[str, Any]) -> int:
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
            self._check_usable()
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(28, "short write to audit log")
            except OSError as exc:
                raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc
            self._appended += 1
            return self._appended

    def _check_usable(self) -> None:
        if self._closed:
            raise AuditUnavailable(f"audit log {self.path} is closed")
        if self._failure is not None:
            raise AuditUnavailable(
                f"audit log {self.path} lost writes ({self._failure}): restart the node"
            )

    def _sync_to(self, seq: int) -> None:
        """Group commit: return once line ``seq`` is durable; one fsync covers every line
        appended before it started.

        A failed fsync is final: the kernel reports a lost write to one fsync only, so a later
        fsync that succeeds proves nothing about the lines before it. Every later append and
        wait then fails (the node stops serving) until the node is restarted."""
        with self._sync:
            while self._synced < seq:
                self._check_usable()
                if self._syncing:  # another writer's fsync is under way: it may cover us
                    self._sync.wait()
                    continue
                self._syncing = True
                target = self._appended  # every line counted here was written before
                self._sync.release()
                started = time.perf_counter()
                try:
                    os.fsync(self._fd)
                    failure = None
                except OSError as exc:
                    failure = exc
                finally:
                    self._sync.acquire()
                    self._syncing = False
                    self._sync.notify_all()
                with contextlib.suppress(Exception):
                    self.on_fsync(time.perf_counter() - started)
                if failure is not None:
                    self._failure = str(failure)
                    raise AuditUnavailable(f"cannot write audit log {self.path}: {failure}")
                self._synced = max(self._synced, target)

    def _flush_every(self, seconds: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(seconds)
            self._wake.clear()
            if self._synced < self._appended:
                # A failure is recorded (``_failure``) and reported to every later writer.
                with contextlib.suppress(AuditUnavailable):
                    self._sync_to(self._appended)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._flusher.join()
        with contextlib.suppress(AuditUnavailable):
            self._sync_to(self._appended)
        with self._lock, self._sync:
            while self._syncing:  # another thread's fsync of this descriptor is under way
                self._sync.wait()
            self._closed = True  # later writes fail instead of reaching a reused descriptor
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

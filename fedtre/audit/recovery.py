"""Serving again after the audit log could not be written (node and coordinator).

A service whose audit log (or the database it lives in) cannot be written fails closed: the
request in hand is refused, the health service reports NOT_SERVING, and a thread tries every
second to write ``audit.resumed``; once that entry is on disk (the disk has room again) the
service serves again. An I/O error is final: the log refuses until the service restarts.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog
from fedtre.errors import InternalError
from fedtre.serving import Health

HOLD = "audit log not writable"


class AuditRecovery:
    def __init__(
        self,
        audit: AuditLog,
        log: logging.Logger,
        lost_writes: Callable[[], str | None] | None = None,
        every: float = 1.0,
    ) -> None:
        self.audit = audit
        self.healths: list[Health] = []
        self.log = log
        # why writes are refused until restart (an I/O error), or None; default: the log's own
        self.lost_writes = lost_writes or (lambda: audit.lost_writes)
        self.every = every
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._since = ""
        self._failures = 0  # failed writes so far: the hold is lifted only if none came since

    def watch(self, health: Health) -> None:
        """Hold ``health`` while writing fails, from now on (and now, if it is failing)."""
        with self._lock:
            self.healths.append(health)
            if self._since:
                health.hold(HOLD)

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            self._since = self._since or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            for h in self.healths:
                h.hold(HOLD)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._retry, name="audit-recovery", daemon=True
                )
                self._thread.start()

    def _retry(self) -> None:
        while not self._stop.wait(self.every):
            if self.lost_writes() is not None:
                continue  # final: only a restart serves again
            with self._lock:
                since, failures = self._since, self._failures
            try:
                self.audit.write(Event.AUDIT_RESUMED, failed_since=since)
            except InternalError:
                continue
            with self._lock:
                if self._failures != failures:
                    continue  # another write failed meanwhile: not resumed yet, keep trying
                self._since = ""
                for h in self.healths:
                    h.release(HOLD)
                self._thread = None
            self.log.info("audit log writable again: serving", extra={"failed_since": since})
            return

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

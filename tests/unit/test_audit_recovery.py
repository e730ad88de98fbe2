"""``AuditRecovery``: a service whose audit log cannot be written reports NOT_SERVING until an
``audit.resumed`` entry is written with no other write failing meanwhile."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fedtre.audit.events import Event
from fedtre.audit.recovery import AuditRecovery
from fedtre.errors import AuditUnavailable
from fedtre.serving import Health


class FakeLog:
    """Writes fail while ``full``; ``during_write`` runs inside a write (another request)."""

    def __init__(self) -> None:
        self.full = True
        self.lost_writes: str | None = None
        self.written: list[tuple[Event, dict[str, Any]]] = []
        self.during_write: Callable[[], None] = lambda: None

    def write(self, event: Event, **fields: Any) -> int:
        self.during_write()
        if self.full:
            raise AuditUnavailable("no space")
        self.written.append((event, fields))
        return len(self.written)


def _until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _setup() -> tuple[FakeLog, Health, AuditRecovery]:
    audit = FakeLog()
    health = Health(())
    health.set(True)
    recovery = AuditRecovery(
        audit,  # type: ignore[arg-type]
        logging.getLogger("test"),
        every=0.02,
    )
    recovery.watch(health)
    return audit, health, recovery


def test_a_failed_write_holds_the_health_until_audit_resumed_is_written() -> None:
    audit, health, recovery = _setup()
    try:
        recovery.failed()
        assert not health.serving
        health.set(True)  # e.g. the trust monitor: cannot lift the hold
        assert not health.serving
        time.sleep(0.1)
        assert not health.serving and audit.written == []
        audit.full = False
        assert _until(lambda: health.serving)
        assert [e for e, _ in audit.written] == [Event.AUDIT_RESUMED]
        assert audit.written[0][1]["failed_since"]
    finally:
        recovery.stop()


def test_a_write_failing_while_resumed_is_written_keeps_the_hold() -> None:
    """Another request's write fails just as ``audit.resumed`` goes in (it took the last
    space): the service must not report SERVING, and must keep trying."""
    audit, health, recovery = _setup()
    try:
        recovery.failed()
        once = threading.Event()

        def another_request_fails() -> None:
            if not once.is_set():
                once.set()
                recovery.failed()

        audit.during_write = another_request_fails
        audit.full = False
        assert _until(lambda: len(audit.written) >= 1)
        time.sleep(0.01)
        assert _until(lambda: len(audit.written) >= 2), "stopped retrying after the race"
        assert _until(lambda: health.serving)
        assert all(e is Event.AUDIT_RESUMED for e, _ in audit.written)
    finally:
        recovery.stop()


def test_after_an_io_error_only_a_restart_serves_again() -> None:
    audit, health, recovery = _setup()
    try:
        audit.lost_writes = "disk I/O error"
        recovery.lost_writes = lambda: audit.lost_writes
        recovery.failed()
        audit.full = False
        time.sleep(0.2)
        assert not health.serving and audit.written == []
    finally:
        recovery.stop()

"""gRPC's own log lines, routed into the service's JSON log stream.

gRPC's C core writes its log lines (``E1202 06:11:31.065710  457 file.cc:2563] message``, absl's
format) straight to file descriptor 2, where they would appear unformatted inside the JSON stream
that trust IT's log collector parses. ``route_native_stderr()`` puts a pipe on descriptor 2 and
starts a small relay process (``fedtre.native_log_relay``) that turns each line into one JSON
record (``event = "grpc"``, its level, source and message) on the original stderr. Python's own
writes to ``sys.stderr`` keep going to the original descriptor.

The relay is a process, not a thread, so that nothing it does can stop the service: it never
holds the service's GIL, and when the service aborts (a fatal gRPC error) the relay still reads
the last lines the service wrote, writes them, and ends when the pipe closes. It ignores SIGINT
and SIGTERM (a service manager signals the whole group; the relay ends with the service).

A failed TLS handshake is seen only here (it happens before any call exists, so no Python
handler runs). gRPC does not say whether the connection was coming in or going out, nor from
where. The relay logs the first failure of each kind at once and then one line per kind every
``WINDOW_SECONDS`` with how many there were, and tells the service each failure's reason over
a second, non-blocking pipe; ``HandshakeDigest`` in the service audits the same way (the first of
each kind at once, then counts), so a flood of bad connections costs a few records, never a
record (and an fsync) per connection, and never blocks gRPC's own threads.

Only ``serve`` commands route descriptor 2 (a long-running service whose stderr is a log);
library users and tests are left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fedtre import logs

log = logs.get("grpc")

# absl: severity letter, MMDD, time, thread id, file:line] message
ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+([^\s\]]+)\]\s?(.*)$")
LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
HANDSHAKE_FAILED = re.compile(r"Handshake failed(?: with (?:fatal )?error)?\s*:?\s*(.*)$")
WINDOW_SECONDS = 10.0
NOTICE_FD_ENV = "FEDTRE_RELAY_NOTICE_FD"


@dataclass(frozen=True)
class NativeLine:
    level: int
    source: str  # "file.cc:123", or "" for a line not in absl's format
    message: str

    @property
    def handshake_failure(self) -> str | None:
        """The TLS library's reason when this line reports a failed handshake."""
        found = HANDSHAKE_FAILED.search(self.message)
        if found is None:
            return None
        return found.group(1).strip() or "TLS handshake failed"


def parse_native_line(text: str) -> NativeLine:
    text = text.rstrip("\r\n")
    found = ABSL_LINE.match(text)
    if found is None:
        return NativeLine(logging.WARNING, "", text)
    return NativeLine(LEVELS[found.group(1)], found.group(2), found.group(3))


class HandshakeDigest:
    """Failed handshakes, told to ``report(reason, count)``: the first of each reason at once,
    then what came since, once per window (and at ``close``). ``seen`` never blocks on
    ``report``; reports wait until a ``report`` is set (the service's audit log exists)."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self.report: Callable[[str, int], None] | None = None
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._told: set[str] = set()  # reasons reported in the current window
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="handshake-digest", daemon=True)
        self._thread.start()

    def set_report(self, report: Callable[[str, int], None]) -> None:
        """Start reporting (what was seen before is reported now)."""
        self.report = report
        self._wake.set()

    def seen(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1
            if reason not in self._told:
                self._told.add(reason)
                self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        self._drain()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(self.window):
                with self._lock:
                    self._told.clear()  # a new window: the next failure is told at once
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        report = self.report
        if report is None:
            return
        with self._lock:
            counts, self._counts = self._counts, {}
        for reason, count in counts.items():
            with contextlib.suppress(Exception):  # an audit outage must not stop the digest
                report(reason, count)


class NativeStderr:
    """Descriptor 2 through the relay process while routed; ``restore()`` undoes it."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.handshakes = HandshakeDigest()
        self._saved = -1
        self._relay: subprocess.Popen[bytes] | None = None
        self._notices: threading.Thread | None = None
        self._lock = threading.Lock()  # routed or not: restore and the relay's end

    def start(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        data_read, data_write = os.pipe()
        notice_read, notice_write = os.pipe()
        os.set_blocking(notice_write, False)  # the relay drops a notice rather than wait
        self._relay = subprocess.Popen(
            [sys.executable, "-m", "fedtre.native_log_relay", self.service],
            stdin=data_read,
            stdout=self._saved,
            stderr=self._saved,
            pass_fds=(notice_write,),
            env={**os.environ, NOTICE_FD_ENV: str(notice_write)},
            close_fds=True,
        )
        os.close(data_read)
        os.close(notice_write)
        os.dup2(data_write, 2)
        os.close(data_write)
        # Python's own stderr (warnings, a traceback, and the log handler ``serve`` sets up
        # after this) goes where descriptor 2 went before; so do fatal-error dumps.
        stream = open(self._saved, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = stream
        with contextlib.suppress(RuntimeError, ValueError):
            faulthandler.enable(file=stream)
        self._notices = threading.Thread(
            target=self._read_notices, args=(notice_read,), name="grpc-log-notices", daemon=True
        )
        self._notices.start()
        atexit.register(self.restore)

    def restore(self) -> None:
        """Put the original descriptor 2 back; the relay writes what is left and ends."""
        with self._lock:
            if self._saved < 0:
                return
            os.dup2(self._saved, 2)  # closes the pipe's only writer: the relay sees its end
            self._saved = -1
        if self._relay is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._relay.wait(timeout=5.0)
        if self._notices is not None:
            self._notices.join(timeout=2.0)
        self.handshakes.close()

    def _read_notices(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as notices:
            pending = b""
            while chunk := notices.read(65536):
                pending += chunk
                *reasons, pending = pending.split(b"\n")
                for reason in reasons:
                    self.handshakes.seen(reason.decode("utf-8", "replace"))
        # The relay has gone. If the service is still routed, it died on its own (killed, out
        # of memory): say so, and give descriptor 2 back, so that gRPC's lines are still written
        # (unformatted) rather than lost.
        with self._lock:
            if self._saved >= 0:
                os.dup2(self._saved, 2)
                log.error("grpc log relay stopped: gRPC's own lines are written unformatted now")


def route_native_stderr(service: str) -> NativeStderr:
    routed = NativeStderr(service)
    routed.start()
    return routed

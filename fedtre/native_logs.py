"""gRPC's own log lines, routed into the service's JSON log stream.

gRPC's C core writes its log lines (``E1202 06:11:31.065710  457 file.cc:2563] message``, absl's
format) straight to file descriptor 2, where they would appear unformatted inside the JSON stream
that trust IT's log collector parses. ``route_native_stderr()`` puts a pipe on descriptor 2 and
a thread that turns each line into one JSON record (``event = "grpc"``, its level, source and
message); Python's own writes to ``sys.stderr`` keep going to the original descriptor.

A failed TLS handshake is seen only here (it happens before any call exists, so no Python
handler runs): each one is also handed to ``on_handshake_failed`` with the TLS library's reason,
so that the service audits it.

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


class NativeStderr:
    """Descriptor 2 read by a thread, line by line, while routed; ``restore()`` undoes it."""

    def __init__(self) -> None:
        self.on_handshake_failed: Callable[[str], None] = lambda reason: None
        self._saved = -1
        self._reader = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._reader, writer = os.pipe()
        os.dup2(writer, 2)
        os.close(writer)
        # Python's own stderr (its log handler, warnings, a traceback) goes where descriptor 2
        # went before; so do fatal-error dumps, which must not wait on this process's reader.
        stream = open(self._saved, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        for handler in logging.getLogger("fedtre").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(stream)
        sys.stderr = stream
        with contextlib.suppress(RuntimeError, ValueError):
            faulthandler.enable(file=stream)
        self._thread = threading.Thread(target=self._read, name="grpc-log", daemon=True)
        self._thread.start()
        atexit.register(self.restore)

    def restore(self) -> None:
        """Put the original descriptor 2 back; the reader drains what is left and ends."""
        if self._saved < 0:
            return
        os.dup2(self._saved, 2)  # closes the pipe's only writer: the reader sees its end
        self._saved = -1
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._reader, 65536)
            except OSError:
                return
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw)
        if pending:
            self._emit(pending)
        os.close(self._reader)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if not text.strip():
            return
        try:
            line = parse_native_line(text)
            reason = line.handshake_failure
            if reason is not None:
                log.warning("tls.handshake_failed", extra={"source": line.source, "why": reason})
                self.on_handshake_failed(reason)
            else:
                log.log(line.level, "grpc", extra={"source": line.source, "detail": line.message})
        except Exception:  # a log line must never stop the reader (descriptor 2 would block)
            with contextlib.suppress(Exception):
                log.exception("grpc.log_line_failed")


def route_native_stderr() -> NativeStderr:
    routed = NativeStderr()
    routed.start()
    return routed

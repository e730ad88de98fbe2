"""The relay process of ``fedtre.native_logs``: reads what a service's native code writes on its
file descriptor 2 (stdin here) and writes it as JSON log records (stdout and stderr here: the
service's original stderr). Ends when the service closes the pipe (it stopped, or died).

    python -m fedtre.native_log_relay SERVICE

Failed TLS handshakes are logged once per kind per window (then a count), and each one's reason
is written to the service over the notice descriptor (``FEDTRE_RELAY_NOTICE_FD``), dropped when
the service does not keep up: the relay never waits on the service.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from fedtre import logs
from fedtre.native_logs import NOTICE_FD_ENV, WINDOW_SECONDS, parse_native_line

log = logs.get("grpc")


class Relay:
    def __init__(self, notice_fd: int, window: float = WINDOW_SECONDS) -> None:
        self.notice_fd = notice_fd
        self.window = window
        self.windows: dict[str, tuple[float, int]] = {}  # reason: (window start, not logged)

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if not text.strip():
            return
        native = parse_native_line(text)
        reason = native.handshake_failure
        if reason is None:
            log.log(native.level, "grpc", extra={"source": native.source, "detail": native.message})
            return
        self._notify(reason)
        now = time.monotonic()
        start, unlogged = self.windows.get(reason, (-self.window, 0))
        if now - start < self.window:
            self.windows[reason] = (start, unlogged + 1)
            return
        self._summary(reason, unlogged)
        log.warning("tls.handshake_failed", extra={"source": native.source, "why": reason})
        self.windows[reason] = (now, 0)

    def close(self) -> None:
        for reason, (_start, unlogged) in self.windows.items():
            self._summary(reason, unlogged)
        if self.notice_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.notice_fd)

    def _summary(self, reason: str, unlogged: int) -> None:
        if unlogged:
            log.warning(
                "tls.handshake_failed",
                extra={"why": reason, "repeated": unlogged, "within_s": self.window},
            )

    def _notify(self, reason: str) -> None:
        if self.notice_fd < 0:
            return
        try:
            os.write(self.notice_fd, reason.encode("utf-8", "replace")[:1000] + b"\n")
        except BlockingIOError:
            pass  # the service is behind: it still hears of the next one
        except OSError:
            self.notice_fd = -1  # the service is gone


def main(argv: list[str]) -> int:
    # A service manager signals the whole group: the relay ends with the service (end of pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(argv[1] if len(argv) > 1 else "fedtre")
    relay = Relay(int(os.environ.get(NOTICE_FD_ENV, "-1")))
    try:
        for raw in sys.stdin.buffer:
            relay.line(raw)
    finally:
        relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Progress of a long load, for trust IT on the node's console.

Each stage of ``fedtre node load`` prints one line with the elapsed time. While DuckDB works
inside a stage, the running statement's progress (DuckDB's ``query_progress()``) is shown: as a
``tqdm`` bar on a terminal, or, when the output is not a terminal (systemd's journal, a log
file), as a plain line every ``quiet_seconds`` so that a long stage is never silent.

Nothing here reads the data: the bar shows only how far DuckDB is through its own work.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

POLL_SECONDS = 0.2
QUIET_SECONDS = 10.0


class LoadProgress:
    """Callable with each stage's message; ``watching(con)`` polls DuckDB while the load runs."""

    def __init__(
        self,
        stream: TextIO | None = None,
        bars: bool | None = None,
        poll_seconds: float = POLL_SECONDS,
        quiet_seconds: float = QUIET_SECONDS,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bars = bool(isatty()) if bars is None else bars
        self.poll_seconds = poll_seconds
        self.quiet_seconds = quiet_seconds
        self._lock = threading.Lock()
        self._bar: Any = None
        self._stage = ""
        self._stage_started = time.monotonic()
        self._last_line = time.monotonic()

    def __call__(self, message: str) -> None:
        with self._lock:
            self._close_bar()
            print(f"  {message}", file=self.stream, flush=True)
            self._stage = message.split("] ", 1)[-1]
            self._stage_started = self._last_line = time.monotonic()

    @contextmanager
    def watching(self, con: Any) -> Iterator[None]:
        """Show the progress of statements run on ``con`` until the block ends."""
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(con, stop), daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join()
            with self._lock:
                self._close_bar()

    def _poll(self, con: Any, stop: threading.Event) -> None:
        while not stop.wait(self.poll_seconds):
            try:
                percent = float(con.query_progress())
            except Exception:  # the connection closed under us: the load is ending
                return
            with self._lock:
                self._show(percent)

    def _show(self, percent: float) -> None:
        if self.bars:
            if self._bar is None:
                self._bar = tqdm(
                    total=100,
                    desc=_short(self._stage),
                    file=self.stream,
                    leave=False,
                    bar_format="  {desc}: {percentage:3.0f}%|{bar:24}| {elapsed}",
                )
            if percent >= 0:
                self._bar.n = min(percent, 100.0)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line >= self.quiet_seconds:
            done = f"{percent:3.0f}% of the current step, " if percent >= 0 else ""
            print(
                f"  ... {_short(self._stage)}: {done}{now - self._stage_started:.0f} s so far",
                file=self.stream,
                flush=True,
            )
            self._last_line = now

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(stage: str, width: int = 48) -> str:
    return stage if len(stage) <= width else stage[: width - 3] + "..."

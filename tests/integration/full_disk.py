"""A real full disk for fault tests: a small tmpfs mounted over a directory (root only).

``fill`` writes a filler file until the filesystem refuses (ENOSPC); ``free`` removes it. On
a machine where mounting is not allowed the tests skip with a clear message, except under
CI, where they must run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, size_kib: int = 4096) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = f"cannot mount a small tmpfs for a full-disk test ({done.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(why + ": CI must run it (as root)")
        pytest.skip(why + ": run as root to test a full disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem holding ``directory``; returns the filler file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with contextlib.suppress(OSError), filler.open("ab") as f:  # the last few bytes too
        while True:
            f.write(b"\0")
            f.flush()
    return filler


def settle(database: Path) -> None:
    """Fold the write-ahead log into the database and empty it, so that the next write needs
    new space (a WAL with room inside could otherwise take a few more entries)."""
    con = sqlite3.connect(database, timeout=30)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()

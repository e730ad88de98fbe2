"""The audit log's group commit: a ``write`` returns only after an fsync that began after its
line was appended; concurrent writers share fsyncs; ``note`` lines reach the disk on their own."""

from __future__ import annotations

import os
import threading
import time

import pytest

import fedtre.audit as audit_module
from fedtre.audit import AuditLog, read_audit
from fedtre.errors import AuditUnavailable

_real_fsync = os.fsync


class SlowDisk:
    """Wraps os.fsync: records the file size each fsync saw when it began, and takes 5 ms."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.durable_size = 0  # bytes covered by completed fsyncs
        self.calls = 0

    def __call__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(0.005)
        _real_fsync(fd)
        with self.lock:
            self.calls += 1
            self.durable_size = max(self.durable_size, size)


def test_write_returns_only_when_its_line_is_durable_and_writers_share_fsyncs(
    tmp_path, monkeypatch
):
    disk = SlowDisk()
    monkeypatch.setattr(audit_module.os, "fsync", disk)
    log = AuditLog(tmp_path / "audit.jsonl", "n1", flush_seconds=60)
    late: list[str] = []

    def writer(i: int) -> None:
        for j in range(20):
            log.write("query.received", query_id=f"{i}-{j}")
            # everything up to this line's end was covered by a completed fsync
            size = os.path.getsize(tmp_path / "audit.jsonl")
            with open(tmp_path / "audit.jsonl", "rb") as f:
                text = f.read().decode()
            end = text.index(f'"query_id": "{i}-{j}"')
            end = text.index("\n", end) + 1
            if len(text[:end].encode()) > disk.durable_size:
                late.append(f"{i}-{j} returned before its fsync ({size})")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert late == []
    assert len(read_audit(tmp_path / "audit.jsonl")) == 16 * 20
    # 320 durable writes by 16 threads shared far fewer fsyncs (each takes 5 ms)
    assert disk.calls < 160


def test_noted_lines_are_flushed_without_another_write(tmp_path, monkeypatch):
    disk = SlowDisk()
    monkeypatch.setattr(audit_module.os, "fsync", disk)
    log = AuditLog(tmp_path / "audit.jsonl", "n1", flush_seconds=0.05)
    log.note("query.released", query_id="q")
    size = os.path.getsize(tmp_path / "audit.jsonl")
    deadline = time.monotonic() + 5
    while disk.durable_size < size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disk.durable_size >= size
    log.close()


def test_a_failed_fsync_is_final_for_every_later_writer(tmp_path, monkeypatch):
    """Linux reports a lost write to one fsync only: after a failure, a later fsync that
    succeeds proves nothing, so the log refuses every later write until the node restarts."""
    failures = [OSError(5, "Input/output error")]

    def once(fd: int) -> None:
        if failures:
            raise failures.pop()
        _real_fsync(fd)

    log = AuditLog(tmp_path / "audit.jsonl", "n1", flush_seconds=60)
    monkeypatch.setattr(audit_module.os, "fsync", once)
    with pytest.raises(AuditUnavailable):
        log.write("query.received", query_id="q")
    assert failures == []  # the disk "recovers"
    with pytest.raises(AuditUnavailable, match="restart"):
        log.write("query.received", query_id="r")
    with pytest.raises(AuditUnavailable, match="restart"):
        log.begin("query.received", query_id="s")
    log.close()


def test_a_failed_fsync_on_the_flusher_reaches_the_waiting_request(tmp_path, monkeypatch):
    """The request's line is fsynced by the flusher; if that fsync fails, ``wait`` must not
    report the line durable (a retried fsync would succeed and say nothing)."""
    failures = [OSError(5, "Input/output error")]

    def once(fd: int) -> None:
        if failures:
            raise failures.pop()
        _real_fsync(fd)

    monkeypatch.setattr(audit_module.os, "fsync", once)
    log = AuditLog(tmp_path / "audit.jsonl", "n1", flush_seconds=60)
    seq = log.begin("query.received", query_id="q")
    deadline = time.monotonic() + 5
    while failures and time.monotonic() < deadline:  # the flusher's fsync takes the failure
        time.sleep(0.001)
    assert failures == []
    with pytest.raises(AuditUnavailable):
        log.wait(seq)
    log.close()


def test_writes_after_close_fail_instead_of_reaching_another_file(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", "n1")
    log.close()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # may reuse the descriptor
    try:
        with pytest.raises(AuditUnavailable, match="closed"):
            log.begin("query.received", query_id="late")
        with pytest.raises(AuditUnavailable, match="closed"):
            log.write("query.received", query_id="late")
    finally:
        os.close(other)
    assert os.path.getsize(tmp_path / "other") == 0


def test_begin_starts_the_fsync_at_once_and_wait_returns_when_it_is_done(tmp_path, monkeypatch):
    disk = SlowDisk()
    monkeypatch.setattr(audit_module.os, "fsync", disk)
    log = AuditLog(tmp_path / "audit.jsonl", "n1", flush_seconds=60)  # no timed flush
    seq = log.begin("query.received", query_id="q")
    size = os.path.getsize(tmp_path / "audit.jsonl")
    deadline = time.monotonic() + 5
    while disk.durable_size < size and time.monotonic() < deadline:  # the flusher, not wait()
        time.sleep(0.001)
    assert disk.durable_size >= size
    log.note("query.released", query_id="q")
    log.wait(seq)  # already durable: returns at once
    later = log.begin("query.received", query_id="r")
    log.wait(later)
    assert disk.durable_size == os.path.getsize(tmp_path / "audit.jsonl")
    log.close()

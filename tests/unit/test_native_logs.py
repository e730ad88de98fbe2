"""gRPC's C-core log lines, relayed into the JSON stream (``fedtre.native_logs``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time

from fedtre.native_logs import HandshakeDigest, parse_native_line

HANDSHAKE = (
    "I1202 06:11:31.065710     457 ssl_transport_security.cc:2563] Handshake failed with error "
    "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
    "unable to get local issuer certificate\n"
)


def test_a_handshake_failure_is_recognised_with_the_tls_reason() -> None:
    line = parse_native_line(HANDSHAKE)
    assert line.level == logging.INFO and line.source == "ssl_transport_security.cc:2563"
    assert line.handshake_failure is not None
    assert line.handshake_failure.startswith("SSL_ERROR_SSL")
    assert "CERTIFICATE_VERIFY_FAILED" in line.handshake_failure


def test_levels_sources_and_foreign_lines() -> None:
    line = parse_native_line("E1202 06:11:31.000001  12 chttp2_server.cc:100] bind failed")
    assert (line.level, line.source, line.message) == (
        logging.ERROR,
        "chttp2_server.cc:100",
        "bind failed",
    )
    assert line.handshake_failure is None
    assert parse_native_line("W0101 00:00:00.1 1 x.cc:1] w").level == logging.WARNING
    other = parse_native_line("something a library printed")
    assert (other.level, other.source, other.message) == (
        logging.WARNING,
        "",
        "something a library printed",
    )


def _service(body: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A process of its own that routes descriptor 2 like ``serve`` does, then runs ``body``."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from fedtre import logs
        from fedtre.native_logs import route_native_stderr
        routed = route_native_stderr("node")
        logs.setup("node")
        reports = []
        routed.handshakes.set_report(lambda why, n: reports.append((why[:13], n)))
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
    )


def test_descriptor_two_becomes_json_lines_and_is_restored() -> None:
    done = _service(
        f"""
        os.write(2, {HANDSHAKE!r}.encode())
        os.write(2, b"E1202 06:11:31.000001  12 a.cc:1] partial ")
        os.write(2, b"line, then the rest\\n")
        logs.get("x").info("python's own")
        routed.restore()
        os.write(2, b"after restore\\n")
        print(reports)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('SSL_ERROR_SSL', 1)]"  # the audit hook was told
    lines = done.stderr.splitlines()
    assert lines[-1] == "after restore"  # descriptor 2 is the original again
    records = [json.loads(line) for line in lines[:-1]]  # everything before: JSON only
    events = {r["event"]: r for r in records}
    assert events["tls.handshake_failed"]["level"] == "warning"
    assert "CERTIFICATE_VERIFY_FAILED" in events["tls.handshake_failed"]["why"]
    assert events["grpc"]["detail"] == "partial line, then the rest"
    assert events["grpc"]["level"] == "error" and events["grpc"]["source"] == "a.cc:1"
    assert events["python's own"]["service"] == "node"


def test_a_flood_of_bad_handshakes_never_blocks_the_writer_and_is_counted() -> None:
    """What an unauthenticated client can cause: 20,000 failed handshakes. gRPC's threads write
    them on descriptor 2 without waiting; the log gets a few lines, the audit a few counts."""
    done = _service(
        f"""
        line = {HANDSHAKE!r}.encode()
        started = time.perf_counter()
        for _ in range(20_000):
            os.write(2, line)
        print(f"{{time.perf_counter() - started:.3f}}")
        routed.restore()
        print(sum(n for _, n in reports), len(reports))
        """,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seconds, counts = done.stdout.splitlines()
    assert float(seconds) < 10.0  # measured: well under a second; blocked writers would hang
    told, reports = (int(v) for v in counts.split())
    assert reports <= 5  # the first at once, then counts per window (and the rest at the end)
    assert 0 < told <= 20_000  # a notice may be dropped when the service is behind, never added
    logged = [json.loads(x) for x in done.stderr.splitlines()]
    failures = [r for r in logged if r["event"] == "tls.handshake_failed"]
    assert 1 <= len(failures) <= 4
    assert 1 + sum(r.get("repeated", 0) for r in failures) == 20_000  # every one counted


def test_a_fatal_line_written_just_before_an_abort_still_reaches_the_log() -> None:
    done = _service(
        """
        os.write(2, b"F1202 06:11:31.000001  12 fatal.cc:7] something fatal happened\\n")
        os.abort()
        """
    )
    assert done.returncode != 0
    records = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    fatal = [r for r in records if r.get("source") == "fatal.cc:7"]
    assert fatal and fatal[0]["level"] == "critical"
    assert fatal[0]["detail"] == "something fatal happened"


def test_the_digest_reports_the_first_at_once_then_counts_per_window() -> None:
    reports: list[tuple[str, int]] = []
    told = threading.Event()

    def report(reason: str, count: int) -> None:
        reports.append((reason, count))
        told.set()

    digest = HandshakeDigest(window=0.5)
    digest.seen("before any report")  # held until there is somewhere to report it
    digest.set_report(report)
    assert told.wait(2)
    assert reports == [("before any report", 1)]
    for _ in range(100):
        digest.seen("flood")
    time.sleep(1.2)
    digest.close()
    assert sum(n for r, n in reports if r == "flood") == 100
    assert len([r for r, _ in reports if r == "flood"]) <= 3


def test_if_the_relay_dies_the_service_says_so_and_lines_are_not_lost() -> None:
    done = _service(
        """
        import signal
        routed._relay.send_signal(signal.SIGKILL)
        routed._relay.wait()
        time.sleep(0.5)
        os.write(2, b"E1202 06:11:31.000001  12 late.cc:1] written after the relay died\\n")
        routed.restore()
        """
    )
    assert done.returncode == 0, done.stderr
    assert "grpc log relay stopped" in done.stderr
    assert "late.cc:1] written after the relay died" in done.stderr  # raw, but there

"""gRPC's C-core log lines, parsed for the JSON stream (``fedtre.native_logs``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

from fedtre.native_logs import parse_native_line

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


def test_descriptor_two_becomes_json_lines_and_is_restored(tmp_path) -> None:
    """In a process of its own (it takes over descriptor 2), like ``serve``."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from fedtre import logs
        from fedtre.native_logs import route_native_stderr
        seen = []
        routed = route_native_stderr()
        logs.setup("node")
        routed.on_handshake_failed = seen.append
        os.write(2, {HANDSHAKE!r}.encode())
        os.write(2, b"E1202 06:11:31.000001  12 a.cc:1] partial ")
        os.write(2, b"line, then the rest\\n")
        logs.get("x").info("python's own")
        routed.restore()
        os.write(2, b"after restore\\n")
        print(seen[0][:13], file=sys.stdout)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "SSL_ERROR_SSL"  # the audit hook was told
    lines = done.stderr.splitlines()
    assert lines[-1] == "after restore"  # descriptor 2 is the original again
    records = [json.loads(line) for line in lines[:-1]]  # everything before: JSON only
    events = {r["event"]: r for r in records}
    assert events["tls.handshake_failed"]["level"] == "warning"
    assert "CERTIFICATE_VERIFY_FAILED" in events["tls.handshake_failed"]["why"]
    assert events["grpc"]["detail"] == "partial line, then the rest"
    assert events["grpc"]["level"] == "error" and events["grpc"]["source"] == "a.cc:1"
    assert events["python's own"]["service"] == "node"

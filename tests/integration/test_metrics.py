"""The node's local metrics endpoint, scraped after real queries over gRPC: its counters match
the audit log, its ε gauges match the ledger, and ``/healthz`` answers plain-text probes."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from fedtre.audit.log import read_audit
from fedtre.cli import main
from fedtre.metrics_http import health_command
from fedtre.v2 import node_pb2 as npb
from fedtre.v2 import node_pb2_grpc
from node.config import parse_node_config
from node.ledger import project_scope
from node.server import create_server
from tests.conftest import private_database

SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


def _config(tmp_path: Path, node_db: Path):  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = {
        "node_id": "trust-m",
        "database": str(private_database(tmp_path, node_db)),
        "state_dir": str(tmp_path / "state"),
        "node_epsilon_ceiling": 10.0,
        "answer_slot_ms": 5,
        "projects": {
            "study": {
                "total_epsilon": 5.0,
                "max_epsilon_per_query": 1.0,
                "views": ["patients"],
                "max_tier": "general",
            }
        },
        "server": {"listen": "127.0.0.1:0", "coordinator": "hub"},
        "metrics": {"listen": "127.0.0.1:0"},
    }
    return parse_node_config(data, base_dir=tmp_path, source="test")


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


def test_metrics_match_the_audit_log_and_the_ledger(
    tmp_path: Path, node_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = create_server(_config(tmp_path, node_db), insecure=True)
    base = f"http://{running.metrics_address}"
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            for i in range(3):
                prepared = stub.Prepare(
                    npb.PrepareRequest(
                        query_id=f"m-{i}", project_id="study", sql=SQL, epsilon_units=200_000
                    ),
                    timeout=10,
                )
                assert prepared.outcome == npb.OUTCOME_PREPARED
                stub.Commit(npb.DecisionRequest(query_id=f"m-{i}", project_id="study"), timeout=10)
            stub.Commit(npb.DecisionRequest(query_id="m-0", project_id="study"), timeout=10)
            refused = stub.Prepare(
                npb.PrepareRequest(query_id="x", project_id="nope", sql=SQL, epsilon_units=1000),
                timeout=10,
            )
            assert refused.outcome == npb.OUTCOME_REFUSED
        text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        log = [r["event"] for r in read_audit(running.engine.config.audit_path)]
        committed = _metric(text, "fedtre_node_requests_total", call="commit", outcome="committed")
        assert committed == log.count("query.released") + log.count("query.replayed") == 4
        assert _metric(text, "fedtre_node_requests_total", call="prepare", outcome="prepared") == 3
        assert _metric(text, "fedtre_node_requests_total", call="prepare", outcome="refused") == 1
        assert log.count("query.refused") == 1
        assert _metric(text, "fedtre_node_request_seconds_count", call="prepare") == 4
        spent = running.engine.ledger.spent(project_scope("study")) / 1e6
        assert _metric(text, "fedtre_node_epsilon_spent", project="study") == spent == 0.6
        assert _metric(text, "fedtre_node_epsilon_left", project="study") == 5.0 - spent
        # write times: a full-sync ledger transaction per commit call (a replayed commit
        # changes nothing), normal ones for the rest; the audit entries written on their own
        full = _metric(text, "fedtre_node_ledger_write_seconds_count", sync="full")
        assert full == log.count("query.released") + log.count("query.replayed") == 4
        assert _metric(text, "fedtre_node_ledger_write_seconds_count", sync="normal") >= 3
        written = _metric(text, "fedtre_node_audit_write_seconds_count", sync="full")
        written += _metric(text, "fedtre_node_audit_write_seconds_count", sync="normal")
        assert 1 <= written <= len(log)
        assert "SELECT" not in text and "female" not in text  # no query text, no values
        host, port = running.metrics_address.rsplit(":", 1)
        with socket.create_connection((host, int(port))):  # a client that sends nothing
            started = time.monotonic()
            health = urllib.request.urlopen(f"{base}/healthz", timeout=10)
            assert time.monotonic() - started < 2.0  # not held up by the idle connection
        assert health.status == 200 and health.read() == b"SERVING\n"
        # `fedtre node health` asks the same endpoint (a wildcard listen: on loopback)
        port = running.metrics_address.rsplit(":", 1)[1]
        assert health_command(f"0.0.0.0:{port}", Path("node.toml")) == 0
        assert capsys.readouterr().out == "SERVING\n"
        running.health.set(False)
        assert health_command(running.metrics_address, Path("node.toml")) == 1
        assert capsys.readouterr().out == "NOT SERVING: NOT_SERVING\n"
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=10)
            raise AssertionError("NOT_SERVING must not answer 200")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and exc.read() == b"NOT_SERVING\n"
    finally:
        running.stop(grace=1)


def test_coordinator_metrics_count_queries_and_show_each_trust(
    tmp_path: Path, node_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Development mode (plaintext) in one process: a node, a coordinator with metrics, and a
    researcher client; the coordinator's counters follow its queries and its trust gauge the
    node going away."""
    from coordinator.config import parse_coordinator_config
    from coordinator.server import create_server as create_coordinator
    from fedtre.client import Client, Profile

    node = create_server(_config(tmp_path / "n", node_db), insecure=True)
    config = parse_coordinator_config(
        {
            "coordinator_id": "hub",
            "listen": "127.0.0.1:0",
            "state_dir": str(tmp_path / "hub"),
            "nodes": {"trust-m": {"address": node.address}},
            "projects": {"study": {"researchers": ["dev"], "max_epsilon_per_query": 1.0}},
            "metrics": {"listen": "127.0.0.1:0"},
        },
        tmp_path,
        "test",
    )
    hub = create_coordinator(config, insecure=True)
    base = f"http://{hub.metrics_address}"
    try:
        with Client(Profile(hub.address, "hub", None), timeout=30) as client:
            for _ in range(2):
                assert client.query("study", SQL, 0.1).released
        text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        assert _metric(text, "fedtre_coordinator_queries_total", outcome="released") == 2
        assert _metric(text, "fedtre_coordinator_query_seconds_count") == 2
        assert _metric(text, "fedtre_coordinator_trust_up", trust="trust-m") == 1
        assert _metric(text, "fedtre_coordinator_audit_write_seconds_count", sync="full") >= 2
        assert urllib.request.urlopen(f"{base}/healthz", timeout=10).status == 200
        # `fedtre coordinator trusts`: each trust's link, from the running coordinator
        toml = tmp_path / "hub.toml"
        toml.write_text(
            f'coordinator_id = "hub"\nlisten = "127.0.0.1:0"\nstate_dir = "{tmp_path / "hub"}"\n'
            f'[metrics]\nlisten = "{hub.metrics_address}"\n'
            f'[nodes.trust-m]\naddress = "{node.address}"\n'
            '[projects.study]\nresearchers = ["dev"]\nmax_epsilon_per_query = 1.0\n'
        )
        assert main(["coordinator", "trusts", "--config", str(toml)]) == 0
        shown = capsys.readouterr().out
        assert re.search(r"^trust-m\s+up\s+\d{4}-\d\d-\d\d", shown, re.M), shown
        assert "projects waiting for trusts: none" in shown
        node.stop(grace=1)  # the trust goes away: the monitor notices within a few seconds
        deadline = time.monotonic() + 15
        while True:
            text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
            if _metric(text, "fedtre_coordinator_trust_up", trust="trust-m") == 0:
                break
            assert time.monotonic() < deadline, "the trust still shows as up"
            time.sleep(0.2)
        assert main(["coordinator", "trusts", "--config", str(toml), "--format", "json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["trusts"][0]["trust"] == "trust-m" and not report["trusts"][0]["up"]
        assert report["trusts"][0]["reason"] and report["projects_waiting"] == ["study"]
    finally:
        hub.stop(grace=1)
        node.stop(grace=1)


def test_the_health_command_says_what_is_missing_or_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = Path(__file__).parents[2] / "deploy" / "node.example.toml"
    text = example.read_text()
    committee = example.with_name("committee.example.toml")
    (tmp_path / committee.name).write_bytes(committee.read_bytes())
    config = tmp_path / "node.toml"
    config.write_text(text.replace('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:1"'))
    assert main(["node", "health", "--config", str(config)]) == 1  # nothing listens there
    assert "NOT SERVING: no answer at http://127.0.0.1:1/healthz" in capsys.readouterr().out
    config.write_text(text.replace("[metrics]", "").replace('listen = "127.0.0.1:9464"', ""))
    assert main(["node", "health", "--config", str(config)]) == 3
    assert "has no [metrics] listen" in capsys.readouterr().err


def test_the_endpoint_bounds_what_a_flood_or_a_trickle_can_hold() -> None:
    from prometheus_client import CollectorRegistry

    from fedtre.metrics_http import MAX_CONNECTIONS, serve_metrics

    server, port = serve_metrics("127.0.0.1:0", CollectorRegistry(), lambda: True, 0.5)
    try:
        # a client trickling one byte at a time is cut after connection_seconds, not kept
        trickle = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        trickle.settimeout(0.1)
        cut = False
        while time.monotonic() - started < 5:
            try:
                trickle.sendall(b"G")
                if trickle.recv(1) == b"":
                    cut = True
                    break
            except TimeoutError:
                continue
            except OSError:
                cut = True
                break
        trickle.close()
        assert cut and time.monotonic() - started < 2.0
        # a flood of silent connections: beyond the cap they are closed at once
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 8)]
        time.sleep(0.2)
        closed = 0
        for s in flood:
            s.settimeout(0.05)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        assert closed >= 8
        time.sleep(1.0)  # every held connection is cut within connection_seconds
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status == 200
        for s in flood:
            s.close()
    finally:
        server.shutdown()

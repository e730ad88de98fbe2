"""Audit logs: verify, export and reconcile at scale, and what auditing costs a release.

    python -m benchmarks.audit [--entries 1000000] [--queries 100000] [--against REV]

* **verify**: a log of ``--entries`` realistic node entries (requests, reservations, stored
  answers, commits, releases with their release records); ``fedtre audit verify`` against a
  checkpoint at its end, median of 3, beside the floor in the same process: reading the same
  rows from SQLite and hashing each once (no chain logic);
* **export** of the same log to CSV, and **reconcile** of a coordinator log and three trusts'
  logs and ledgers holding ``--queries`` released queries each (years of activity);
* **the release path**: a 20,000-person trust, ``NodeEngine.answer`` with the answer slot at
  0 against the plain DuckDB query in the same process (interleaved, medians), and the fsyncs
  per release counted with ``strace`` (if installed). ``--against REV`` runs the same
  measurement on another commit (a git worktree, its own process) for the before/after.

Writes ``benchmarks/audit_latest.json`` and prints Markdown for RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from fedtre.audit.checkpoint import public_hex, sign_checkpoint  # noqa: E402
from fedtre.audit.events import Event  # noqa: E402
from fedtre.audit.export import Filters, export  # noqa: E402
from fedtre.audit.log import AuditLog  # noqa: E402
from fedtre.audit.reconcile import reconcile  # noqa: E402
from fedtre.audit.verify import verify  # noqa: E402

SQL = "SELECT condition_group, COUNT(*) AS n FROM conditions GROUP BY condition_group"
RELEASE = {
    "record": 1,
    "software": "fedtre 0.1.0",
    "catalog_version": "omop-mh-1",
    "reference_date": "2026-01-01",
    "data_as_of": "2026-11-30",
    "approval": "ab" * 32,
    "plan": "cd" * 32,
    "view": "conditions",
    "group_by": ["condition_group"],
    "cells": 12,
    "epsilon_units": 250_000,
    "released_at": "2026-12-02T10:00:00+00:00",
    "aggregates": [
        {
            "alias": "n",
            "kind": "count",
            "column": None,
            "lower": None,
            "upper": None,
            "measurements": [
                {
                    "statistic": "count",
                    "mechanism": "discrete_laplace",
                    "sensitivity": 25,
                    "noise_scale": 100.0,
                    "epsilon_units": 250_000,
                }
            ],
        }
    ],
}


def _node_cycle(log: AuditLog, con: sqlite3.Connection, i: int, project: str = "study") -> int:
    q = {"query_id": f"q-{i:08d}", "project": project, "caller": "coordinator:hub"}
    log.append(con, Event.QUERY_RECEIVED, **q, epsilon=0.25, sql=SQL)
    log.append(con, Event.QUERY_RESERVED, **q, epsilon_units=250_000)
    log.append(con, Event.QUERY_PREPARED, **q, epsilon_units=250_000)
    log.append(con, Event.QUERY_COMMIT, **q)
    log.append(con, Event.QUERY_RELEASED, **q, epsilon_units=250_000, release=RELEASE)
    return 5


def build_node_log(path: Path, entries: int, key: Ed25519PrivateKey) -> AuditLog:
    log = AuditLog(path, "trust-a", public_key=public_hex(key))
    con = log._con()
    written, i = 1, 0
    while written < entries:
        con.execute("BEGIN IMMEDIATE")
        for _ in range(10_000):
            if written + 5 > entries:
                break
            written += _node_cycle(log, con, i)
            i += 1
        con.execute("COMMIT")
        if written + 5 > entries:
            break
    while written < entries:
        log.note(Event.BUDGET_REQUESTED, project="study", caller="coordinator:hub")
        written += 1
    return log


def floor_scan(path: Path) -> float:
    """Read every entry and hash it once: what any verification must at least do."""
    started = time.perf_counter()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    sha = hashlib.sha256
    for _seq, entry, _link in con.execute("SELECT seq, entry, link FROM audit_log ORDER BY seq"):
        sha(entry.encode()).digest()
    con.close()
    return time.perf_counter() - started


def bench_log(work: Path, entries: int) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    path = work / "ledger.sqlite"
    started = time.perf_counter()
    log = build_node_log(path, entries, key)
    checkpoint = sign_checkpoint(log, key)
    log.close()
    build_s = time.perf_counter() - started
    print(f"built a log of {checkpoint.size:,} entries in {build_s:.1f} s", file=sys.stderr)
    verify_s, floor_s = [], []
    for _ in range(3):
        started = time.perf_counter()
        result = verify(path, [checkpoint])
        verify_s.append(time.perf_counter() - started)
        assert result.ok and result.checkpoints == 1, result.problems
        floor_s.append(floor_scan(path))
    started = time.perf_counter()
    rows = export([path], Filters(), "csv", work / "export.csv")
    export_s = time.perf_counter() - started
    return {
        "entries": checkpoint.size,
        "bytes": path.stat().st_size,
        "verify_s": statistics.median(verify_s),
        "floor_s": statistics.median(floor_s),
        "verify_runs_s": verify_s,
        "export_csv_s": export_s,
        "export_rows": rows,
    }


def bench_reconcile(work: Path, queries: int) -> dict[str, Any]:
    hub = AuditLog(work / "hub.sqlite", "hub", role="coordinator")
    con = hub._con()
    trusts = ["trust-a", "trust-b", "trust-c"]
    spent = dict.fromkeys(trusts, 250_000)
    answered = dict.fromkeys(trusts, "answered")
    for start in range(0, queries, 10_000):
        con.execute("BEGIN IMMEDIATE")
        for i in range(start, min(queries, start + 10_000)):
            q = {"query_id": f"q-{i:08d}", "project": "study", "researcher": "alice"}
            hub.append(con, Event.QUERY_RECEIVED, **q, epsilon=0.25, sql=SQL)
            hub.append(
                con,
                Event.QUERY_RELEASED,
                **q,
                trusts=answered,
                spent_epsilon_units=spent,
                replayed=[],
                release=RELEASE,
            )
        con.execute("COMMIT")
    hub.close()
    paths = []
    for name in trusts:
        path = work / name / "ledger.sqlite"
        from node.ledger import Ledger  # the real schema

        Ledger(path)
        log = AuditLog(path, name)
        con = log._con()
        for start in range(0, queries, 10_000):
            con.execute("BEGIN IMMEDIATE")
            for i in range(start, min(queries, start + 10_000)):
                _node_cycle(log, con, i)
                con.execute(
                    "INSERT INTO queries (project_id, query_id, fingerprint, units, scopes, "
                    "state, reserved_at, decided_at) VALUES ('study', ?, 'fp', 250000, "
                    "'[]', 'committed', '2026-12-02T10:00:00', '2099-01-01T00:00:00+00:00')",
                    (f"q-{i:08d}",),
                )
            con.execute("COMMIT")
        log.close()
        paths.append(path)
    started = time.perf_counter()
    found = reconcile([work / "hub.sqlite"], paths)
    seconds = time.perf_counter() - started
    assert found.ok, found.discrepancies[:3]
    entries = 2 * queries + 1 + 3 * (5 * queries + 1)
    return {"queries": queries, "entries": entries, "reconcile_s": seconds}


RELEASE_PATH = textwrap.dedent(
    """
    import json, statistics, sys, tempfile, time, uuid
    from pathlib import Path
    sys.path.insert(0, ROOT)
    import duckdb
    from benchmarks.run import node_config
    from fedtre.request import QueryRequest
    from node.config import load_node_config
    from node.engine import NodeEngine
    db, rounds = Path(DB), ROUNDS
    node_sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
    plain_sql = "SELECT sex, COUNT(*) FROM patients GROUP BY sex"
    with tempfile.TemporaryDirectory() as tmp:
        engine = NodeEngine(load_node_config(node_config(db, Path(tmp))))
        plain = duckdb.connect(str(db), read_only=True)
        node_ms, plain_ms = [], []
        try:
            for i in range(rounds + 5):
                t = time.perf_counter()
                plain.execute(plain_sql).fetchall()
                p = time.perf_counter() - t
                t = time.perf_counter()
                engine.answer(QueryRequest(query_id=f"b-{uuid.uuid4()}", project_id="bench",
                                           sql=node_sql, epsilon=0.01, caller="bench"))
                n = time.perf_counter() - t
                if i >= 5:
                    node_ms.append(n * 1000); plain_ms.append(p * 1000)
        finally:
            engine.close()
            plain.close()
    print(json.dumps({"node_ms": statistics.median(node_ms),
                      "plain_ms": statistics.median(plain_ms),
                      "ratios": sorted(n / p for n, p in zip(node_ms, plain_ms))}))
    """
)


def release_path(root: Path, db: Path, rounds: int) -> dict[str, Any]:
    """Timing (no tracer), then the fsyncs per release counted under strace (a shorter run:
    the tracer slows every system call)."""

    def code(n: int) -> list[str]:
        text = RELEASE_PATH.replace("ROOT", repr(str(root))).replace("DB", repr(str(db)))
        return [sys.executable, "-c", text.replace("ROUNDS", str(n))]

    done = subprocess.run(code(rounds), capture_output=True, text=True, check=True, cwd=root)
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    ratios = out.pop("ratios")
    out["ratio"] = out["node_ms"] / out["plain_ms"]
    out["ratio_p10_p90"] = [ratios[len(ratios) // 10], ratios[(9 * len(ratios)) // 10]]
    if shutil.which("strace"):
        n = 50
        with tempfile.NamedTemporaryFile(suffix=".strace") as trace:
            subprocess.run(
                ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", trace.name, *code(n)],
                capture_output=True,
                text=True,
                check=True,
                cwd=root,
            )
            calls = 0
            for line in Path(trace.name).read_text().splitlines():
                parts = line.split()
                if parts and parts[-1] in ("fsync", "fdatasync"):
                    calls += int(parts[3])
        out["fsyncs_per_release"] = calls / (n + 5)  # (5 warm-up releases)
    return out


def trust_database(work: Path, persons: int) -> Path:
    from fedtre.catalog import load_catalog
    from fedtre.synthetic import generate
    from node.loader import load_omop

    cached = HERE / "data" / f"audit-trust-{persons}.duckdb"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        generate(work / "omop", persons, seed=1)
        load_omop(work / "omop", cached, load_catalog())
    return cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--persons", type=int, default=20_000)
    parser.add_argument("--against", help="another commit to measure the release path on")
    parser.add_argument("--repeats", type=int, default=3, help="runs per commit, alternating")
    parser.add_argument("--skip-log", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_log:
            results["log"] = bench_log(work / "log", args.entries)
            (work / "rec").mkdir()
            results["reconcile"] = bench_reconcile(work / "rec", args.queries)
        db = trust_database(work, args.persons)
        paths: dict[str, list[dict[str, Any]]] = {"this": []}
        tree = work / "against"
        if args.against:
            paths[args.against] = []
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tree), args.against],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
        try:
            for _ in range(args.repeats):  # alternating, so that load hits both alike
                paths["this"].append(release_path(ROOT, db, args.rounds))
                if args.against:
                    paths[args.against].append(release_path(tree, db, args.rounds))
        finally:
            if args.against:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
                )
        results["release_path"] = {
            name: {
                "node_ms": statistics.median(r["node_ms"] for r in runs),
                "plain_ms": statistics.median(r["plain_ms"] for r in runs),
                "ratio": statistics.median(r["ratio"] for r in runs),
                "ratio_p10_p90": runs[len(runs) // 2]["ratio_p10_p90"],
                "ratios_per_run": [round(r["ratio"], 3) for r in runs],
                "fsyncs_per_release": runs[0].get("fsyncs_per_release"),
            }
            for name, runs in paths.items()
        }
    latest = HERE / "audit_latest.json"
    if args.skip_log and latest.exists():  # keep the log figures of the last full run
        results = {**json.loads(latest.read_text()), **results}
    latest.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


def markdown(r: dict[str, Any]) -> str:
    lines = []
    if "log" in r:
        g = r["log"]
        lines += [
            f"- verify of {g['entries']:,} entries ({g['bytes'] / 1e6:.0f} MB), against a "
            f"checkpoint: **{g['verify_s']:.2f} s** (runs: "
            + ", ".join(f"{s:.2f}" for s in g["verify_runs_s"])
            + f"); floor (read and hash each entry once) {g['floor_s']:.2f} s: "
            f"{g['verify_s'] / g['floor_s']:.2f}× the floor",
            f"- export of the same log to CSV: {g['export_csv_s']:.1f} s "
            f"({g['export_rows'] / g['export_csv_s']:,.0f} entries/s)",
        ]
    if "reconcile" in r:
        c = r["reconcile"]
        lines.append(
            f"- reconcile of {c['queries']:,} released queries (a coordinator and three "
            f"trusts, {c['entries']:,} entries): {c['reconcile_s']:.1f} s"
        )
    for name, p in r["release_path"].items():
        fs = p.get("fsyncs_per_release")
        lines.append(
            f"- release path ({name}): node {p['node_ms']:.2f} ms, plain DuckDB "
            f"{p['plain_ms']:.2f} ms, **{p['ratio']:.2f}×** (p10–p90 "
            f"{p['ratio_p10_p90'][0]:.2f}–{p['ratio_p10_p90'][1]:.2f}; per run "
            + ", ".join(f"{x:.2f}" for x in p["ratios_per_run"])
            + ")"
            + (f"; {fs:.2f} fsync/fdatasync calls per release" if fs is not None else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Node speed against plain DuckDB, per query shape, with the time breakdown and throughput.

    python -m benchmarks.speed [--persons 1000000 3000000] [--rounds 21] [--callers 16]
    python -m benchmarks.speed --persons 10000000 --memory-limit 4GB   # 10M: on demand

For each size, the synthetic trust (``fedtre synth --seed 1``) is generated and loaded once,
under ``benchmarks/data/trust-N/`` (``fedtre node load`` in a child process: its wall time,
rows per second and peak RSS are reported). Then, in one process, on the node's own DuckDB
connection (same file, same settings), interleaved round by round:

* **user**: the plain query a DuckDB user would write for the same question without DP (no
  per-person cap, no clamping): the goal;
* **same answer**: the node's compiled SQL run as a plain query: the fastest query that gives
  the node's exact answer (it reads the loader's cap flags and clamped copies), so the ratio
  full ÷ same answer is the node's own overhead;
* **node**: ``NodeEngine.answer`` with a fresh query id, the whole path a remote query takes
  (audit, checks, ledger reservation, DuckDB, OpenDP noise, stored answer, commit with its
  audit entry), answer slot 0
  (the slot is a deliberate wait, measured by ``benchmarks/timing.py``).

Each shape reports both ratios (ratio of medians, and the 10th-90th percentile of per-round
ratios), the fixed cost (node - same answer, median), where the node's time goes, and, with
16 callers on threads against one engine, queries per second and latency percentiles.
Writes ``benchmarks/speed_latest.json`` and prints Markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import node_config  # noqa: E402
from fedtre.request import QueryRequest  # noqa: E402
from node.config import load_node_config  # noqa: E402
from node.engine import NodeEngine  # noqa: E402

PROJECT = "bench"  # the project benchmarks.run.node_config declares


@dataclass(frozen=True)
class Shape:
    name: str
    fedtre: str  # what the researcher sends
    user: str  # what a DuckDB user would write for the same question without DP


SHAPES = (
    Shape(
        "patients: sex, COUNT, AVG(age)",
        "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM patients GROUP BY sex",
        "SELECT sex, COUNT(*), AVG(age) FROM patients GROUP BY sex",
    ),
    Shape(
        "conditions: group COUNT (cap 25)",
        "SELECT condition_group, COUNT(*) AS n FROM conditions GROUP BY condition_group",
        "SELECT condition_group, COUNT(*) FROM conditions GROUP BY condition_group",
    ),
    Shape(
        "visits: type COUNT+SUM, year >= 2015",
        "SELECT visit_type, COUNT(*) AS n, SUM(length_of_stay) AS days FROM visits "
        "WHERE year >= 2015 GROUP BY visit_type",
        "SELECT visit_type, COUNT(*), SUM(length_of_stay) FROM visits WHERE year >= 2015 "
        "GROUP BY visit_type",
    ),
    Shape(
        "conditions: group x setting",
        "SELECT condition_group, setting, COUNT(*) AS n FROM conditions "
        "GROUP BY condition_group, setting",
        "SELECT condition_group, setting, COUNT(*) FROM conditions "
        "GROUP BY condition_group, setting",
    ),
    Shape(
        "cohort prevalence (user: EXISTS)",
        "SELECT age_band, COUNT(*) AS n FROM patients WHERE person_id IN "
        "(SELECT person_id FROM conditions WHERE condition_group = 'depression') "
        "GROUP BY age_band",
        "SELECT age_band, COUNT(*) FROM patients p WHERE EXISTS (SELECT 1 FROM conditions c "
        "WHERE c.person_id = p.person_id AND c.condition_group = 'depression') "
        "GROUP BY age_band",
    ),
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--persons", type=int, nargs="+", default=[1_000_000, 3_000_000])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per shape")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--concurrency-seconds", type=float, default=10.0)
    parser.add_argument("--memory-limit", default=None, help="for fedtre node load")
    parser.add_argument("--out", type=Path, default=HERE / "speed_latest.json")
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, DuckDB {duckdb.__version__}",
        "sizes": [],
    }
    for persons in args.persons:
        db, load = prepare(persons, args.memory_limit)
        with tempfile.TemporaryDirectory() as tmp:
            engine = NodeEngine(load_node_config(node_config(db, Path(tmp), "mental_health")))
            try:
                size = {"persons": persons, "load": load}
                size["shapes"] = measure_shapes(engine, args.rounds)
                size["breakdown"] = breakdown(engine, args.rounds)
                size["throughput"] = throughput(engine, args.callers, args.concurrency_seconds)
            finally:
                engine.close()
        results["sizes"].append(size)
        args.out.write_text(json.dumps(results, indent=2))
        print(report(size), flush=True)
    return 0


def prepare(persons: int, memory_limit: str | None) -> tuple[Path, dict[str, Any]]:
    """The node database for ``persons`` (generated and loaded once), and how the load went."""
    data = HERE / "data" / f"trust-{persons}"
    db = data / "node.duckdb"
    facts = data / "load.json"
    if db.exists() and facts.exists():
        return db, json.loads(facts.read_text())
    if not (data / "omop").exists():
        print(f"generating {persons:,} persons ...", file=sys.stderr, flush=True)
        from fedtre.synthetic import generate

        generate(data / "omop", persons, seed=1)
    command = [sys.executable, "-m", "fedtre.cli", "node", "load"]
    command += ["--source", str(data / "omop"), "--out", str(db)]
    if memory_limit:
        command += ["--memory-limit", memory_limit]
    print(f"loading: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    out = child.stdout.read() if child.stdout else ""
    if status != 0:
        raise SystemExit(f"load failed:\n{out}")
    con = duckdb.connect(str(db), read_only=True)
    rows = sum(
        con.execute(f'SELECT count(*) FROM "{v}"').fetchone()[0]  # type: ignore[index]
        for v in ("patients", "conditions", "visits")
    )
    con.close()
    load = {
        "seconds": seconds,
        "stored_rows": rows,
        "rows_per_second": rows / seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "memory_limit": memory_limit or "default",
    }
    facts.write_text(json.dumps(load, indent=2))
    return db, load


def _request(sql: str) -> QueryRequest:
    return QueryRequest(str(uuid.uuid4()), PROJECT, sql, 1.0, "bench")


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_shapes(engine: NodeEngine, rounds: int) -> list[dict[str, Any]]:
    cursor = engine.database.cursor()
    out = []
    for shape in SHAPES:
        compiled = engine.planner.prepare(_request(shape.fedtre)).compiled
        arms: dict[str, Callable[[], object]] = {
            "user": lambda s=shape: cursor.execute(s.user).fetchall(),
            "same": lambda c=compiled: cursor.execute(c.sql, list(c.params)).fetchall(),
            "node": lambda s=shape: engine.answer(_request(s.fedtre)),
        }
        for fn in arms.values():  # warm up: caches, DuckDB buffers
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in arms}
        order = list(arms)
        for r in range(rounds):  # interleaved, the order rotating each round
            for name in order[r % 3 :] + order[: r % 3]:
                times[name].append(_timed(arms[name]))
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out.append(
            {
                "shape": shape.name,
                "median_ms": med,
                "range_ms": {k: [min(v) * 1000, max(v) * 1000] for k, v in times.items()},
                "node_vs_user": med["node"] / med["user"],
                "node_vs_user_p10_p90": _ratio_spread(times["node"], times["user"]),
                "node_vs_same": med["node"] / med["same"],
                "node_vs_same_p10_p90": _ratio_spread(times["node"], times["same"]),
                "same_vs_user": med["same"] / med["user"],
                "fixed_cost_ms": med["node"] - med["same"],
            }
        )
        print(f"  {shape.name}: {json.dumps(out[-1]['median_ms'])}", file=sys.stderr, flush=True)
    cursor.close()
    return out


def _ratio_spread(a: list[float], b: list[float]) -> list[float]:
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    return [ratios[len(ratios) // 10], ratios[(len(ratios) * 9) // 10]]


class _Stopwatch:
    """Wraps named callables of the engine's parts, adds up the time spent in each, and puts
    the originals back."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        own = attr in vars(owner)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - started

        setattr(owner, attr, timed)
        self._undo.append(
            (lambda: setattr(owner, attr, original)) if own else (lambda: delattr(owner, attr))
        )

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def breakdown(engine: NodeEngine, rounds: int) -> list[dict[str, Any]]:
    """Where the node's time goes, per shape (mean ms per query over ``rounds`` queries)."""
    import node.engine as engine_module

    out = []
    for shape in (SHAPES[0], SHAPES[1]):
        watch = _Stopwatch()
        watch.wrap(engine.planner, "prepare", "checks and plan (cached)")
        watch.wrap(engine.ledger, "entry", "ledger lookup")
        watch.wrap(engine.ledger, "reserve", "ledger reservation (no fsync wait)")
        watch.wrap(engine.ledger, "prepare", "ledger stored answer (no fsync wait)")
        watch.wrap(engine.ledger, "commit", "ledger commit (fsync)")
        # (a state change's audit entry is inside its ledger transaction, timed above)
        watch.wrap(engine.audit, "note", "audit request entries (commit, no fsync wait)")
        watch.wrap(engine.audit, "write", "audit entries made durable on their own")
        watch.wrap(engine, "_run", "DuckDB")
        watch.wrap(engine_module, "release", "OpenDP noise")
        whole = 0.0
        try:
            for _ in range(rounds):
                whole += _timed(lambda s=shape: engine.answer(_request(s.fedtre)))
        finally:
            watch.restore()
        parts = {k: v / rounds * 1000 for k, v in watch.total.items()}
        parts["the rest (Python: result, JSON, bookkeeping)"] = whole / rounds * 1000 - sum(
            parts.values()
        )
        out.append({"shape": shape.name, "total_ms": whole / rounds * 1000, "parts_ms": parts})
    return out


def throughput(engine: NodeEngine, callers: int, seconds: float) -> list[dict[str, Any]]:
    """``callers`` threads, each answering queries back to back for ``seconds``."""
    return [
        _load_test(engine, label, shapes, callers, seconds)
        for label, shapes in (("patients shape", SHAPES[:1]), ("all five shapes, in turn", SHAPES))
    ]


def _load_test(
    engine: NodeEngine, label: str, shapes: tuple[Shape, ...], callers: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(callers + 1)
    stop = threading.Event()

    def caller(i: int) -> None:
        mine = []
        start.wait()
        while not stop.is_set():
            sql = shapes[(i + len(mine)) % len(shapes)].fedtre
            mine.append(_timed(lambda sql=sql: engine.answer(_request(sql))))
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    began = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "workload": label,
        "callers": callers,
        "queries": len(latencies),
        "queries_per_second": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def report(size: dict[str, Any]) -> str:
    load = size["load"]
    lines = [
        f"### {size['persons']:,} persons",
        "",
        f"Load: {load['seconds']:.1f} s, {load['stored_rows']:,} rows stored, "
        f"{load['rows_per_second']:,.0f} rows/s, peak RSS {load['peak_rss_mb']:,.0f} MB "
        f"(memory limit {load['memory_limit']}).",
        "",
        "| query shape | user ms | same-answer ms | node ms | node ÷ user (p10–p90) | "
        "node ÷ same answer (p10–p90) | fixed cost ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in size["shapes"]:
        m = s["median_ms"]
        a, b = s["node_vs_user_p10_p90"], s["node_vs_same_p10_p90"]
        lines.append(
            f"| {s['shape']} | {m['user']:.2f} | {m['same']:.2f} | {m['node']:.2f} | "
            f"**{s['node_vs_user']:.2f}×** ({a[0]:.2f}–{a[1]:.2f}) | "
            f"**{s['node_vs_same']:.2f}×** ({b[0]:.2f}–{b[1]:.2f}) | {s['fixed_cost_ms']:.2f} |"
        )
    for b in size["breakdown"]:
        lines += ["", f"Where the node's time goes, {b['shape']} ({b['total_ms']:.2f} ms):", ""]
        lines += [f"- {k}: {v:.3f} ms" for k, v in b["parts_ms"].items()]
    lines += ["", "| workload | callers | q/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for t in size["throughput"]:
        lines.append(
            f"| {t['workload']} | {t['callers']} | **{t['queries_per_second']:.0f}** | "
            f"{t['p50_ms']:.1f} | {t['p99_ms']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

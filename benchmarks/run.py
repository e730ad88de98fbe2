"""Node benchmarks: DP query time against plain DuckDB, and against SmartNoise SQL.

    python benchmarks/run.py [--persons 1000000] [--repeats 30] [--no-smartnoise]

Generates (once, cached under benchmarks/data/) a synthetic trust, loads it, then measures in
the same process:

* plain DuckDB on the same node database file, the same aggregate, no bounding, no noise;
* the node's full path (audit fsync, parse, scope and budget checks, compiled SQL with
  contribution bounding, OpenDP noise, durable ledger commit, audit fsync);
* the node's compute alone (compile, run, noise) to show where the time goes;
* SmartNoise SQL (own virtualenv and process, see smartnoise_env.py) on the same rows.

Accuracy: root mean squared error of released counts against the exact counts at equal ε.
Prints a table and writes JSON next to this file; copy the figures into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import duckdb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fedtre.catalog import load_catalog  # noqa: E402
from fedtre.parse import parse_query  # noqa: E402
from fedtre.request import QueryRequest  # noqa: E402
from fedtre.synthetic import generate  # noqa: E402
from node.compiler import run_exact  # noqa: E402
from node.config import load_node_config  # noqa: E402
from node.engine import NodeEngine  # noqa: E402
from node.loader import load_omop  # noqa: E402
from node.prepare import plan_query  # noqa: E402
from node.release import release  # noqa: E402

CASES = [
    {
        "name": "patients: sex, COUNT, AVG(age) (one row per person)",
        "fedtre": "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM patients GROUP BY sex",
        "plain": "SELECT sex, COUNT(*), AVG(age) FROM patients GROUP BY sex",
        "table": "patients",
        "accuracy": "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
        "smartnoise": "SELECT sex, COUNT(*) AS n FROM fedtre.patients GROUP BY sex",
        "sn_columns": {"sex": {"type": "string"}, "age": {"type": "int", "lower": 0, "upper": 110}},
        "max_ids": 1,
    },
    {
        "name": "conditions: condition_group, COUNT (events, per-person bounding)",
        "fedtre": "SELECT condition_group, COUNT(*) AS n FROM conditions GROUP BY condition_group",
        "plain": "SELECT condition_group, COUNT(*) FROM conditions GROUP BY condition_group",
        "table": "conditions",
        "smartnoise": "SELECT condition_group, COUNT(*) AS n FROM fedtre.conditions "
        "GROUP BY condition_group",
        "sn_columns": {"condition_group": {"type": "string"}},
        "max_ids": 25,
    },
    {
        "name": "prevalence: patients by age band with a depression cohort semi-join",
        "fedtre": "SELECT age_band, COUNT(DISTINCT person_id) AS n FROM patients "
        "WHERE person_id IN (SELECT person_id FROM conditions "
        "WHERE condition_group = 'depression') GROUP BY age_band",
        "plain": "SELECT age_band, COUNT(DISTINCT person_id) FROM patients WHERE person_id IN "
        "(SELECT person_id FROM conditions WHERE condition_group = 'depression') "
        "GROUP BY age_band",
        "table": None,
    },
]


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def prepare(persons: int) -> Path:
    data = HERE / "data" / f"trust-{persons}"
    db = data / "node.duckdb"
    if db.exists():
        return db
    print(f"generating {persons:,} persons ...", file=sys.stderr)
    generate(data / "omop", persons, seed=1)
    print("loading ...", file=sys.stderr)
    report = load_omop(data / "omop", db, load_catalog())
    print("\n".join(report.lines()), file=sys.stderr)
    return db


def node_config(db: Path, state: Path, max_tier: str = "highly_sensitive") -> Path:
    """A node config for benchmarks: project ``bench``, answer slot off, ample budget. The
    cached database is hard-linked into ``state``: each run is a node of its own, with its own
    ledger and the record of it beside its database (``node.generation``)."""
    path = state / "node.toml"
    local = state / db.name
    if not local.exists():
        os.link(db, local)
    db = local
    path.write_text(
        textwrap.dedent(
            f"""\
            node_id = "bench"
            database = "{db}"
            state_dir = "{state / "state"}"
            node_epsilon_ceiling = 1000000.0
            # Speed is the node's own work: the answer slot (on by default in production) is
            # off here; benchmarks/timing.py measures what the slot costs and what it hides.
            answer_slot_ms = 0
            [projects.bench]
            total_epsilon = 1000000.0
            max_epsilon_per_query = 1.0
            views = ["patients", "conditions", "visits"]
            max_tier = "{max_tier}"
            """
        )
    )
    return path


def rmse(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--accuracy-releases", type=int, default=300)
    parser.add_argument("--smartnoise-repeats", type=int, default=60)
    parser.add_argument("--no-smartnoise", action="store_true")
    args = parser.parse_args()

    db = prepare(args.persons)
    catalog = load_catalog()
    tmpdir = tempfile.TemporaryDirectory()
    engine = NodeEngine(load_node_config(node_config(db, Path(tmpdir.name))))
    # The baseline runs on the node's own connection: same file, same DuckDB settings.
    plain = engine.database.cursor()
    project = engine.config.projects["bench"]
    rows = {v: plain.execute(f'SELECT count(*) FROM "{v}"').fetchone()[0] for v in catalog.views}
    results = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}, "
        f"DuckDB {duckdb.__version__}",
        "persons": args.persons,
        "rows": rows,
        "epsilon": args.epsilon,
        "cases": [],
    }
    tmp = tmpdir.name
    for case in CASES:
        prepared = plan_query(parse_query(case["fedtre"], catalog), catalog, project, 1_000_000)
        t_plain = timed(lambda c=case: plain.execute(c["plain"]).fetchall(), args.repeats)

        def compute(prepared=prepared):
            exact = run_exact(plain, prepared.compiled)
            release(prepared.release, exact)

        t_compute = timed(compute, args.repeats)
        t_node = timed(
            lambda c=case: engine.answer(
                QueryRequest(str(uuid.uuid4()), "bench", c["fedtre"], args.epsilon, "bench")
            ),
            args.repeats,
        )
        # accuracy: a single count, the same query SmartNoise runs, at the same ε
        accuracy_sql = case.get("accuracy", case["fedtre"])
        accuracy = plan_query(parse_query(accuracy_sql, catalog), catalog, project, 1_000_000)
        exact = run_exact(plain, accuracy.compiled)
        errors = []
        stds = []
        for _ in range(args.accuracy_releases):
            r = engine.answer(
                QueryRequest(str(uuid.uuid4()), "bench", accuracy_sql, args.epsilon, "b")
            )
            noisy = r.aggregates[0].statistics[0].values
            stds.append(r.aggregates[0].statistics[0].noise_std)
            errors += [n - e for n, e in zip(noisy, exact[0], strict=True)]
        entry = {
            "name": case["name"],
            "plain_duckdb_ms": ms(t_plain),
            "node_compute_ms": ms(t_compute),
            "node_full_ms": ms(t_node),
            "node_full_p95_ms": sorted(t_node)[int(0.95 * (len(t_node) - 1))] * 1000,
            "ratio_full_vs_plain": ms(t_node) / ms(t_plain),
            "ratio_compute_vs_plain": ms(t_compute) / ms(t_plain),
            "fedtre_count_rmse": rmse(errors),
            "fedtre_count_std_declared": stds[0],
            "fedtre_accuracy_samples": len(errors),
        }
        if case.get("table") and not args.no_smartnoise:
            entry.update(smartnoise(db, case, args, Path(tmp), exact[0]))
        results["cases"].append(entry)
        print(json.dumps(entry, indent=1), file=sys.stderr)
    plain.close()
    engine.close()
    tmpdir.cleanup()
    (HERE / "latest.json").write_text(json.dumps(results, indent=2))
    print(report_table(results))
    return 0


def smartnoise(db: Path, case: dict, args: argparse.Namespace, tmp: Path, exact: list[int]):
    from smartnoise_env import run_smartnoise

    table = case["table"]
    cols = ["person_id", *case["sn_columns"]]
    parquet = tmp / f"{table}.parquet"
    con = duckdb.connect()  # a separate in-memory database reads the node file's tables
    con.execute(f"ATTACH '{db}' AS node (READ_ONLY)")
    con.execute(
        f"COPY (SELECT {', '.join(cols)} FROM node.\"{table}\") TO '{parquet}' (FORMAT parquet)"
    )
    con.close()
    metadata = {
        "row_privacy": False,
        "max_ids": case["max_ids"],
        "key": "person_id",
        "columns": {"person_id": {"type": "int", "private_id": True}, **case["sn_columns"]},
    }
    reply = run_smartnoise(
        parquet,
        table,
        metadata,
        [{"name": case["name"], "sql": case["smartnoise"], "epsilon": args.epsilon}],
        args.smartnoise_repeats,
    )
    if "error" in reply:
        return {"smartnoise_error": reply["error"]}
    res = reply["results"][0]
    catalog = load_catalog()
    group_col = next(iter(case["sn_columns"]))
    domain = catalog.views[table].columns[group_col].domain
    errors = []
    for rows in res["rows"]:
        got = {r[0]: r[1] for r in rows}
        errors += [float(got.get(v, 0)) - e for v, e in zip(domain, exact, strict=True)]
    return {
        "smartnoise_ms": ms(res["seconds"]),
        "smartnoise_count_rmse": rmse(errors),
        "smartnoise_accuracy_samples": len(errors),
        "smartnoise_epsilon_spent": res.get("epsilon_spent_per_run"),
        "smartnoise_version": reply.get("smartnoise_version"),
    }


def report_table(results: dict) -> str:
    lines = [
        f"machine: {results['machine']}",
        f"data: {results['persons']:,} persons; rows {results['rows']}; ε = {results['epsilon']}",
        "",
        "| query | plain DuckDB ms | node compute ms | node full ms (p95) | full ÷ plain | "
        "SmartNoise ms | SmartNoise ÷ node | count RMSE fedtre | count RMSE SmartNoise |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        sn = c.get("smartnoise_ms")
        lines.append(
            f"| {c['name']} | {c['plain_duckdb_ms']:.1f} | {c['node_compute_ms']:.1f} | "
            f"{c['node_full_ms']:.1f} ({c['node_full_p95_ms']:.1f}) | "
            f"{c['ratio_full_vs_plain']:.2f}× | "
            + (f"{sn:.1f} | {sn / c['node_full_ms']:.1f}× | " if sn else "– | – | ")
            + f"{c['fedtre_count_rmse']:.2f} | "
            + (f"{c['smartnoise_count_rmse']:.2f} |" if sn else "– |")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

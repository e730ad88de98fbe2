"""``fedtre node demo``: one trust node, end to end, on synthetic data, in a few seconds.

Generates a synthetic OMOP extract, loads it, approves a demo project in the node's config, and
runs realistic queries and refusals through the same engine path remote queries will take.
The federation demo (coordinator and several trusts over mTLS) replaces this as README's main
command when the federation lands.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

from fedtre.catalog import load_catalog
from fedtre.errors import UserError
from fedtre.render import render_table
from fedtre.request import QueryRequest
from node.config import load_node_config

QUERIES = [
    (
        "Depression prevalence: persons with a depression diagnosis, by age band",
        "SELECT age_band, COUNT(DISTINCT person_id) AS persons FROM patients "
        "WHERE person_id IN (SELECT person_id FROM conditions "
        "WHERE condition_group = 'depression') GROUP BY age_band",
        0.5,
    ),
    (
        "Mean length of stay of mental-health admissions",
        "SELECT AVG(length_of_stay) AS mean_stay_days, COUNT(*) AS admissions FROM visits "
        "WHERE visit_type = 'inpatient' AND mental_health = TRUE",
        0.5,
    ),
]
REFUSALS = [
    ("A query asking for row-level values", "SELECT age, sex FROM patients", 0.1),
    ("An escape attempt", "SELECT COUNT(*) FROM read_csv('/etc/passwd')", 0.1),
    (
        "Self-harm data, above the project's approved tier",
        "SELECT COUNT(*) FROM conditions WHERE condition_group = 'self_harm'",
        0.1,
    ),
]


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run one trust node end to end on synthetic data")
    demo.add_argument("--persons", type=int, default=50_000)
    demo.add_argument("--dir", type=Path, help="keep the files here (default: a temp folder)")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return _demo(args.dir, args.persons)
    with tempfile.TemporaryDirectory(prefix="fedtre-demo-") as tmp:
        return _demo(Path(tmp), args.persons)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _demo(work: Path, persons: int) -> int:
    from fedtre.synthetic import generate
    from node.engine import NodeEngine
    from node.loader import load_omop

    _say(f"1. Generating a synthetic OMOP extract for one trust ({persons:,} persons)")
    generate(work / "omop", persons, seed=7)
    _say("2. Loading it into the node's research database")
    report = load_omop(work / "omop", work / "trust-a.duckdb", load_catalog())
    _say("   " + "\n   ".join(report.lines()[2:5]))
    config_path = work / "node.toml"
    config_path.write_text(
        textwrap.dedent(
            """\
            node_id = "trust-a"
            database = "trust-a.duckdb"
            state_dir = "state"
            node_epsilon_ceiling = 10.0

            [projects.demo]
            title = "Demo: mental-health service use"
            total_epsilon = 2.0
            max_epsilon_per_query = 1.0
            views = ["patients", "conditions", "visits"]
            max_tier = "mental_health"
            """
        )
    )
    engine = NodeEngine(load_node_config(config_path))
    try:
        _say("3. Approved queries (each spends ε from the project's budget of 2.0)\n")
        for title, sql, epsilon in QUERIES:
            _say(f"-- {title}\n{textwrap.fill(sql, 100)}\n")
            result = engine.answer(_request(sql, epsilon))
            _say(render_table(result))
            _say()
        _say("4. Refused queries (refused before any data is touched; no ε spent)\n")
        for title, sql, epsilon in REFUSALS:
            try:
                engine.answer(_request(sql, epsilon))
                _say(f"-- {title}: NOT refused (this is a bug)")
                return 1
            except UserError as exc:
                _say(f"-- {title}\n   refused ({exc.refusal.value}): {exc.message}")
        status = engine.budget("demo")
        _say(
            f"\n5. Budget: ε spent {status.spent_units / 1e6:g} of "
            f"{status.total_units / 1e6:g}; left {status.remaining:g}"
        )
        _say(
            "   Every request above, refusals included, is in the node's audit log, kept with "
            f"the ledger ({engine.config.audit_path.relative_to(work)}; `fedtre audit verify` "
            "checks it; use --dir DIR to keep the files)."
        )
    finally:
        engine.close()
    return 0


def _request(sql: str, epsilon: float) -> QueryRequest:
    return QueryRequest(f"demo-{uuid.uuid4()}", "demo", sql, epsilon, "demo")


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace(persons=50_000, dir=None)))

"""``fedtre query`` / ``fedtre projects`` / ``fedtre budget``: what a researcher runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtre.client import PROFILE_ENV, Client


def register(sub: argparse._SubParsersAction) -> None:
    query = sub.add_parser("query", help="run an aggregate query across the project's trusts")
    query.add_argument("--project", required=True)
    query.add_argument(
        "--epsilon", type=float, help="ε to spend at each trust (default: the project's default)"
    )
    query.add_argument("--query-id", help="reuse an id to fetch the same answer again at no cost")
    query.add_argument("--format", choices=["table", "json", "csv"], default="table")
    query.add_argument(
        "--explain",
        action="store_true",
        help="show the cost per trust, the cells and the expected error; spend nothing",
    )
    _profile(query)
    query.add_argument("sql")
    query.set_defaults(func=_query)

    projects = sub.add_parser("projects", help="list the projects open to you")
    projects.add_argument("--format", choices=["table", "json"], default="table")
    _profile(projects)
    projects.set_defaults(func=_projects)

    budget = sub.add_parser("budget", help="show a project's privacy budget left at each trust")
    budget.add_argument("--project", required=True)
    budget.add_argument("--format", choices=["table", "json"], default="table")
    _profile(budget)
    budget.set_defaults(func=_budget)


def _profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile", type=Path, help=f"researcher profile TOML (default: ${PROFILE_ENV})"
    )


# Exit codes: 0 released (also partial, said on stderr); 2 refused by the trusts' own rules
# (tier, scope, query id, budget); 4 withheld because trusts did not answer.
EXIT_FOR_STATUS = {"released": 0, "partial": 0, "refused": 2, "withheld": 4}


def _query(args: argparse.Namespace) -> int:
    if args.explain:
        with Client.from_profile(args.profile) as client:
            plan = client.explain(args.project, args.sql, args.epsilon)
        print(json.dumps(plan.to_dict(), indent=2) if args.format == "json" else plan.table())
        return 0
    with Client.from_profile(args.profile) as client:
        result = client.query(
            args.project, args.sql, args.epsilon, args.query_id, raise_if_not_released=False
        )
    if args.format == "json":
        print(result.to_json())
    elif args.format == "csv":
        print(result.to_csv(), end="")
    else:
        print(result.table())
    if result.status != "released":
        print(result.summary(), file=sys.stderr)
    return EXIT_FOR_STATUS[result.status]


def _projects(args: argparse.Namespace) -> int:
    with Client.from_profile(args.profile) as client:
        projects = client.projects()
        for p in projects:
            p["budget"] = client.budget(p["project_id"])
    if args.format == "json":
        print(json.dumps(projects, indent=2))
        return 0
    if not projects:
        print("No projects are open to you.")
    for p in projects:
        below = p["suppress_below"]
        suppression = (
            f"counts below {below} shown as '< {below}'" if below > 0 else "no suppression"
        )
        rounding = f"rounded to {p['round_to']}" if p["round_to"] > 1 else "not rounded"
        views = ", ".join(p["views"]) or "not reported yet"
        print(
            f"{p['project_id']}: {p['title']}\n"
            f"  views: {views}; tier: {p['max_tier'] or 'not reported yet'}\n"
            f"  ε per query: default {p['default_epsilon']:g}, at most "
            f"{p['max_epsilon_per_query']:g}; {suppression}; {rounding}; "
            + ("partial results allowed" if p["allow_partial"] else "all trusts must answer")
        )
        for b in p["budget"]:
            left = "unknown" if b["epsilon_left"] is None else f"{b['epsilon_left']:g}"
            why = f" ({b['reason']})" if b["reason"] and b["epsilon_left"] is None else ""
            print(f"  {b['trust']:<20} ε left {left}{why}")
    return 0


def _budget(args: argparse.Namespace) -> int:
    with Client.from_profile(args.profile) as client:
        rows = client.budget(args.project)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        left = "unknown" if r["epsilon_left"] is None else f"{r['epsilon_left']:g}"
        why = f" ({r['reason']})" if r["reason"] else ""
        print(f"{r['trust']:<20} ε left {left}{why}")
    return 0

"""``fedtre node ...``: what trust IT runs on the node machine."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import signal
import stat
import sys
import uuid
from pathlib import Path

from fedtre.audit.events import Event
from fedtre.catalog import load_catalog
from fedtre.errors import ConfigError, UserError
from fedtre.metrics_http import health_command
from fedtre.render import render_json, render_table
from fedtre.request import QueryRequest
from fedtre.serving import add_serve_arguments, serve_command, write_ready_file
from node import demo
from node.audit import file_digest, new_import_id, record
from node.check import check_node
from node.config import load_node_config
from node.load_progress import LoadProgress
from node.optouts import OptOut


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="run and manage a trust node")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")

    check = node_sub.add_parser(
        "check", help="check a node's config, certificate, files and database before serving"
    )
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--insecure", action="store_true", help="skip the certificate checks")
    check.set_defaults(func=_check)

    load = node_sub.add_parser(
        "load", help="build the node database from an OMOP CDM extract (folder or DuckDB file)"
    )
    load.add_argument("--source", type=Path, required=True, help="OMOP folder or .duckdb file")
    load.add_argument("--out", type=Path, help="node database to write")
    load.add_argument("--config", type=Path, help="node config (its database and catalog)")
    load.add_argument("--catalog", type=Path, help="catalog file (default: built-in)")
    load.add_argument("--mapping", type=Path, help="condition group mapping CSV")
    load.add_argument("--opt-out", type=Path, help="CSV of person_id or person_source_value")
    load.add_argument(
        "--memory-limit",
        help="DuckDB's memory for the load, e.g. 4GB (default: a quarter of this machine's "
        "memory, at most 4GB; work beyond it spills to disk next to --out)",
    )
    load.add_argument("--threads", type=int, help="DuckDB worker threads (default: every core)")
    load.add_argument(
        "--extract-date",
        type=_date,
        help="when the extract was taken, YYYY-MM-DD (default: today); every answer states it",
    )
    load.set_defaults(func=_load)

    query = node_sub.add_parser(
        "query", help="answer a query locally (same checks, budget and audit as remote queries)"
    )
    query.add_argument("--config", type=Path, required=True)
    query.add_argument("--project", required=True)
    query.add_argument("--epsilon", type=float, required=True)
    query.add_argument("--query-id", help="reuse an id to fetch the stored answer again")
    query.add_argument("--format", choices=["table", "json"], default="table")
    query.add_argument("sql")
    query.set_defaults(func=_query)

    calibrate = node_sub.add_parser(
        "calibrate",
        help="time the slowest query shapes on the loaded data and suggest answer_slot_ms",
    )
    calibrate.add_argument("--config", type=Path, required=True)
    calibrate.add_argument("--repeats", type=int, default=10, help="runs of each shape per thread")
    calibrate.add_argument(
        "--concurrency", type=int, help="queries at a time (default: [server] max_workers)"
    )
    calibrate.add_argument("--format", choices=["table", "json"], default="table")
    calibrate.set_defaults(func=_calibrate)

    budget = node_sub.add_parser("budget", help="show privacy budget spent and left per project")
    budget.add_argument("--config", type=Path, required=True)
    budget.add_argument("--format", choices=["table", "json"], default="table")
    budget.set_defaults(func=_budget)

    serve = node_sub.add_parser(
        "serve", help="serve approved queries to the federation coordinator over mutual TLS"
    )
    add_serve_arguments(serve, "DEVELOPMENT ONLY: plaintext, no caller authentication")
    serve.set_defaults(func=_serve)

    dispute = node_sub.add_parser(
        "dispute",
        help="records patients dispute, per view (the catalog says: excluded, or counted)",
    )
    dispute_sub = dispute.add_subparsers(dest="dispute_command", required=True, metavar="ACTION")
    for name, helptext in (
        ("add", "mark the records of the persons in a CSV (person_id) in a view as disputed"),
        ("remove", "the dispute is settled: use their records in the view again"),
    ):
        p = dispute_sub.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, required=True)
        p.add_argument("--view", required=True)
        p.add_argument("file", type=Path)
        p.set_defaults(func=_dispute_change, add=name == "add")
    dlist = dispute_sub.add_parser("list", help="how many persons dispute records, per view")
    dlist.add_argument("--config", type=Path, required=True)
    dlist.set_defaults(func=_dispute_list)

    approvals = node_sub.add_parser(
        "approvals", help="signed approvals this node holds; import a revocation or an approval"
    )
    approvals_sub = approvals.add_subparsers(
        dest="approvals_command", required=True, metavar="ACTION"
    )
    imp = approvals_sub.add_parser(
        "import",
        help="import a committee revocation (or an approval bundle): checked against the "
        "pinned committee; a running node applies it from its next query",
    )
    imp.add_argument("--config", type=Path, required=True)
    imp.add_argument("file", type=Path)
    imp.set_defaults(func=_approvals_import)
    lst = approvals_sub.add_parser("list", help="each project's approval as this node sees it")
    lst.add_argument("--config", type=Path, required=True)
    lst.add_argument("--format", choices=["table", "json"], default="table")
    lst.set_defaults(func=_approvals_list)

    optout = node_sub.add_parser(
        "optout",
        help="persons who opted out (national, commercial, mental_health): a running node "
        "applies a change from its next query",
    )
    optout_sub = optout.add_subparsers(dest="optout_command", required=True, metavar="ACTION")
    for name, helptext in (
        ("import", "add the persons in a CSV (person_id column) to an opt-out"),
        ("remove", "take the persons in a CSV off an opt-out"),
    ):
        p = optout_sub.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, required=True)
        p.add_argument("--kind", required=True, choices=[k.value for k in OptOut])
        p.add_argument("file", type=Path)
        p.set_defaults(func=_optout_change, add=name == "import")
    counts = optout_sub.add_parser("list", help="how many persons each opt-out holds")
    counts.add_argument("--config", type=Path, required=True)
    counts.add_argument("--format", choices=["table", "json"], default="table")
    counts.set_defaults(func=_optout_list)

    health = node_sub.add_parser(
        "health", help="ask a running node's local health endpoint ([metrics] listen)"
    )
    health.add_argument("--config", type=Path, required=True)
    health.set_defaults(func=_health)

    demo.register(node_sub)


def _optout_change(args: argparse.Namespace) -> int:
    from node.optouts import OptOuts, read_person_ids

    config = load_node_config(args.config)
    ids = read_person_ids(args.file)
    optouts = OptOuts(config.state_dir)
    kind = OptOut(args.kind)
    import_id = new_import_id()
    record(  # before acting: kind and a random import id only (a digest of a one-person file
        config,  # would give the person's id away to anyone who can try ids)
        Event.OPTOUTS_CHANGED,
        kind=kind.value,
        action="add" if args.add else "remove",
        import_id=import_id,
    )
    change = optouts.add(kind, ids) if args.add else optouts.remove(kind, ids)
    verb = f"added {change.added:,}" if args.add else f"removed {change.removed:,}"
    print(
        f"{kind.value} opt-out: {verb} of {len(ids):,} person id(s) in {args.file}; it now "
        f"holds {change.total:,}. A running node applies it from its next query. Audit "
        f"import id: {import_id} (note it beside the request in your own records)."
    )
    for warning in _world_readable(args.file):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _world_readable(path: Path) -> list[str]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return [
            f"{path} is readable by other users (mode {mode:04o}): it is person-level data; "
            f"chmod 600 {path}, or delete it now that it is imported"
        ]
    return []


def _dispute_change(args: argparse.Namespace) -> int:
    from node.optouts import OptOuts, read_person_ids

    config = load_node_config(args.config)
    if args.view not in config.catalog.views:
        raise ConfigError(f"no view {args.view!r} in the catalog")
    ids = read_person_ids(args.file)
    import_id = new_import_id()
    record(
        config,
        Event.DISPUTES_CHANGED,
        view=args.view,
        action="add" if args.add else "remove",
        import_id=import_id,
    )
    changed, total = OptOuts(config.state_dir).dispute(args.view, ids, add=args.add)
    policy = config.catalog.disputed_records
    effect = (
        "excluded from every query reading it"
        if policy == "exclude"
        else "still counted (the catalog says disputed_records = 'count')"
    )
    verb = "marked" if args.add else "cleared"
    print(
        f"{args.view}: {verb} {changed:,} of {len(ids):,} person(s); {total:,} hold disputed "
        f"records there, {effect}. A running node applies it from its next query. Audit "
        f"import id: {import_id}."
    )
    for warning in _world_readable(args.file):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _dispute_list(args: argparse.Namespace) -> int:
    from node.optouts import OptOuts

    config = load_node_config(args.config)
    counts = OptOuts(config.state_dir).disputes()
    print(f"policy (catalog disputed_records): {config.catalog.disputed_records}")
    for view in config.catalog.views:
        print(f"{view:<14} {counts.get(view, 0):>12,} person(s) with disputed records")
    return 0


def _optout_list(args: argparse.Namespace) -> int:
    from node.optouts import OptOuts

    counts = OptOuts(load_node_config(args.config).state_dir).counts()
    if args.format == "json":
        print(json.dumps(counts, indent=2))
        return 0
    for kind, n in counts.items():
        print(f"{kind:<14} {n:>12,} person(s)")
    return 0


def _approvals_import(args: argparse.Namespace) -> int:
    from node.approvals import Projects

    config = load_node_config(args.config)
    record(config, Event.APPROVAL_IMPORTED, file_sha256=file_digest(args.file))
    print(f"imported: {Projects(config).import_file(args.file)}")
    return 0


def _approvals_list(args: argparse.Namespace) -> int:
    from fedtre.dp import units_to_epsilon
    from node.approvals import Projects

    config = load_node_config(args.config)
    projects = Projects(config)
    if config.governance is None:
        raise ConfigError(f"{args.config} has no [governance]: its projects are hand-kept")
    rows = []
    for path in sorted((config.state_dir / "approvals").glob("*.json")):
        row: dict[str, object] = {"project": path.stem}
        try:
            verified = projects.known(path.stem)
        except UserError as exc:
            row.update(status="refused", why=str(exc))
        else:
            approved = verified.approved
            assert approved is not None
            row.update(
                status="holds",
                purpose=approved.application.purpose.value,
                approved_by=", ".join(f"{m.name} ({m.role.value})" for m in approved.approvers),
                participation=approved.participation,
                epsilon_total=units_to_epsilon(verified.policy.total_units),
                lapses=f"{approved.valid_until:%Y-%m-%d %H:%M} UTC",
                expires=approved.application.expires.isoformat(),
            )
        rows.append(row)
    imported = len(projects.imported())
    if args.format == "json":
        print(json.dumps({"approvals": rows, "statements_imported": imported}, indent=2))
        return 0
    for row in rows:
        print(f"{row['project']}: {row['status']}")
        for key, value in row.items():
            if key not in ("project", "status"):
                print(f"  {key}: {value}")
    print(f"{imported} statement(s) imported by this trust (revocations, guardian's word)")
    return 0


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a date, YYYY-MM-DD") from None


def _load(args: argparse.Namespace) -> int:
    from node.loader import load_omop

    # SIGTERM ends the load like Ctrl-C: its temporary files (person-level views) are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.config is not None:
        config = load_node_config(args.config)
        catalog, out = config.catalog, args.out or config.database
    else:
        if args.out is None:
            raise ConfigError("give --out (the node database to write) or --config")
        catalog, out = load_catalog(args.catalog), args.out
    report = load_omop(
        args.source,
        out,
        catalog,
        mapping=args.mapping,
        opt_out=args.opt_out,
        progress=LoadProgress(sys.stderr),
        memory_limit=args.memory_limit,
        threads=args.threads,
        extract_date=args.extract_date,
    )
    print("\n".join(report.lines()))
    return 0


def _check(args: argparse.Namespace) -> int:
    return check_node(args.config, insecure=args.insecure).print_report("node")


def _serve(args: argparse.Namespace) -> int:
    from node.server import create_server

    report = check_node(args.config, insecure=args.insecure)
    if report.refuses_to_serve("node") or report.config is None:
        return 3
    config = report.config
    ready: Path | None = args.ready_file

    def linked(address: str) -> None:  # dial-out: ready once a coordinator link is up
        if ready is not None and not ready.exists():
            write_ready_file(ready, address)

    return serve_command(
        "node",
        lambda: create_server(config, insecure=args.insecure, on_connected=linked),
        args.insecure,
        args.ready_file,
    )


def _query(args: argparse.Namespace) -> int:
    from node.engine import NodeEngine

    engine = NodeEngine(load_node_config(args.config))
    try:
        request = QueryRequest(
            query_id=args.query_id or f"local-{uuid.uuid4()}",
            project_id=args.project,
            sql=args.sql,
            epsilon=args.epsilon,
            caller=f"local:{getpass.getuser()}",
        )
        result = engine.answer(request)
        left = engine.budget(args.project).remaining
        if args.format == "json":
            print(render_json(result, {"epsilon_remaining": left}))
        else:
            print(render_table(result))
            print(f"query id {result.query_id}; ε left for project {args.project}: {left:g}")
    finally:
        engine.close()
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from node.calibrate import calibrate, report

    if args.repeats < 1 or (args.concurrency is not None and args.concurrency < 1):
        raise ConfigError("--repeats and --concurrency must be at least 1")
    config = load_node_config(args.config)
    result = calibrate(
        config,
        repeats=args.repeats,
        concurrency=args.concurrency,
        progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True),
    )
    if args.format == "json":
        doc = {
            "suggested_answer_slot_ms": result.suggested_ms,
            "configured_answer_slot_ms": config.answer_slot_ms,
            "concurrency": result.concurrency,
            "durable_write_ms": result.durable_write_seconds * 1000,
            "slowest_answer_ms": result.worst * 1000,
            "shapes": [
                {"shape": t.shape.name, "p50_ms": t.p50 * 1000, "worst_ms": t.worst * 1000}
                for t in result.timings
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(report(result, config.answer_slot_ms)))
    return 0


def _budget(args: argparse.Namespace) -> int:
    from fedtre.dp import units_to_epsilon
    from node.engine import NodeEngine
    from node.ledger import NODE_SCOPE

    engine = NodeEngine(load_node_config(args.config))
    try:
        rows = []
        for pid, project in engine.projects.held().items():
            status = engine.budget(pid)
            rows.append(
                {
                    "project": pid,
                    "title": project.title,
                    "epsilon_total": units_to_epsilon(status.total_units),
                    "epsilon_spent": units_to_epsilon(status.spent_units),
                    "epsilon_left": status.remaining,
                }
            )
        node_spent = engine.ledger.spent(NODE_SCOPE)
    finally:
        engine.close()
    if args.format == "json":
        print(
            json.dumps(
                {"projects": rows, "node_epsilon_spent": units_to_epsilon(node_spent)}, indent=2
            )
        )
        return 0
    print(f"{'project':<24} {'total ε':>9} {'spent ε':>9} {'left ε':>9}")
    for r in rows:
        print(
            f"{r['project']:<24} {r['epsilon_total']:>9g} {r['epsilon_spent']:>9g} "
            f"{r['epsilon_left']:>9g}"
        )
    print(f"node-wide ε spent: {units_to_epsilon(node_spent):g}")
    return 0


def _health(args: argparse.Namespace) -> int:
    return health_command(load_node_config(args.config).metrics_listen, args.config)

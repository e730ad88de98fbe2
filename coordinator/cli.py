"""``fedtre coordinator ...``: what the federation's operator runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coordinator.check import check_coordinator
from coordinator.config import load_coordinator_config
from fedtre.metrics_http import fetch_document, health_command, no_metrics_port
from fedtre.render import text_table
from fedtre.serving import add_serve_arguments, serve_command


def register(sub: argparse._SubParsersAction) -> None:
    coordinator = sub.add_parser("coordinator", help="run the federation coordinator")
    c_sub = coordinator.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    serve = c_sub.add_parser("serve", help="serve researchers over mutual TLS")
    add_serve_arguments(serve, "DEVELOPMENT ONLY: plaintext, every caller is researcher 'dev'")
    serve.set_defaults(func=_serve)
    check = c_sub.add_parser(
        "check", help="check the coordinator's config, certificate and state before serving"
    )
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--insecure", action="store_true", help="skip the certificate checks")
    check.set_defaults(func=_check)
    health = c_sub.add_parser(
        "health", help="ask the running coordinator's local health endpoint ([metrics] listen)"
    )
    health.add_argument("--config", type=Path, required=True)
    health.set_defaults(func=_health)
    trusts = c_sub.add_parser(
        "trusts",
        help="each trust's link as the running coordinator sees it, and projects waiting",
    )
    trusts.add_argument("--config", type=Path, required=True)
    trusts.add_argument("--format", choices=["table", "json"], default="table")
    trusts.set_defaults(func=_trusts)


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import create_server

    report = check_coordinator(args.config, insecure=args.insecure)
    if report.refuses_to_serve("coordinator") or report.config is None:
        return 3
    config = report.config
    return serve_command(
        "coordinator",
        lambda: create_server(config, insecure=args.insecure),
        args.insecure,
        args.ready_file,
    )


def _check(args: argparse.Namespace) -> int:
    return check_coordinator(args.config, insecure=args.insecure).print_report("coordinator")


def _health(args: argparse.Namespace) -> int:
    return health_command(load_coordinator_config(args.config).metrics_listen, args.config)


def _trusts(args: argparse.Namespace) -> int:
    """0 when every trust is up, 1 when some is down or the coordinator does not answer."""
    listen = load_coordinator_config(args.config).metrics_listen
    if not listen:
        return no_metrics_port(args.config, "the trust report")
    try:
        report = fetch_document(listen, "/trusts")
    except (OSError, ValueError) as exc:
        print(f"the coordinator did not answer at {listen} ({exc}): is it running?",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        rows = [
            [t["trust"], "up" if t["up"] else "DOWN", t["since"], t["reason"] or "-", t["link"]]
            for t in report["trusts"]
        ]
        print(text_table(["trust", "state", "since", "reason", "link"], rows))
        waiting = report["projects_waiting"]
        print("projects waiting for trusts: " + (", ".join(waiting) if waiting else "none"))
    return 0 if all(t["up"] for t in report["trusts"]) else 1

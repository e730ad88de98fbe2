"""``fedtre coordinator ...``: what the federation's operator runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coordinator.config import load_coordinator_config


def register(sub: argparse._SubParsersAction) -> None:
    coordinator = sub.add_parser("coordinator", help="run the federation coordinator")
    c_sub = coordinator.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    serve = c_sub.add_parser("serve", help="serve researchers over mutual TLS")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="DEVELOPMENT ONLY: plaintext, every caller is researcher 'dev'",
    )
    serve.add_argument("--ready-file", type=Path, help="write the bound address here when up")
    serve.set_defaults(func=_serve)
    check = c_sub.add_parser("check", help="validate a coordinator config file")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(func=_check)


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import create_server
    from fedtre import logs
    from fedtre.serving import run_until_signalled, write_ready_file

    logs.setup("coordinator")
    config = load_coordinator_config(args.config)
    if args.insecure:
        print(
            "WARNING: --insecure: plaintext and no authentication. Development only.",
            file=sys.stderr,
        )
    running = create_server(config, insecure=args.insecure)
    if args.ready_file is not None:
        write_ready_file(args.ready_file, running.address)
    run_until_signalled(running.server, running.health, running.engine.close)
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load_coordinator_config(args.config)
    print(
        f"coordinator {config.coordinator_id}: {len(config.nodes)} trust(s), "
        f"{len(config.projects)} project(s), catalog {config.catalog.version}; config is valid"
    )
    return 0

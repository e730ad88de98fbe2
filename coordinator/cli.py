"""``fedtre coordinator ...``: what the federation's operator runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator.config import load_coordinator_config
from fedtre.serving import add_serve_arguments, serve_command


def register(sub: argparse._SubParsersAction) -> None:
    coordinator = sub.add_parser("coordinator", help="run the federation coordinator")
    c_sub = coordinator.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    serve = c_sub.add_parser("serve", help="serve researchers over mutual TLS")
    add_serve_arguments(serve, "DEVELOPMENT ONLY: plaintext, every caller is researcher 'dev'")
    serve.set_defaults(func=_serve)
    check = c_sub.add_parser("check", help="validate a coordinator config file")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(func=_check)


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import create_server

    config = load_coordinator_config(args.config)
    return serve_command(
        "coordinator",
        lambda: create_server(config, insecure=args.insecure),
        args.insecure,
        args.ready_file,
    )


def _check(args: argparse.Namespace) -> int:
    config = load_coordinator_config(args.config)
    print(
        f"coordinator {config.coordinator_id}: {len(config.nodes)} trust(s), "
        f"{len(config.projects)} project(s), catalog {config.catalog.version}; config is valid"
    )
    return 0

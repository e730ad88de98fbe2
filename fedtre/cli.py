"""The ``fedtre`` command: one entry point, subcommands per role.

This module is the composition root: it wires the node's (and later the coordinator's)
subcommands in by module name, so neither side imports the other.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedtre import __version__
from fedtre.catalog import load_catalog
from fedtre.errors import ConfigError, FedtreError, InternalError, UserError

# The module that adds each top-level command. A command imports only its own module, so e.g.
# `fedtre coordinator serve` never loads the node's engine, DuckDB or the demo's launcher
# (half a second of every process start); help and unknown commands load them all.
COMMAND_MODULES = {
    "node": "node.cli",
    "coordinator": "coordinator.cli",
    "pki": "fedtre.pki_cli",
    "committee": "fedtre.governance_cli",
    "project": "fedtre.governance_cli",
    "audit": "fedtre.audit_cli",
    "register": "fedtre.register_cli",
    "query": "fedtre.query_cli",
    "projects": "fedtre.query_cli",
    "budget": "fedtre.query_cli",
    "demo": "fedtre.demo",
}
ROLE_MODULES = tuple(dict.fromkeys(COMMAND_MODULES.values()))  # each once, in this order

EXIT_OK, EXIT_INTERNAL, EXIT_REFUSED, EXIT_CONFIG = 0, 1, 2, 3


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (given ``argv``) just enough of it to parse ``argv``."""
    parser = argparse.ArgumentParser(
        prog="fedtre",
        description="fedtre: differentially private aggregate queries across NHS trusts.",
    )
    parser.add_argument("--version", action="version", version=f"fedtre {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    catalog = sub.add_parser("catalog", help="check or show the federation catalog")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    check = catalog_sub.add_parser("check", help="validate a catalog file (default: built-in)")
    check.add_argument("path", nargs="?", type=Path)
    check.set_defaults(func=_catalog_check)
    show = catalog_sub.add_parser(
        "show", help="list views, columns, domains, bounds and tiers (local or the coordinator's)"
    )
    show.add_argument("path", nargs="?", type=Path, help="a catalog file (default: built-in)")
    show.add_argument(
        "--profile",
        type=Path,
        help="fetch the catalog the coordinator serves, with this researcher profile",
    )
    show.add_argument("--format", choices=["table", "json"], default="table")
    show.set_defaults(func=_catalog_show)

    synth = sub.add_parser("synth", help="generate synthetic OMOP CDM data for tests and demos")
    synth.add_argument("--persons", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    synth.add_argument("--person-id-offset", type=int, default=0)
    synth.set_defaults(func=_synth)

    for name in _role_modules(argv):
        importlib.import_module(name).register(sub)
    return parser


def _role_modules(argv: Sequence[str] | None) -> Sequence[str]:
    if not argv or argv[0].startswith("-"):  # no command, or top-level options: all of them
        return ROLE_MODULES
    if argv[0] in ("catalog", "synth"):  # added above
        return ()
    return (COMMAND_MODULES[argv[0]],) if argv[0] in COMMAND_MODULES else ROLE_MODULES


def _catalog_check(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.path)
    print(
        f"catalog {catalog.version} is valid ({len(catalog.views)} views, sha256 "
        f"{catalog.digest[:16]}…)"
    )
    for view in catalog.views.values():
        print(
            f"  {view.name}: {len(view.columns)} columns, tier {view.tier.value}, "
            f"at most {view.max_rows_per_person} row(s) per person per query"
        )
    return EXIT_OK


def _catalog_show(args: argparse.Namespace) -> int:
    from fedtre.catalog_show import catalog_document, catalog_text

    if args.profile is not None:
        from fedtre.client import Client

        with Client.from_profile(args.profile) as client:
            catalog = client.catalog()
    else:
        catalog = load_catalog(args.path)
    if args.format == "json":
        print(json.dumps(catalog_document(catalog), indent=2))
    else:
        print(catalog_text(catalog))
    return EXIT_OK


def _synth(args: argparse.Namespace) -> int:
    from fedtre.synthetic import generate

    try:
        summary = generate(
            args.out,
            args.persons,
            seed=args.seed,
            fmt=args.format,
            progress=lambda msg: print(msg, file=sys.stderr),
            person_id_offset=args.person_id_offset,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(
        f"wrote {summary.persons:,} persons, {summary.condition_rows:,} conditions, "
        f"{summary.visit_rows:,} visits to {summary.out_dir} in {summary.seconds:.1f} s"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    # A terminal or pipe that cannot show "ε" gets "?" instead of a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `fedtre query ... | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except UserError as exc:
        print(f"refused ({exc.refusal.value}): {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except InternalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except (ConfigError, FedtreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``fedtre register build``: the public transparency register, as a static website."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtre.errors import ConfigError
from fedtre.governance.policy import load_committee
from fedtre.governance.registry import Registry
from fedtre.transparency.model import build
from fedtre.transparency.render import write_site


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "register", help="the public transparency register (static HTML and JSON)"
    )
    reg_sub = parser.add_subparsers(dest="register_command", required=True, metavar="ACTION")
    b = reg_sub.add_parser("build", help="build the register from the approvals and the audit logs")
    b.add_argument("--out", type=Path, required=True, help="directory to write the site into")
    b.add_argument("--registry", type=Path, required=True, help="the project registry")
    b.add_argument("--committee", type=Path, required=True, help="the committee file")
    b.add_argument(
        "--coordinator-log",
        action="append",
        type=Path,
        default=[],
        metavar="LOG",
        help="a coordinator's state/audit.sqlite (repeatable)",
    )
    b.add_argument(
        "--trust-log",
        action="append",
        type=Path,
        default=[],
        metavar="LEDGER",
        help="a trust's state/ledger.sqlite (repeatable)",
    )
    b.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    for path in [*args.coordinator_log, *args.trust_log]:
        if not path.is_file():
            raise ConfigError(f"no such audit log: {path}")
    site = build(
        Registry(args.registry),
        load_committee(args.committee),
        args.coordinator_log,
        args.trust_log,
    )
    files = write_site(site, args.out)
    for item in site.left_out:
        print(f"warning: left out of the register: {item}", file=sys.stderr)
    index = args.out / "index.html"
    print(
        f"transparency register: {len(files)} files in {args.out} (open {index})", file=sys.stderr
    )
    return 0

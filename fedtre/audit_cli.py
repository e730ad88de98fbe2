"""``fedtre audit ...``: verify, checkpoint, export and reconcile audit logs (for auditors).

A trust's audit log is in its ``state/ledger.sqlite`` (with the ledger: a release's entry and
its debit are one transaction); the coordinator's is ``state/audit.sqlite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtre.audit.checkpoint import Checkpoint, CheckpointError, load_key, sign_checkpoint
from fedtre.audit.events import MEANING, Event
from fedtre.audit.export import Filters, export
from fedtre.audit.log import open_existing
from fedtre.audit.reconcile import reconcile
from fedtre.audit.verify import verify
from fedtre.errors import ConfigError

EXIT_OK, EXIT_PROBLEM = 0, 1


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "audit", help="auditors: verify, checkpoint, export and reconcile audit logs"
    )
    audit_sub = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    ver = audit_sub.add_parser(
        "verify", help="check a log's hash chain, and that it matches earlier checkpoints"
    )
    ver.add_argument("log", type=Path, help="a trust's state/ledger.sqlite or state/audit.sqlite")
    ver.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a signed checkpoint taken earlier (repeatable)",
    )
    ver.add_argument("--key", help="the log's checkpoint public key (hex), pinned")
    ver.add_argument("--json", action="store_true", help="machine-readable output")
    ver.set_defaults(func=_verify)

    cp = audit_sub.add_parser(
        "checkpoint",
        help="sign the log's current size and head (needs the service's state/audit.key), or "
        "print the newest one it published",
    )
    cp.add_argument("log", type=Path)
    cp.add_argument("--key-file", type=Path, help="default: audit.key beside the log")
    cp.add_argument("--latest", action="store_true", help="print the newest published one")
    cp.add_argument("--out", type=Path, help="write it here (default: stdout)")
    cp.set_defaults(func=_checkpoint)

    exp = audit_sub.add_parser("export", help="export entries as CSV, JSON lines or Parquet")
    exp.add_argument("logs", type=Path, nargs="+", metavar="LOG")
    exp.add_argument("--format", choices=["csv", "json", "parquet"], default="csv")
    exp.add_argument("--out", type=Path, help="file to write (Parquet needs one)")
    exp.add_argument("--project")
    exp.add_argument("--researcher")
    exp.add_argument("--trust")
    exp.add_argument(
        "--event", action="append", default=[], choices=[e.value for e in Event], metavar="KIND"
    )
    exp.add_argument("--since", help="ISO time, inclusive (e.g. 2026-01-01)")
    exp.add_argument("--until", help="ISO time, exclusive")
    exp.set_defaults(func=_export)

    rec = audit_sub.add_parser(
        "reconcile",
        help="cross-check the coordinator's log against every trust's log and ledger",
    )
    rec.add_argument("--coordinator", action="append", type=Path, default=[], metavar="LOG")
    rec.add_argument("--trust", action="append", type=Path, default=[], metavar="LEDGER")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=_reconcile)

    ev = audit_sub.add_parser("events", help="every kind of audit entry, explained")
    ev.set_defaults(func=_events)


def _exists(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"no such log: {path}")
    return path


def _verify(args: argparse.Namespace) -> int:
    checkpoints = []
    for file in args.checkpoint:
        try:
            checkpoints.append(Checkpoint.from_json(file.read_text(encoding="utf-8")))
        except (OSError, CheckpointError) as exc:
            raise ConfigError(f"checkpoint {file}: {exc}") from exc
    result = verify(_exists(args.log), checkpoints, args.key)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    elif result.ok:
        print(
            f"OK: {result.path}: {result.size} entries of {result.actor or 'unknown'}, chain "
            f"intact, {result.checkpoints} of {len(checkpoints)} checkpoint(s) matched; "
            f"head {result.head[:16]}…"
        )
    else:
        print(f"FAILED: {result.path}", file=sys.stderr)
        for p in result.problems:
            where = f"entry {p.seq}: " if p.seq is not None else ""
            print(f"  {where}{p.what}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_PROBLEM


def _checkpoint(args: argparse.Namespace) -> int:
    log = open_existing(_exists(args.log))
    try:
        if args.latest:
            text = log.latest_checkpoint()
            if text is None:
                raise ConfigError("this log has published no checkpoint yet")
        else:
            key = load_key(args.key_file or args.log.parent / "audit.key")
            text = sign_checkpoint(log, key).to_json()
    finally:
        log.close()
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"checkpoint written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    filters = Filters(
        project=args.project,
        researcher=args.researcher,
        trust=args.trust,
        events=tuple(Event(e) for e in args.event),
        since=args.since,
        until=args.until,
    )
    try:
        n = export([_exists(p) for p in args.logs], filters, args.format, args.out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"{n} entries exported", file=sys.stderr)
    return EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    if not args.coordinator or not args.trust:
        raise ConfigError("give --coordinator LOG and --trust LEDGER (each repeatable)")
    result = reconcile([_exists(p) for p in args.coordinator], [_exists(p) for p in args.trust])
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(
            f"{result.trust_releases} release(s) at the trusts, {result.coordinator_releases} "
            f"spend(s) recorded by the coordinator, {result.replays} replay(s) (never counted "
            f"as spend), {result.local_releases} local release(s)"
        )
        for trust, units in sorted(result.epsilon_units.items()):
            print(f"  {trust}: ε {units / 1e6:g} released")
        if result.ok:
            print("OK: every release, spend and refusal matches on both sides")
        for d in result.discrepancies:
            ids = "/".join(x for x in (d.project, d.query_id) if x)
            print(f"DISCREPANCY {d.kind} at {d.trust} {ids}: {d.detail}")
    return EXIT_OK if result.ok else EXIT_PROBLEM


def _events(args: argparse.Namespace) -> int:
    print(events_markdown())
    return EXIT_OK


def events_markdown() -> str:
    lines = [
        "| event | what it records |",
        "|---|---|",
        *(f"| `{e.value}` | {MEANING[e]} |" for e in Event),
    ]
    return "\n".join(lines)

"""``fedtre committee ...`` and ``fedtre project ...``: the governance workflow.

Who runs what (docs/GOVERNANCE.md walks through it):

* each committee member and each trust's data guardian: ``fedtre committee key`` once, and
  gives the public line it prints to the committee's secretariat (the private key stays put);
* the secretariat: ``fedtre committee init|add|remove|list`` keeps ``committee.toml``, which
  every node pins its own copy of;
* a researcher: ``fedtre project submit``; anyone: ``fedtre project list|show``;
* members: ``fedtre project review --approve|--reject`` and ``fedtre project revoke``;
* a trust's data guardian: ``fedtre project participate --accept|--refuse``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedtre.catalog import load_catalog
from fedtre.errors import ConfigError
from fedtre.governance import keys, statements
from fedtre.governance.documents import MemberRole, Participation, Verdict, digest
from fedtre.governance.form import application_from_form
from fedtre.governance.policy import (
    ApprovalPolicy,
    Committee,
    Member,
    load_committee,
    parse_committee,
)
from fedtre.governance.registry import Registry
from fedtre.governance.verify import NotApproved, check
from fedtre.pki import write_file
from fedtre.settings import read_toml


def register(sub: argparse._SubParsersAction) -> None:
    _committee(sub)
    _project(sub)


def _committee(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("committee", help="governance committee: signing keys and members")
    csub = parser.add_subparsers(dest="committee_command", required=True, metavar="ACTION")

    key = csub.add_parser("key", help="make a signing key (member or data guardian); keep it")
    key.add_argument("--out", type=Path, required=True, help="private key file (written 0600)")
    key.set_defaults(func=_key)

    init = csub.add_parser("init", help="start a committee file with its approval policy")
    init.add_argument("--file", type=Path, required=True)
    init.add_argument("--min-approvals", type=int, default=2)
    init.add_argument("--min-service-users", type=int, default=1)
    init.add_argument("--min-service-users-highly-sensitive", type=int, default=2)
    init.add_argument("--max-approval-days", type=int, default=90)
    init.set_defaults(func=_init)

    add = csub.add_parser("add", help="add a member: name, role, public key")
    add.add_argument("--file", type=Path, required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--role", required=True, choices=[r.value for r in MemberRole])
    add.add_argument("--key", required=True, help="'ed25519:...' or a .pub file")
    add.set_defaults(func=_add)

    remove = csub.add_parser("remove", help="remove a member")
    remove.add_argument("--file", type=Path, required=True)
    remove.add_argument("--name", required=True)
    remove.set_defaults(func=_remove)

    show = csub.add_parser("list", help="members, roles, key ids and the policy")
    show.add_argument("--file", type=Path, required=True)
    show.add_argument("--format", choices=["table", "json"], default="table")
    show.set_defaults(func=_list_members)


def _project(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("project", help="project applications, reviews and approvals")
    psub = parser.add_subparsers(dest="project_command", required=True, metavar="ACTION")

    def registry(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", type=Path, required=True, help="the project registry dir")

    submit = psub.add_parser("submit", help="submit an application (a TOML form)")
    registry(submit)
    submit.add_argument("form", type=Path)
    submit.add_argument("--catalog", type=Path, help="catalog file (default: built-in)")
    submit.add_argument("--replace", action="store_true", help="submit a new version")
    submit.set_defaults(func=_submit)

    for name, helptext in (("list", "every project and its state"), ("show", "one project")):
        p = psub.add_parser(name, help=helptext)
        registry(p)
        if name == "show":
            p.add_argument("project")
        p.add_argument("--committee", type=Path, help="check approvals against this file")
        p.add_argument("--format", choices=["table", "json"], default="table")
        p.set_defaults(func=_show if name == "show" else _list_projects)

    review = psub.add_parser("review", help="a committee member's signed decision")
    registry(review)
    review.add_argument("project")
    review.add_argument("--key", type=Path, required=True, help="your private signing key")
    verdict = review.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", action="store_true")
    verdict.add_argument("--reject", action="store_true")
    review.add_argument("--reason", required=True)
    review.add_argument(
        "--days", type=int, default=90, help="how long this approval counts (renew before)"
    )
    review.set_defaults(func=_review)

    revoke = psub.add_parser("revoke", help="a committee member revokes a project")
    registry(revoke)
    revoke.add_argument("project")
    revoke.add_argument("--key", type=Path, required=True)
    revoke.add_argument("--reason", required=True)
    revoke.add_argument("--out", type=Path, help="also write the revocation here, for nodes")
    revoke.set_defaults(func=_revoke)

    part = psub.add_parser("participate", help="a trust's data guardian signs its participation")
    registry(part)
    part.add_argument("project")
    part.add_argument("--trust", required=True, help="the trust's node id")
    part.add_argument("--key", type=Path, required=True, help="the data guardian's key")
    choice = part.add_mutually_exclusive_group(required=True)
    choice.add_argument("--accept", action="store_true")
    choice.add_argument("--refuse", action="store_true")
    part.add_argument("--reason", default="")
    part.set_defaults(func=_participate)

    export = psub.add_parser("export", help="write a project's approval bundle (JSON)")
    registry(export)
    export.add_argument("project")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(func=_export)


# -- committee ------------------------------------------------------------------------------


def _key(args: argparse.Namespace) -> int:
    key = keys.generate(args.out)
    print(f"signing key written: {args.out} (mode 0600; it never leaves you)")
    print(f"public key ({keys.public_path(args.out)}), give it to the committee's secretariat:")
    print(f"  {key.public.text}")
    print(f"key id: {key.public.key_id}")
    return 0


def _init(args: argparse.Namespace) -> int:
    if args.file.exists():
        raise ConfigError(f"{args.file} exists already")
    policy = ApprovalPolicy(
        min_approvals=args.min_approvals,
        min_service_users=args.min_service_users,
        min_service_users_highly_sensitive=args.min_service_users_highly_sensitive,
        max_approval_days=args.max_approval_days,
    )
    _write_committee(args.file, Committee(MappingProxyType({}), policy))
    print(f"committee file written: {args.file}; add members with 'fedtre committee add'")
    return 0


def _add(args: argparse.Namespace) -> int:
    committee = _read_committee_draft(args.file)
    text = args.key
    if not text.startswith(keys.PREFIX):
        text = Path(text).read_text(encoding="utf-8").strip()
    key = keys.PublicKey.parse(text, "--key")
    if args.name in committee.members:
        raise ConfigError(f"{args.name} is a member already (remove first to change the key)")
    holder = committee.by_key_id(key.key_id)
    if holder is not None:
        raise ConfigError(f"that key is {holder.name}'s already: each member signs with their own")
    members = dict(committee.members)
    members[args.name] = Member(args.name, MemberRole(args.role), key)
    _write_committee(args.file, replace(committee, members=MappingProxyType(members)))
    print(f"added {args.name} ({args.role}), key id {key.key_id}; copy {args.file} to every node")
    return 0


def _remove(args: argparse.Namespace) -> int:
    committee = _read_committee_draft(args.file)
    if args.name not in committee.members:
        raise ConfigError(f"{args.name} is not a member")
    members = {k: v for k, v in committee.members.items() if k != args.name}
    _write_committee(args.file, replace(committee, members=MappingProxyType(members)))
    print(f"removed {args.name}; copy {args.file} to every node")
    return 0


def _list_members(args: argparse.Namespace) -> int:
    committee = _read_committee_draft(args.file)
    p = committee.policy
    if args.format == "json":
        doc = {
            "policy": {
                "min_approvals": p.min_approvals,
                "min_service_users": p.min_service_users,
                "min_service_users_highly_sensitive": p.min_service_users_highly_sensitive,
                "max_approval_days": p.max_approval_days,
            },
            "members": [
                {"name": m.name, "role": m.role.value, "key_id": m.key.key_id}
                for m in committee.members.values()
            ],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"policy: at least {p.min_approvals} approvals, {p.min_service_users} by service users "
        f"({p.min_service_users_highly_sensitive} for the highly sensitive tier); approvals "
        f"lapse after {p.max_approval_days} days unless renewed"
    )
    print(f"{'member':<20} {'role':<24} key id")
    for m in sorted(committee.members.values(), key=lambda m: m.name):
        print(f"{m.name:<20} {m.role.value:<24} {m.key.key_id}")
    return 0


def _read_committee_draft(path: Path) -> Committee:
    data = read_toml(path, "committee file")
    data.setdefault("members", {})
    return parse_committee(data, str(path))


def _write_committee(path: Path, committee: Committee) -> None:
    write_file(path, committee.to_toml().encode(), private=False, overwrite=path.exists())


# -- projects -------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _submit(args: argparse.Namespace) -> int:
    form = read_toml(args.form, "application form")
    app = application_from_form(form, load_catalog(args.catalog), _now(), str(args.form))
    data = Registry(args.registry).submit(app, replace=args.replace)
    print(f"submitted {app.project_id} (application {digest(data)[:16]})")
    print("next: committee members review it with 'fedtre project review'")
    return 0


def _state(registry: Registry, project: str, committee: Committee | None) -> dict[str, Any]:
    bundle = registry.bundle(project)
    app = bundle.parsed()
    doc: dict[str, Any] = {**app.to_json(), "application_digest": bundle.digest}
    doc.pop("kind")
    signed = [s.statement() for s in bundle.statements]
    doc["statements"] = [
        {
            "kind": s.kind.value,
            "signed_at": s.signed_at.isoformat(),
            "verdict": s.verdict.value if s.verdict else None,
            "trust": s.trust,
            "participation": s.participation.value if s.participation else None,
            "signer": _signer(committee, b.key_id),
            "reason": s.reason,
        }
        for s, b in zip(signed, bundle.statements, strict=True)
    ]
    if committee is not None:
        try:
            approved = check(bundle, committee, _now())
        except NotApproved as exc:
            doc["status"], doc["why"] = "not approved", str(exc)
        else:
            doc["status"] = "approved"
            doc["approved_by"] = {m.name: m.role.value for m in approved.approvers}
            doc["approval_lapses"] = approved.valid_until.isoformat()
    return doc


def _signer(committee: Committee | None, key_id: str) -> str:
    member = committee.by_key_id(key_id) if committee else None
    return f"{member.name} ({member.role.value})" if member else f"key {key_id}"


def _committee_or_none(path: Path | None) -> Committee | None:
    return load_committee(path) if path is not None else None


def _list_projects(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    committee = _committee_or_none(args.committee)
    docs = [_state(registry, p, committee) for p in registry.projects()]
    if args.format == "json":
        print(json.dumps(docs, indent=2, ensure_ascii=False))
        return 0
    print(f"{'project':<28} {'purpose':<24} {'expires':<11} status")
    for d in docs:
        print(
            f"{d['project_id']:<28} {d['purpose']:<24} {d['expires']:<11} "
            f"{d.get('status', '(no committee file given)')}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    doc = _state(Registry(args.registry), args.project, _committee_or_none(args.committee))
    if args.format == "json":
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    print(f"{doc['project_id']}: {doc['title']}")
    for line in str(doc["lay_summary"]).splitlines() or [""]:
        print(f"  | {line}")  # every line of the summary marked: it cannot pose as a status line
    print(f"  purpose: {doc['purpose']}; {doc['organisation']} ({doc['organisation_type']})")
    print(f"  researchers: {', '.join(doc['researchers'])}")
    print(f"  views: {', '.join(doc['views'])}; highest tier {doc['max_tier']}")
    print(f"  trusts: {', '.join(doc['trusts'])}")
    print(
        f"  ε per trust {doc['epsilon_per_trust']:g}, per query at most "
        f"{doc['max_epsilon_per_query']:g}; expires {doc['expires']}"
    )
    print(f"  application {doc['application_digest'][:16]}, submitted {doc['submitted']}")
    for s in doc["statements"]:
        what = s["verdict"] or s["participation"] or "revoked"
        trust = f" for {s['trust']}" if s["trust"] else ""
        print(f"  - {s['signed_at'][:16]} {s['signer']}: {what}{trust}. {s['reason']}".rstrip())
    if "status" in doc:
        print(f"  status: {doc['status']}" + (f": {doc['why']}" if "why" in doc else ""))
        if "approval_lapses" in doc:
            print(f"  approval lapses {doc['approval_lapses'][:16]} unless members renew it")
    return 0


def _review(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    if not 1 <= args.days <= 366:
        raise ConfigError("--days: from 1 to 366")
    signed = statements.decision(
        keys.load(args.key),
        registry.application(args.project),
        Verdict.APPROVE if args.approve else Verdict.REJECT,
        args.reason,
        _now(),
        dt.timedelta(days=args.days),
    )
    registry.add(args.project, signed)
    verdict = "approval" if args.approve else "rejection"
    print(f"signed {verdict} of {args.project} with key {signed.key_id}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    signed = statements.revocation(
        keys.load(args.key), registry.application(args.project), args.reason, _now()
    )
    registry.add(args.project, signed)
    if args.out is not None:
        args.out.write_text(json.dumps(signed.to_json()) + "\n", encoding="utf-8")
    print(f"revoked {args.project} (signed with key {signed.key_id})")
    print("each trust can import the revocation itself: fedtre node approvals import FILE")
    return 0


def _participate(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    signed = statements.participation(
        keys.load(args.key),
        registry.application(args.project),
        args.trust,
        Participation.ACCEPT if args.accept else Participation.REFUSE,
        args.reason,
        _now(),
    )
    registry.add(args.project, signed)
    print(f"{args.trust}: {'takes part in' if args.accept else 'declines'} {args.project}")
    return 0


def _export(args: argparse.Namespace) -> int:
    args.out.write_bytes(Registry(args.registry).bundle(args.project).to_bytes())
    print(f"wrote {args.out}")
    return 0

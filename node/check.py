"""``fedtre node check``: everything that can be wrong with a node before it serves, one line each
saying what to fix. ``fedtre node serve`` runs the same checks and refuses to start on any
problem (warnings are logged and do not stop it).

Checked: the config itself; the certificate (a node certificate, named as ``node_id``, issued by
the federation CA, not expired) and that the key belongs to it; key, database and state files
readable by their owner only (0600 in 0700 directories) and owned by the user running the node;
the database opens and its invariants hold for this catalog; the state directory is writable;
the answer slot and ε settings are sane.
"""

from __future__ import annotations

from pathlib import Path

from fedtre.checks import (
    CheckReport,
    certificate_problems,
    expiry_warnings,
    private_dir_problems,
    private_file_problems,
)
from fedtre.errors import ConfigError, FedtreError
from fedtre.pki import Role
from node.config import NodeConfig, ServerMode, load_node_config
from node.database import open_research_db
from node.generation import marker_path, mismatch
from node.ledger import Ledger


def check_node(path: Path, *, insecure: bool = False) -> CheckReport[NodeConfig]:
    report: CheckReport[NodeConfig] = CheckReport()
    try:
        config = load_node_config(path)
    except ConfigError as exc:
        report.problems.append(f"config {path}: {exc}")
        return report
    report.config = config
    report.passed.append(f"config {path} is valid (node {config.node_id})")
    _certificate(config, insecure, report)
    _database(config, report)
    _state(config, report)
    _settings(config, report)
    return report


def _certificate(config: NodeConfig, insecure: bool, report: CheckReport[NodeConfig]) -> None:
    server = config.server
    if server is None:
        report.warnings.append("no [server] section: this node can load and query locally only")
        return
    if insecure:
        report.warnings.append("--insecure: plaintext, no certificates (development only)")
        return
    if server.ca is None or server.cert is None or server.key is None:
        report.problems.append("[server] needs ca, cert and key (mutual TLS)")
        return
    problems = certificate_problems(
        server.ca, server.cert, server.key, Role.NODE, config.node_id, "[server]"
    )
    report.problems += problems
    report.warnings += expiry_warnings(server.cert, "[server]")
    if not problems:
        mode = "dials out to " + ", ".join(server.connect)
        if server.mode is ServerMode.DIAL_IN:
            mode = f"listens on {server.listen}"
        report.passed.append(
            f"certificate: node '{config.node_id}', issued by the federation CA, key matches; "
            f"{mode}; accepts only coordinator '{server.coordinator}'"
        )


def _database(config: NodeConfig, report: CheckReport[NodeConfig]) -> None:
    if not config.database.exists():
        report.problems.append(
            f"database {config.database} does not exist: run "
            f"fedtre node load --config <this config> --source <OMOP extract>"
        )
        return
    report.problems += private_file_problems(
        config.database, "the node database (person-level data)"
    )
    try:
        con = open_research_db(
            config.database, config.catalog, config.duckdb_threads, config.duckdb_memory_limit
        )
    except FedtreError as exc:
        report.problems.append(f"database: {exc}")
        return
    con.close()
    report.passed.append(
        f"database {config.database} opens and its invariants hold for catalog "
        f"{config.catalog.version}"
    )


def _state(config: NodeConfig, report: CheckReport[NodeConfig]) -> None:
    state = config.state_dir
    problems = private_dir_problems(state, "state directory")
    if not state.exists() and not problems:
        if marker_path(config).exists():  # it existed: this node has released answers
            report.problems.append(_missing_ledger(config))
        else:
            report.warnings.append(f"state directory {state} will be created (0700) at start")
        return
    for file, what in (
        (config.ledger_path, "the budget ledger and audit log"),
        (config.state_dir / "audit.key", "the audit checkpoint key"),
    ):
        if file.exists():
            problems += private_file_problems(file, what)
    if not problems and config.ledger_path.exists():
        try:
            ledger = Ledger(config.ledger_path)
            problem = mismatch(
                marker_path(config), ledger.identity(), ledger.committed_count(), config
            )
        except FedtreError as exc:
            problems.append(f"ledger: {exc}")
        else:
            if problem:
                problems.append(problem)
    elif not config.ledger_path.exists() and marker_path(config).exists():
        problems.append(_missing_ledger(config))
    report.problems += problems
    if not problems:
        report.passed.append(f"state directory {state} is writable and private")


def _settings(config: NodeConfig, report: CheckReport[NodeConfig]) -> None:
    if config.answer_slot_ms == 0:
        report.warnings.append(
            "answer_slot_ms = 0: answer times can reveal the data (measurements only); set it "
            "with fedtre node calibrate"
        )
    else:
        report.passed.append(f"answer slot {config.answer_slot_ms} ms")
    biggest = max((p.total_units for p in config.projects.values()), default=0)
    if biggest > config.node_total_units:
        report.warnings.append(
            "a project's total_epsilon is above node_epsilon_ceiling: the ceiling stops it first"
        )
    if config.governance is not None:
        gov = config.governance
        members = gov.committee.members.values()
        service_users = sum(1 for m in members if m.role.value == "service-user")
        report.passed.append(
            f"governance: committee {gov.committee_path} pinned ({len(gov.committee.members)} "
            f"members, {service_users} service users); projects come from signed approvals"
        )
        if not gov.trust.guardians and not gov.trust.accept_purposes:
            report.warnings.append(
                "governance: no data guardian keys and no accept_purposes: this trust takes "
                "part in no project"
            )
    elif not config.projects:
        report.warnings.append("no projects: this node will refuse every query")
    else:
        report.warnings.append(
            "projects are hand-kept in this config ([projects.*]), not signed approvals: for a "
            "development node only; production nodes use [governance]"
        )


def _missing_ledger(config: NodeConfig) -> str:
    return (
        f"the budget ledger {config.ledger_path} is missing, but this node has released "
        f"answers from one (its records: {marker_path(config)}): restore the state directory "
        "from its latest backup; a new ledger would give every budget back"
    )

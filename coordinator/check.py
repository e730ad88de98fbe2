"""``fedtre coordinator check``: the coordinator's config, its certificate (a coordinator
certificate named ``coordinator_id``, from the federation CA, key belonging to it and readable
by its owner only) and its state directory. ``fedtre coordinator serve`` runs the same checks
and refuses to start on any problem."""

from __future__ import annotations

from pathlib import Path

from coordinator.config import CoordinatorConfig, load_coordinator_config
from fedtre.checks import (
    CheckReport,
    certificate_problems,
    expiry_warnings,
    private_dir_problems,
    private_file_problems,
)
from fedtre.errors import ConfigError
from fedtre.pki import Role


def check_coordinator(path: Path, *, insecure: bool = False) -> CheckReport[CoordinatorConfig]:
    report: CheckReport[CoordinatorConfig] = CheckReport()
    try:
        config = load_coordinator_config(path)
    except ConfigError as exc:
        report.problems.append(f"config {path}: {exc}")
        return report
    report.config = config
    dial_out = sorted(n for n, e in config.nodes.items() if e.dial_out)
    report.passed.append(
        f"config {path} is valid: coordinator {config.coordinator_id}, "
        f"{len(config.nodes)} trust(s) ({len(dial_out)} dial-out), "
        + (
            f"projects from the signed registry {config.governance.registry}"
            if config.governance is not None
            else f"{len(config.projects)} hand-kept project(s) (development only)"
        )
        + f", catalog {config.catalog.version}"
    )
    if insecure:
        report.warnings.append("--insecure: plaintext, no certificates (development only)")
    elif config.ca is None or config.cert is None or config.key is None:
        report.problems.append("[tls] needs ca, cert and key (mutual TLS)")
    else:
        problems = certificate_problems(
            config.ca, config.cert, config.key, Role.COORDINATOR, config.coordinator_id, "[tls]"
        )
        report.problems += problems
        report.warnings += expiry_warnings(config.cert, "[tls]")
        if not problems:
            report.passed.append(
                f"certificate: coordinator '{config.coordinator_id}', issued by the federation "
                "CA, key matches"
            )
    state = private_dir_problems(config.state_dir, "state directory")
    if config.audit_path.exists():
        state += private_file_problems(config.audit_path, "audit log")
    report.problems += state
    if not state:
        report.passed.append(f"state directory {config.state_dir} is writable and private")
    for pid, project in sorted(config.projects.items()):
        if not project.researchers:
            report.warnings.append(f"project {pid} has no researchers")
    return report

"""The coordinator's configuration: where it listens, the trusts it fans out to, and the
projects researchers may query, with their output rules.

Validated once at start-up; unknown keys are refused. The coordinator's project list decides who
may ask; every node still checks the project, scope and budget itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from coordinator.combine import OutputRules
from coordinator.errors import CoordinatorConfigError
from fedtre.catalog import Catalog, load_catalog
from fedtre.dp import MAX_EPSILON, epsilon_to_units
from fedtre.errors import QueryRefused
from fedtre.governance.policy import Committee, load_committee
from fedtre.request import PROJECT_ID
from fedtre.settings import (
    check_keys,
    parse_listen,
    parse_metrics,
    read_toml,
    resolve_path,
    settings_digest,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")


@dataclass(frozen=True)
class TrustEndpoint:
    node_id: str  # also the name on the node's certificate, verified on every connection
    address: str  # dial-in: where the node listens; "" for a dial-out node
    dial_out: bool = False  # the node dials the coordinator (its trust opens no inbound port)


@dataclass(frozen=True)
class Project:
    project_id: str
    title: str
    researchers: frozenset[str]  # researcher certificate names
    trusts: tuple[str, ...]
    max_units_per_query: int
    default_units: int
    allow_partial: bool  # release when some trusts did not answer (default: all must answer)
    rules: OutputRules
    # From the signed application (governance): the approved scope, the same at every trust.
    # Empty for a hand-kept project: then as the trusts report it.
    views: tuple[str, ...] = ()
    max_tier: str = ""


@dataclass(frozen=True)
class GovernanceSources:
    """``[governance]``: projects come from the registry's signed approvals, checked against
    the committee file (the coordinator refuses early; every node checks again itself)."""

    registry: Path
    committee: Committee


@dataclass(frozen=True)
class CoordinatorConfig:
    coordinator_id: str
    listen: str
    state_dir: Path
    catalog: Catalog
    deadline_seconds: float
    max_workers: int
    ca: Path | None
    cert: Path | None
    key: Path | None
    nodes: Mapping[str, TrustEndpoint]
    projects: Mapping[str, Project]
    metrics_listen: str = ""  # /metrics and /healthz on a local port, no TLS ("" = off)
    governance: GovernanceSources | None = None  # None: hand-kept [projects] (development)
    crl: Path | None = None  # the federation's certificate revocation list (fedtre pki crl)
    # SHA-256 of the settings as read (canonical JSON): the audit log records a change of it
    config_digest: str = ""

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.sqlite"


def load_coordinator_config(path: Path | str) -> CoordinatorConfig:
    path = Path(path)
    data = read_toml(path, "coordinator config")
    config = parse_coordinator_config(data, base_dir=path.parent, source=str(path))
    return dataclasses.replace(config, config_digest=settings_digest(data))


def parse_coordinator_config(
    data: Mapping[str, Any], base_dir: Path, source: str
) -> CoordinatorConfig:
    required = {"coordinator_id", "listen", "state_dir", "nodes"}
    optional = {"catalog", "deadline_seconds", "max_workers", "tls", "metrics"}
    check_keys(data, source, required, required | optional | {"projects", "governance"})
    if ("projects" in data) == ("governance" in data):
        raise CoordinatorConfigError(
            f"{source}: give [governance] (projects from the signed registry) or, for "
            "development only, hand-kept [projects]; not both, not neither"
        )
    cid = data["coordinator_id"]
    if not isinstance(cid, str) or not NAME.match(cid):
        raise CoordinatorConfigError(f"{source}: coordinator_id: lower-case letters, digits, '-'")
    catalog_path = data.get("catalog")
    catalog = load_catalog(
        None if catalog_path is None else resolve_path(catalog_path, base_dir, source)
    )
    deadline = _number(data.get("deadline_seconds", 30.0), f"{source}: deadline_seconds", 0.1, 600)
    workers = data.get("max_workers", 16)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
        raise CoordinatorConfigError(f"{source}: max_workers: a whole number from 1 to 256")
    ca = cert = key = crl = None
    if "tls" in data:
        tls = data["tls"]
        if not isinstance(tls, dict):
            raise CoordinatorConfigError(f"{source}: [tls] must be a table")
        check_keys(tls, f"{source}: tls", {"ca", "cert", "key"}, {"ca", "cert", "key", "crl"})
        ca, cert, key = (
            resolve_path(tls[k], base_dir, f"{source}: tls") for k in ("ca", "cert", "key")
        )
        if "crl" in tls:
            crl = resolve_path(tls["crl"], base_dir, f"{source}: tls")
    nodes_raw = data["nodes"]
    if not isinstance(nodes_raw, dict) or not nodes_raw:
        raise CoordinatorConfigError(f"{source}: [nodes] must list at least one trust")
    nodes = {nid: _node(nid, spec, f"{source}: nodes.{nid}") for nid, spec in nodes_raw.items()}
    projects_raw = data.get("projects", {})
    if not isinstance(projects_raw, dict):
        raise CoordinatorConfigError(f"{source}: [projects] must be a table of projects")
    projects = {
        pid: _project(pid, spec, nodes, f"{source}: projects.{pid}")
        for pid, spec in projects_raw.items()
    }
    metrics_listen = parse_metrics(data, source)
    governance = None
    if "governance" in data:
        gov = data["governance"]
        where = f"{source}: governance"
        if not isinstance(gov, dict):
            raise CoordinatorConfigError(f"{where}: must be a table")
        check_keys(gov, where, {"registry", "committee"}, {"registry", "committee"})
        governance = GovernanceSources(
            registry=resolve_path(gov["registry"], base_dir, where),
            committee=load_committee(resolve_path(gov["committee"], base_dir, where)),
        )
    return CoordinatorConfig(
        coordinator_id=cid,
        listen=parse_listen(data["listen"], f"{source}: listen"),
        state_dir=resolve_path(data["state_dir"], base_dir, source),
        catalog=catalog,
        deadline_seconds=deadline,
        max_workers=workers,
        ca=ca,
        cert=cert,
        key=key,
        nodes=MappingProxyType(nodes),
        projects=MappingProxyType(projects),
        metrics_listen=metrics_listen,
        governance=governance,
        crl=crl,
    )


def _node(nid: str, spec: Any, where: str) -> TrustEndpoint:
    if not NAME.match(nid):
        raise CoordinatorConfigError(f"{where}: node ids are lower-case letters, digits and '-'")
    if not isinstance(spec, dict):
        raise CoordinatorConfigError(f"{where}: must be a table")
    mode = spec.get("mode", "dial-in")
    if mode == "dial-out":
        check_keys(spec, where, {"mode"}, {"mode"})
        return TrustEndpoint(nid, "", dial_out=True)
    if mode != "dial-in":
        raise CoordinatorConfigError(f"{where}.mode: 'dial-in' (the default) or 'dial-out'")
    check_keys(spec, where, {"address"}, {"address", "mode"})
    return TrustEndpoint(nid, parse_listen(spec["address"], f"{where}.address"))


def _project(pid: str, spec: Any, nodes: Mapping[str, TrustEndpoint], where: str) -> Project:
    if not PROJECT_ID.match(pid):
        raise CoordinatorConfigError(f"{where}: project ids: lower-case letters, digits, '_', '-'")
    if not isinstance(spec, dict):
        raise CoordinatorConfigError(f"{where}: must be a table")
    required = {"researchers", "max_epsilon_per_query"}
    optional = {"title", "trusts", "default_epsilon", "allow_partial", "suppress_below", "round_to"}
    check_keys(spec, where, required, required | optional)
    researchers = spec["researchers"]
    if (
        not isinstance(researchers, list)
        or not researchers
        or not all(isinstance(r, str) and NAME.match(r) for r in researchers)
    ):
        raise CoordinatorConfigError(f"{where}.researchers: a non-empty list of certificate names")
    trusts = spec.get("trusts", sorted(nodes))
    if not isinstance(trusts, list) or not trusts or not all(isinstance(t, str) for t in trusts):
        raise CoordinatorConfigError(f"{where}.trusts: a non-empty list of node ids")
    unknown = sorted(set(trusts) - set(nodes))
    if unknown:
        raise CoordinatorConfigError(f"{where}.trusts: not in [nodes]: {', '.join(unknown)}")
    if len(set(trusts)) != len(trusts):
        raise CoordinatorConfigError(f"{where}.trusts: a trust is listed twice")
    per_query = _epsilon(spec["max_epsilon_per_query"], f"{where}.max_epsilon_per_query")
    default = _epsilon(spec.get("default_epsilon", 0.1), f"{where}.default_epsilon")
    if default > per_query:
        raise CoordinatorConfigError(f"{where}: default_epsilon is above max_epsilon_per_query")
    allow_partial = spec.get("allow_partial", False)
    if not isinstance(allow_partial, bool):
        raise CoordinatorConfigError(f"{where}.allow_partial: true or false")
    suppress = _whole(spec.get("suppress_below", 10), f"{where}.suppress_below", 0, 1_000)
    round_to = _whole(spec.get("round_to", 5), f"{where}.round_to", 1, 1_000)
    title = spec.get("title", pid)
    if not isinstance(title, str) or len(title) > 200:
        raise CoordinatorConfigError(f"{where}.title: a string of up to 200 characters")
    return Project(
        project_id=pid,
        title=title,
        researchers=frozenset(researchers),
        trusts=tuple(trusts),
        max_units_per_query=per_query,
        default_units=default,
        allow_partial=allow_partial,
        rules=OutputRules(suppress_below=suppress, round_to=round_to),
    )


def _epsilon(raw: Any, where: str) -> int:
    try:
        return epsilon_to_units(_number(raw, where, 0, MAX_EPSILON))
    except QueryRefused as exc:
        raise CoordinatorConfigError(f"{where}: {exc.message}") from None


def _number(raw: Any, where: str, low: float, high: float) -> float:
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or not low < raw <= high
    ):
        raise CoordinatorConfigError(f"{where}: a number above {low:g} and at most {high:g}")
    return float(raw)


def _whole(raw: Any, where: str, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise CoordinatorConfigError(f"{where}: a whole number from {low} to {high}")
    return raw

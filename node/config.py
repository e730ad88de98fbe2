"""A node's own configuration: where its data and state live, and the projects it serves.

Validated once at start-up; unknown keys are refused so that a typo never silently weakens
policy. Until signed approvals land (governance issue), projects and their budgets are declared
here by the trust itself, and the node is authoritative for them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedtre.catalog import Catalog, Tier, load_catalog
from fedtre.dp import MAX_EPSILON, epsilon_to_units
from fedtre.errors import ConfigError, QueryRefused
from fedtre.governance.documents import Purpose
from fedtre.governance.keys import PublicKey
from fedtre.governance.policy import Committee, load_committee
from fedtre.governance.verify import TrustPolicy
from fedtre.request import PROJECT_ID
from fedtre.settings import (
    check_keys,
    parse_listen,
    parse_metrics,
    read_toml,
    resolve_path,
    settings_digest,
)
from node.memory import MEMORY_LIMIT_PATTERN

NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")


@dataclass(frozen=True)
class ProjectPolicy:
    project_id: str
    title: str
    total_units: int
    max_units_per_query: int
    views: frozenset[str]
    max_tier: Tier
    purpose: str = ""  # the approved purpose (signed approvals); "" for a hand-kept project


@dataclass(frozen=True)
class GovernanceSettings:
    """``[governance]``: projects come from signed approvals, checked against keys pinned here.

    committee:        this trust's copy of the committee file (members' keys, approval policy)
    guardians:        the trust's data guardians' public keys (sign its participation)
    accept_purposes:  purposes this trust takes part in without a guardian's signature
    refuse_purposes:  purposes this trust never takes part in, whatever is signed
    project_caps:     ε this trust allows a project at most, below what the approval grants
    """

    committee: Committee
    trust: TrustPolicy
    project_caps: Mapping[str, int]
    committee_path: Path


class ServerMode(Enum):
    DIAL_IN = "dial-in"  # the node listens; the coordinator dials it
    DIAL_OUT = "dial-out"  # the node dials the coordinator and holds a stream: no inbound port


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: how ``fedtre node serve`` meets the coordinator, and whom it accepts."""

    listen: str  # dial-in: where to listen ("" in dial-out mode)
    coordinator: str  # the coordinator certificate name this node accepts, and only it
    ca: Path | None
    cert: Path | None
    key: Path | None
    max_workers: int
    mode: ServerMode = ServerMode.DIAL_IN
    connect: tuple[str, ...] = ()  # dial-out: the coordinator address(es) to dial
    crl: Path | None = None  # the federation's certificate revocation list (fedtre pki crl)


DEFAULT_MIN_EPSILON = 0.001
DEFAULT_ANSWER_SLOT_MS = 500
MAX_ANSWER_SLOT_MS = 600_000
DEFAULT_PREPARE_LEASE_SECONDS = 300.0
MAX_PREPARE_LEASE_SECONDS = 86_400.0


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    database: Path
    state_dir: Path
    catalog: Catalog
    node_total_units: int
    projects: Mapping[str, ProjectPolicy]
    duckdb_threads: int
    duckdb_memory_limit: str
    server: ServerSettings | None = None
    # The smallest ε one query may spend here: probing with tiny ε costs real budget.
    min_units_per_query: int = epsilon_to_units(DEFAULT_MIN_EPSILON)
    # Every answer leaves the node on a multiple of this slot after receipt, so its timing does
    # not depend on the data (0: off, unsafe, for measurements only).
    answer_slot_ms: int = DEFAULT_ANSWER_SLOT_MS
    # How long a prepared answer waits for the coordinator's commit or abort; then its
    # reservation is refunded and the answer destroyed (a coordinator may die between phases).
    prepare_lease_seconds: float = DEFAULT_PREPARE_LEASE_SECONDS
    # Where /metrics (Prometheus) and /healthz (plain text) are served: a local port, no TLS.
    metrics_listen: str = ""
    # Signed approvals (governance); None: the hand-kept [projects.*] above (development only).
    governance: GovernanceSettings | None = None
    # SHA-256 of the settings as read (canonical JSON): the audit log records a change of it
    config_digest: str = ""

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def audit_path(self) -> Path:
        """The audit log: in the ledger's database, so a release's entry commits with its
        debit."""
        return self.ledger_path


def load_node_config(path: Path | str) -> NodeConfig:
    path = Path(path)
    data = read_toml(path, "node config")
    config = parse_node_config(data, base_dir=path.parent, source=str(path))
    return dataclasses.replace(config, config_digest=settings_digest(data))


def parse_node_config(data: Mapping[str, Any], base_dir: Path, source: str) -> NodeConfig:
    allowed = {
        "node_id",
        "database",
        "state_dir",
        "catalog",
        "node_epsilon_ceiling",
        "projects",
        "duckdb_threads",
        "duckdb_memory_limit",
        "min_epsilon_per_query",
        "answer_slot_ms",
        "prepare_lease_seconds",
        "metrics",
        "server",
        "governance",
    }
    required = {"node_id", "database", "state_dir", "node_epsilon_ceiling"}
    check_keys(data, source, required, allowed)
    if ("projects" in data) == ("governance" in data):
        raise ConfigError(
            f"{source}: give [governance] (projects from signed approvals) or, for a "
            "development node only, hand-kept [projects.*]; not both, not neither"
        )
    node_id = data["node_id"]
    if not isinstance(node_id, str) or not NODE_ID.match(node_id):
        raise ConfigError(f"{source}: node_id must be lower-case letters, digits and '-'")
    catalog_path = data.get("catalog")
    catalog = load_catalog(
        None if catalog_path is None else resolve_path(catalog_path, base_dir, source)
    )
    ceiling = _epsilon(data["node_epsilon_ceiling"], f"{source}: node_epsilon_ceiling", 1e6)
    projects_raw = data.get("projects", {})
    if not isinstance(projects_raw, dict):
        raise ConfigError(f"{source}: 'projects' must be a table of projects")
    projects = {
        pid: _project(pid, spec, catalog, f"{source}: projects.{pid}")
        for pid, spec in projects_raw.items()
    }
    threads = data.get("duckdb_threads", 2)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 256:
        raise ConfigError(f"{source}: duckdb_threads must be a whole number from 1 to 256")
    memory = data.get("duckdb_memory_limit", "4GB")
    if not isinstance(memory, str) or not re.fullmatch(MEMORY_LIMIT_PATTERN, memory):
        raise ConfigError(f"{source}: duckdb_memory_limit must look like '4GB'")
    server = _server(data["server"], base_dir, f"{source}: server") if "server" in data else None
    min_units = _epsilon(
        data.get("min_epsilon_per_query", DEFAULT_MIN_EPSILON), f"{source}: min_epsilon_per_query"
    )
    for pid, project in projects.items():
        if project.max_units_per_query < min_units:
            raise ConfigError(
                f"{source}: projects.{pid}.max_epsilon_per_query is below min_epsilon_per_query"
            )
    slot = data.get("answer_slot_ms", DEFAULT_ANSWER_SLOT_MS)
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_ANSWER_SLOT_MS:
        raise ConfigError(
            f"{source}: answer_slot_ms must be a whole number of milliseconds from 0 to "
            f"{MAX_ANSWER_SLOT_MS} (0 turns the time slot off: unsafe)"
        )
    lease = data.get("prepare_lease_seconds", DEFAULT_PREPARE_LEASE_SECONDS)
    if (
        isinstance(lease, bool)
        or not isinstance(lease, int | float)
        or not math.isfinite(lease)
        or not 1 <= lease <= MAX_PREPARE_LEASE_SECONDS
    ):
        raise ConfigError(
            f"{source}: prepare_lease_seconds must be a number of seconds from 1 to "
            f"{MAX_PREPARE_LEASE_SECONDS:g}"
        )
    metrics_listen = parse_metrics(data, source)
    governance = (
        _governance(data["governance"], node_id, base_dir, f"{source}: governance")
        if "governance" in data
        else None
    )
    return NodeConfig(
        node_id=node_id,
        database=resolve_path(data["database"], base_dir, source),
        state_dir=resolve_path(data["state_dir"], base_dir, source),
        catalog=catalog,
        node_total_units=ceiling,
        projects=MappingProxyType(projects),
        duckdb_threads=threads,
        duckdb_memory_limit=memory,
        server=server,
        min_units_per_query=min_units,
        answer_slot_ms=slot,
        prepare_lease_seconds=float(lease),
        metrics_listen=metrics_listen,
        governance=governance,
    )


def _governance(spec: Any, node_id: str, base_dir: Path, where: str) -> GovernanceSettings:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    optional = {"guardians", "accept_purposes", "refuse_purposes", "project_caps"}
    check_keys(spec, where, {"committee"}, {"committee"} | optional)
    committee_path = resolve_path(spec["committee"], base_dir, where)
    committee = load_committee(committee_path)
    guardians = spec.get("guardians", [])
    if not isinstance(guardians, list):
        raise ConfigError(f"{where}.guardians: a list of 'ed25519:...' public keys")
    keys = tuple(PublicKey.parse(g, f"{where}.guardians") for g in guardians)

    def purposes(key: str) -> frozenset[Purpose]:
        raw = spec.get(key, [])
        try:
            if not isinstance(raw, list):
                raise ValueError
            return frozenset(Purpose(p) for p in raw)
        except ValueError:
            allowed = ", ".join(p.value for p in Purpose)
            raise ConfigError(f"{where}.{key}: a list of purposes ({allowed})") from None

    accept, refuse = purposes("accept_purposes"), purposes("refuse_purposes")
    if accept & refuse:
        raise ConfigError(f"{where}: a purpose is both accepted and refused")
    caps_raw = spec.get("project_caps", {})
    if not isinstance(caps_raw, dict):
        raise ConfigError(f"{where}.project_caps: a table of project = ε")
    caps = {}
    for pid, eps in caps_raw.items():
        if not PROJECT_ID.match(pid):
            raise ConfigError(f"{where}.project_caps: {pid!r} is not a project id")
        caps[pid] = _epsilon(eps, f"{where}.project_caps.{pid}", 1e6)
    return GovernanceSettings(
        committee=committee,
        trust=TrustPolicy(node_id, keys, accept, refuse),
        project_caps=MappingProxyType(caps),
        committee_path=committee_path,
    )


def _server(spec: Any, base_dir: Path, where: str) -> ServerSettings:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    allowed = {
        "mode",
        "listen",
        "connect",
        "coordinator",
        "ca",
        "cert",
        "key",
        "crl",
        "max_workers",
    }
    try:
        mode = ServerMode(spec.get("mode", "dial-in"))
    except ValueError:
        raise ConfigError(f"{where}.mode: 'dial-in' (the default) or 'dial-out'") from None
    needed = {"coordinator", "listen" if mode is ServerMode.DIAL_IN else "connect"}
    check_keys(spec, where, needed, allowed)
    if mode is ServerMode.DIAL_OUT and "listen" in spec:
        raise ConfigError(f"{where}: a dial-out node listens on nothing; remove 'listen'")
    if mode is ServerMode.DIAL_IN and "connect" in spec:
        raise ConfigError(f"{where}: 'connect' is for mode = \"dial-out\" only")
    coordinator = spec["coordinator"]
    if not isinstance(coordinator, str) or not NODE_ID.match(coordinator):
        raise ConfigError(f"{where}.coordinator: the coordinator's certificate name, e.g. 'hub'")
    tls = [spec.get(k) for k in ("ca", "cert", "key")]
    if any(t is not None for t in tls) and not all(t is not None for t in tls):
        raise ConfigError(f"{where}: give all of ca, cert and key, or none (development only)")
    ca, cert, key = (None if t is None else resolve_path(t, base_dir, where) for t in tls)
    crl = resolve_path(spec["crl"], base_dir, where) if "crl" in spec else None
    if crl is not None and ca is None:
        raise ConfigError(f"{where}.crl: needs ca (the list is checked against the CA)")
    workers = spec.get("max_workers", 8)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
        raise ConfigError(f"{where}.max_workers: a whole number from 1 to 256")
    connect: tuple[str, ...] = ()
    if mode is ServerMode.DIAL_OUT:
        raw = spec["connect"]
        addresses = [raw] if isinstance(raw, str) else raw
        if not isinstance(addresses, list) or not addresses or len(addresses) > 8:
            raise ConfigError(f"{where}.connect: the coordinator's address, or a list of up to 8")
        connect = tuple(parse_listen(a, f"{where}.connect") for a in addresses)
        if len(set(connect)) != len(connect):
            raise ConfigError(f"{where}.connect: an address is listed twice")
    return ServerSettings(
        listen=parse_listen(spec["listen"], f"{where}.listen") if "listen" in spec else "",
        coordinator=coordinator,
        ca=ca,
        cert=cert,
        key=key,
        max_workers=workers,
        mode=mode,
        connect=connect,
        crl=crl,
    )


def _project(pid: str, spec: Any, catalog: Catalog, where: str) -> ProjectPolicy:
    if not PROJECT_ID.match(pid):
        raise ConfigError(f"{where}: project ids are lower-case letters, digits, '_' and '-'")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    required = {"total_epsilon", "max_epsilon_per_query", "views", "max_tier"}
    check_keys(spec, where, required, required | {"title"})
    total = _epsilon(spec["total_epsilon"], f"{where}.total_epsilon", 1e6)
    per_query = _epsilon(spec["max_epsilon_per_query"], f"{where}.max_epsilon_per_query")
    if per_query > total:
        raise ConfigError(f"{where}: max_epsilon_per_query is above total_epsilon")
    views = spec["views"]
    if not isinstance(views, list) or not views or not all(isinstance(v, str) for v in views):
        raise ConfigError(f"{where}.views: must be a non-empty list of view names")
    unknown = sorted(set(views) - set(catalog.views))
    if unknown:
        raise ConfigError(f"{where}.views: not in the catalog: {', '.join(unknown)}")
    try:
        max_tier = Tier(spec["max_tier"])
    except ValueError:
        raise ConfigError(
            f"{where}.max_tier: must be one of general, mental_health, highly_sensitive"
        ) from None
    title = spec.get("title", pid)
    if not isinstance(title, str):
        raise ConfigError(f"{where}.title: must be a string")
    return ProjectPolicy(pid, title, total, per_query, frozenset(views), max_tier)


def _epsilon(raw: Any, where: str, maximum: float = MAX_EPSILON) -> int:
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or raw > maximum
    ):
        raise ConfigError(f"{where}: must be a positive number up to {maximum:g}")
    try:
        if raw <= MAX_EPSILON:
            return epsilon_to_units(raw)
        return round(raw * 1_000_000)
    except QueryRefused as exc:
        raise ConfigError(f"{where}: {exc.message}") from None

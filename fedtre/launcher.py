"""One local federation on this machine: trust nodes and coordinators as separate processes on
loopback, ports chosen by the OS, mutual TLS. Used by ``fedtre demo``, the integration tests and
the benchmarks, so all three start a federation the same way an operator would: config files and
``fedtre node serve`` / ``fedtre coordinator serve``, nothing reached into.

Each trust is either dial-in (it listens; the coordinators dial it) or dial-out (it dials every
coordinator and holds a stream; it listens on nothing). Several coordinators may serve the same
federation with the same certificate (e.g. a highly available pair), each with its own state.

Start order: dial-in nodes (their ports are then pinned so a restarted node comes back where
the coordinators expect it), coordinators (ports pinned likewise, so dial-out nodes find a
restarted coordinator), then dial-out nodes, ready once linked to a coordinator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtre.audit.log import read_audit
from fedtre.client import Client, Profile
from fedtre.governance.local import LocalGovernance, application, caps
from fedtre.governance.policy import load_committee
from fedtre.pki import Role
from fedtre.serving import wait_for_address
from fedtre.tls import TlsFiles
from fedtre.transparency.model import build as build_register
from fedtre.transparency.render import write_site

DIAL_IN, DIAL_OUT = "dial-in", "dial-out"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class TrustSpec:
    name: str
    database: Path
    mode: str = DIAL_IN
    budgets: Mapping[str, float] = field(default_factory=dict)  # project -> total ε here


@dataclass(frozen=True)
class ProjectSpec:
    project_id: str
    researchers: tuple[str, ...] = ("alice",)
    title: str = ""
    total_epsilon: float = 50.0  # at each trust, unless a trust's ``budgets`` says otherwise
    max_epsilon_per_query: float = 1.0
    default_epsilon: float | None = None
    allow_partial: bool = False
    suppress_below: int = 0
    round_to: int = 1
    views: tuple[str, ...] = ("patients", "conditions", "visits")
    max_tier: str = "mental_health"
    lay_summary: str = ""  # plain English, for the public register


@dataclass
class Proc:
    name: str
    home: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    address: str = ""
    log_offset: int = 0  # where this incarnation's lines start in the (appended) log


@dataclass
class LocalFederation:
    work: Path
    pki: Path
    trusts: Sequence[TrustSpec]
    projects: Sequence[ProjectSpec]
    coordinators: int = 1
    coordinator_name: str = "hub"
    deadline: float = 3.0
    answer_slot_ms: int = 50
    node_ceiling: float = 500.0
    duckdb_threads: int = 1
    node_workers: int | None = None  # None: the node's default
    coordinator_workers: int | None = None
    lease_seconds: float | None = None
    crl: Path | None = None  # the CA's revocation list, checked by every node and coordinator
    new_session: bool = False  # put processes in their own session (Ctrl-C handled by us)
    nodes: dict[str, Proc] = field(default_factory=dict)
    hubs: list[Proc] = field(default_factory=list)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def governance(self) -> LocalGovernance:
        """The local committee: its keys, committee file and project registry."""
        return LocalGovernance(self.work / "governance")

    def start(self) -> LocalFederation:
        self.work.mkdir(parents=True, exist_ok=True)
        self._approve_projects()
        for t in self.trusts:
            self.nodes[t.name] = Proc(t.name, self.work / t.name, self.work / f"{t.name}.log")
        dial_in = [t for t in self.trusts if t.mode == DIAL_IN]
        for t in dial_in:
            self._write_node_config(t, port=0)
            self._spawn_node(t.name)
        for t in dial_in:  # they boot in parallel; then pin each port
            proc = self.nodes[t.name]
            proc.address = self._wait(proc)
            self._write_node_config(t, port=int(proc.address.rsplit(":", 1)[1]))
        for i in range(self.coordinators):
            name = "coordinator" if i == 0 else f"coordinator-{i + 1}"
            proc = Proc(name, self.work / name, self.work / f"{name}.log")
            self.hubs.append(proc)
            self._write_coordinator_config(i, port=0)
            self._spawn(proc, ["coordinator", "serve"])
        for i, proc in enumerate(self.hubs):
            proc.address = self._wait(proc)
            self._write_coordinator_config(i, port=int(proc.address.rsplit(":", 1)[1]))
        dial_out = [t for t in self.trusts if t.mode == DIAL_OUT]
        for t in dial_out:
            self._write_node_config(t, port=0)
            self._spawn_node(t.name)
        for t in dial_out:
            self.nodes[t.name].address = self._wait(self.nodes[t.name])
        if dial_out:
            self.wait_linked()
        return self

    def stop(self) -> dict[str, int]:
        """SIGTERM to every process (SIGCONT first, for a stopped one), then wait for each
        (SIGKILL after a while). Returns the exit codes."""
        codes: dict[str, int] = {}
        procs = [p for p in self.procs() if p.popen is not None]
        for proc in procs:
            assert proc.popen is not None
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGCONT)
                    os.kill(proc.popen.pid, signal.SIGTERM)
        for proc in procs:
            assert proc.popen is not None
            try:
                codes[proc.name] = proc.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[proc.name] = proc.popen.wait()
        return codes

    def procs(self) -> list[Proc]:
        return [*self.nodes.values(), *self.hubs]

    def restart_node(self, name: str) -> None:
        proc = self.nodes[name]
        self._kill(proc)
        self._spawn_node(name)
        proc.address = self._wait(proc)
        if self._spec(name).mode == DIAL_OUT:
            self.wait_linked([name])

    def restart_coordinator(self, index: int = 0) -> None:
        proc = self.hubs[index]
        self._kill(proc)
        self._spawn(proc, ["coordinator", "serve"])
        proc.address = self._wait(proc)

    def kill(self, name: str) -> None:
        self._kill(self._proc(name))

    def signal(self, name: str, sig: signal.Signals) -> None:
        popen = self._proc(name).popen
        assert popen is not None
        os.kill(popen.pid, sig)

    def wait_linked(self, names: Sequence[str] | None = None, timeout: float = 30.0) -> None:
        """Wait until every coordinator logs an open link from each named dial-out trust."""
        wanted = set(names or [t.name for t in self.trusts if t.mode == DIAL_OUT])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(wanted <= self._linked(hub) for hub in self.hubs):
                return
            time.sleep(0.05)
        raise TimeoutError(f"dial-out trusts not linked within {timeout:.0f} s: {sorted(wanted)}")

    # -- access ----------------------------------------------------------------------------

    @property
    def coordinator(self) -> Proc:
        return self.hubs[0]

    def node_dir(self, name: str) -> Path:
        return self.work / name

    def client(
        self,
        researcher: str = "alice",
        pki: Path | None = None,
        coordinator: int = 0,
        **kw: Any,
    ) -> Client:
        files = TlsFiles.in_pki_dir(pki or self.pki, Role.RESEARCHER, researcher)
        return Client(Profile(self.hubs[coordinator].address, self.coordinator_name, files), **kw)

    def profile_text(self, researcher: str = "alice") -> str:
        files = TlsFiles.in_pki_dir(self.pki, Role.RESEARCHER, researcher)
        return (
            f'coordinator = "{self.coordinator.address}"\n'
            f'coordinator_name = "{self.coordinator_name}"\n'
            f'ca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
        )

    def audit_path(self, name: str) -> Path:
        """A trust's or coordinator's audit log (a trust's is in its ledger's database)."""
        state = self._proc(name).home / "state"
        return state / ("ledger.sqlite" if name in self.nodes else "audit.sqlite")

    def audit_logs(self) -> tuple[list[Path], list[Path]]:
        """(the coordinators' audit logs, the trusts' audit logs)."""
        return [self.audit_path(h.name) for h in self.hubs], [
            self.audit_path(n) for n in self.nodes
        ]

    def build_register(self, out: Path) -> list[Path]:
        """The public transparency register of this federation (``fedtre register build``)."""
        hubs, trusts = self.audit_logs()
        site = build_register(
            self.governance.registry, load_committee(self.governance.committee_path), hubs, trusts
        )
        return write_site(site, out)

    def audit(self, name: str) -> list[dict[str, Any]]:
        path = self.audit_path(name)
        return read_audit(path) if path.exists() else []

    def spent_units(self, name: str, scope: str) -> int:
        con = sqlite3.connect(self.node_dir(name) / "state" / "ledger.sqlite")
        try:
            row = con.execute("SELECT units FROM spent WHERE scope = ?", (scope,)).fetchone()
        except sqlite3.OperationalError:  # no ledger yet
            row = None
        finally:
            con.close()
        return 0 if row is None else int(row[0])

    def log_lines(self, name: str, current: bool = False) -> list[dict[str, Any]]:
        """The process's JSON log lines (``current``: of its latest incarnation only)."""
        proc = self._proc(name)
        with proc.log.open("rb") as f:
            f.seek(proc.log_offset if current else 0)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    # -- plumbing --------------------------------------------------------------------------

    def _spec(self, name: str) -> TrustSpec:
        return next(t for t in self.trusts if t.name == name)

    def _proc(self, name: str) -> Proc:
        if name in self.nodes:
            return self.nodes[name]
        return next(p for p in self.hubs if p.name == name)

    def _linked(self, hub: Proc) -> set[str]:
        up: set[str] = set()
        for line in self.log_lines(hub.name, current=True):
            if line.get("event") == "trust link open":
                up.add(str(line.get("node")))
            elif line.get("event") == "trust link closed":
                up.discard(str(line.get("node")))
        return up

    def write_node_config(self, name: str) -> Path:
        """Write a trust's config before the federation starts (e.g. to load its data with
        ``fedtre node load --config``); ``start`` rewrites it with the real addresses."""
        self.governance.create()
        self._write_node_config(self._spec(name), port=0, server=False)
        return self.node_dir(name) / "config.toml"

    def _write_node_config(self, t: TrustSpec, port: int, server: bool = True) -> None:
        home = self.node_dir(t.name)
        home.mkdir(parents=True, exist_ok=True)
        tls = TlsFiles.in_pki_dir(self.pki, Role.NODE, t.name)
        if t.mode == DIAL_OUT:
            targets = ", ".join(f'"{h.address}"' for h in self.hubs)
            where = f'mode = "dial-out"\nconnect = [{targets}]\n'
        else:
            where = f'listen = "127.0.0.1:{port}"\n'
        # projects come from the committee's signed approvals; the trust pins the committee
        # file (its own copy), takes part in public-benefit research by its own policy, and
        # may cap a project's budget below the approval
        pinned = home / "committee.toml"
        pinned.write_bytes(self.governance.committee_path.read_bytes())
        projects = (
            f'\n[governance]\ncommittee = "{pinned}"\n'
            'accept_purposes = ["public-benefit-research"]\n'
            f'guardians = ["{self.governance.guardian(t.name).public.text}"]\n'
            + (f"\n[governance.project_caps]\n{caps(t.budgets)}" if t.budgets else "")
        )
        lease = (
            "" if self.lease_seconds is None else f"prepare_lease_seconds = {self.lease_seconds}\n"
        )
        (home / "config.toml").write_text(
            f'node_id = "{t.name}"\ndatabase = "{t.database}"\nstate_dir = "state"\n'
            f"node_epsilon_ceiling = {self.node_ceiling}\nduckdb_threads = {self.duckdb_threads}\n"
            f"answer_slot_ms = {self.answer_slot_ms}\n{lease}\n"
            + (
                f'[server]\n{where}coordinator = "{self.coordinator_name}"\n'
                f'ca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
                + (f'crl = "{self.crl}"\n' if self.crl is not None else "")
                + ("" if self.node_workers is None else f"max_workers = {self.node_workers}\n")
                if server
                else ""
            )
            + projects
        )

    def _write_coordinator_config(self, index: int, port: int) -> None:
        home = self.hubs[index].home
        home.mkdir(parents=True, exist_ok=True)
        tls = TlsFiles.in_pki_dir(self.pki, Role.COORDINATOR, self.coordinator_name)
        nodes = "".join(
            f'[nodes.{t.name}]\nmode = "dial-out"\n\n'
            if t.mode == DIAL_OUT
            else f'[nodes.{t.name}]\naddress = "{self.nodes[t.name].address}"\n\n'
            for t in self.trusts
        )
        workers = (
            ""
            if self.coordinator_workers is None
            else f"max_workers = {self.coordinator_workers}\n"
        )
        gov = self.governance
        projects = (
            f'[governance]\nregistry = "{gov.registry.root}"\ncommittee = "{gov.committee_path}"\n'
        )
        (home / "config.toml").write_text(
            f'coordinator_id = "{self.coordinator_name}"\nlisten = "127.0.0.1:{port}"\n'
            f'state_dir = "state"\ndeadline_seconds = {self.deadline}\n{workers}\n'
            f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
            + (f'crl = "{self.crl}"\n' if self.crl is not None else "")
            + f"\n{nodes}{projects}"
        )

    def _approve_projects(self) -> None:
        gov = self.governance.create()
        trusts = [t.name for t in self.trusts]
        for p in self.projects:
            gov.approve(
                application(
                    p.project_id,
                    researchers=p.researchers,
                    trusts=trusts,
                    views=p.views,
                    max_tier=p.max_tier,
                    epsilon_per_trust=p.total_epsilon,
                    max_epsilon_per_query=p.max_epsilon_per_query,
                    default_epsilon=p.default_epsilon,
                    allow_partial=p.allow_partial,
                    suppress_below=p.suppress_below,
                    round_to=p.round_to,
                    title=p.title,
                    lay_summary=p.lay_summary,
                )
            )

    def _spawn_node(self, name: str) -> None:
        self._spawn(self.nodes[name], ["node", "serve"])

    def _spawn(self, proc: Proc, command: list[str]) -> None:
        ready = proc.home / "ready.json"
        ready.unlink(missing_ok=True)
        proc.log_offset = proc.log.stat().st_size if proc.log.exists() else 0
        with proc.log.open("ab") as out:
            proc.popen = subprocess.Popen(
                [
                    *(sys.executable, "-m", "fedtre.cli", *command),
                    *("--config", str(proc.home / "config.toml"), "--ready-file", str(ready)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=proc.home,
                start_new_session=self.new_session,
            )

    def _wait(self, proc: Proc) -> str:
        assert proc.popen is not None
        return wait_for_address(
            proc.popen, proc.home / "ready.json", proc.log, proc.name, START_TIMEOUT
        )

    def _kill(self, proc: Proc) -> None:
        if proc.popen is not None and proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGCONT)
            proc.popen.kill()
            proc.popen.wait()

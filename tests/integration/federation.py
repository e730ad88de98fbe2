"""A real federation for integration tests: three ``fedtre node serve`` processes and one
``fedtre coordinator serve`` process on loopback, ports chosen by the OS, mutual TLS from a
test CA, each started exactly as an operator would start it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from fedtre.audit import read_audit
from fedtre.client import Client, Profile
from fedtre.pki import Role, init_ca, issue
from fedtre.serving import wait_for_address
from fedtre.synthetic import generate
from fedtre.tls import TlsFiles
from node.loader import load_omop

TRUST_SIZES = {"trust-a": 1200, "trust-b": 2500, "trust-c": 4000}
PROJECT = "study"  # all trusts must answer
PARTIAL = "partial"  # partial results allowed
START_TIMEOUT = 60.0


def make_pki(directory: Path) -> Path:
    init_ca(directory)
    issue(directory, Role.COORDINATOR, "hub")
    for name in TRUST_SIZES:
        issue(directory, Role.NODE, name)
    issue(directory, Role.RESEARCHER, "alice")
    issue(directory, Role.RESEARCHER, "mallory")  # a valid researcher on no project
    # Wrong in one way each: another CA, expired, a node's cert for a name no node has.
    other = directory / "other-ca"
    init_ca(other)
    issue(other, Role.RESEARCHER, "alice")
    issue(other, Role.COORDINATOR, "hub")
    expired = directory / "expired"
    expired.mkdir()
    for f in ("ca.pem", "ca.key"):
        (expired / f).write_bytes((directory / f).read_bytes())
    now = dt.datetime.now(dt.UTC)
    issue(
        expired,
        Role.RESEARCHER,
        "alice",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    issue(
        expired,
        Role.COORDINATOR,
        "hub",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    return directory


def make_databases(directory: Path, catalog) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    out = {}
    for i, (name, persons) in enumerate(TRUST_SIZES.items()):
        omop = directory / f"{name}-omop"
        generate(omop, persons, seed=100 + i, person_id_offset=(i + 1) * 1_000_000)
        out[name] = directory / f"{name}.duckdb"
        load_omop(omop, out[name], catalog)
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""


@dataclass
class Federation:
    work: Path
    pki: Path
    databases: dict[str, Path]
    deadline: float = 3.0
    answer_slot_ms: int = 50  # real slots, short enough for a quick suite
    nodes: dict[str, Proc] = field(default_factory=dict)
    coordinator: Proc | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Federation:
        for name in self.databases:
            self._write_node_config(name, port=0)
            self.nodes[name] = self._spawn(name, ["node", "serve", "--config"], self.node_dir(name))
        for name, proc in self.nodes.items():
            proc.address = self._wait_ready(proc, self.node_dir(name))
            # Pin the port so a restarted node comes back where the coordinator expects it.
            self._write_node_config(name, port=int(proc.address.rsplit(":", 1)[1]))
        self._write_coordinator_config()
        home = self.work / "coordinator"
        self.coordinator = self._spawn("coordinator", ["coordinator", "serve", "--config"], home)
        self.coordinator.address = self._wait_ready(self.coordinator, home)
        return self

    def stop(self) -> dict[str, int]:
        codes = {}
        procs = [*self.nodes.values(), *([self.coordinator] if self.coordinator else [])]
        for proc in procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGCONT)
                    os.kill(proc.popen.pid, signal.SIGTERM)
        for proc in procs:
            try:
                codes[proc.name] = proc.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                if os.environ.get("FEDTRE_DEBUG_HANG"):
                    subprocess.run(["py-spy", "dump", "--pid", str(proc.popen.pid)], check=False)
                proc.popen.kill()
                codes[proc.name] = proc.popen.wait()
        return codes

    def restart_node(self, name: str) -> None:
        old = self.nodes[name]
        if old.popen.poll() is None:
            old.popen.kill()
            old.popen.wait()
        proc = self._spawn(name, ["node", "serve", "--config"], self.node_dir(name))
        proc.address = self._wait_ready(proc, self.node_dir(name))
        self.nodes[name] = proc

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.nodes[name].popen.pid, sig)

    # -- access ----------------------------------------------------------------------------

    def node_dir(self, name: str) -> Path:
        return self.work / name

    def client(self, researcher: str = "alice", pki: Path | None = None, **kw) -> Client:  # type: ignore[no-untyped-def]
        assert self.coordinator is not None
        files = TlsFiles.in_pki_dir(pki or self.pki, Role.RESEARCHER, researcher)
        return Client(Profile(self.coordinator.address, "hub", files), **kw)

    def audit(self, name: str) -> list[dict]:  # type: ignore[type-arg]
        path = (
            (self.work / name / "state" / "audit.jsonl")
            if name != "coordinator"
            else (self.work / "coordinator" / "state" / "audit.jsonl")
        )
        return read_audit(path) if path.exists() else []

    def spent_units(self, name: str, scope: str = f"project:{PROJECT}") -> int:
        path = self.node_dir(name) / "state" / "ledger.sqlite"
        con = sqlite3.connect(path)
        try:
            row = con.execute("SELECT units FROM spent WHERE scope = ?", (scope,)).fetchone()
        finally:
            con.close()
        return 0 if row is None else int(row[0])

    # -- plumbing --------------------------------------------------------------------------

    def _write_node_config(self, name: str, port: int) -> None:
        home = self.node_dir(name)
        home.mkdir(parents=True, exist_ok=True)
        tls = TlsFiles.in_pki_dir(self.pki, Role.NODE, name)
        projects = "".join(
            textwrap.dedent(
                f"""
                [projects.{pid}]
                total_epsilon = 50.0
                max_epsilon_per_query = 1.0
                views = ["patients", "conditions", "visits"]
                max_tier = "mental_health"
                """
            )
            for pid in (PROJECT, PARTIAL)
        )
        (home / "config.toml").write_text(
            f'node_id = "{name}"\ndatabase = "{self.databases[name]}"\nstate_dir = "state"\n'
            f"node_epsilon_ceiling = 500.0\nduckdb_threads = 1\n"
            f"answer_slot_ms = {self.answer_slot_ms}\n\n"
            f'[server]\nlisten = "127.0.0.1:{port}"\ncoordinator = "hub"\n'
            f'ca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\nmax_workers = 4\n'
            f"{projects}"
        )

    def _write_coordinator_config(self) -> None:
        home = self.work / "coordinator"
        home.mkdir(parents=True, exist_ok=True)
        tls = TlsFiles.in_pki_dir(self.pki, Role.COORDINATOR, "hub")
        nodes = "".join(f'[nodes.{n}]\naddress = "{p.address}"\n\n' for n, p in self.nodes.items())
        (home / "config.toml").write_text(
            f'coordinator_id = "hub"\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
            f"deadline_seconds = {self.deadline}\n\n"
            f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n\n{nodes}'
            f'[projects.{PROJECT}]\nresearchers = ["alice"]\nmax_epsilon_per_query = 1.0\n'
            "suppress_below = 0\nround_to = 1\n\n"
            f'[projects.{PARTIAL}]\nresearchers = ["alice"]\nmax_epsilon_per_query = 1.0\n'
            "allow_partial = true\n"
        )

    def _spawn(self, name: str, args: list[str], home: Path) -> Proc:
        log = self.work / f"{name}.log"
        ready = home / "ready.json"
        ready.unlink(missing_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [
                    *(sys.executable, "-m", "fedtre.cli", *args),
                    *(str(home / "config.toml"), "--ready-file", str(ready)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return Proc(name, popen, log)

    def _wait_ready(self, proc: Proc, home: Path) -> str:
        return wait_for_address(proc.popen, home / "ready.json", proc.log, proc.name)


def log_lines(proc: Proc) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for line in proc.log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out

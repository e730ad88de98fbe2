"""``fedtre demo``: a whole federation on this machine, end to end, over mutual TLS.

It creates a federation CA and certificates, generates synthetic OMOP data of different sizes for
three trusts, loads each with ``fedtre node load``, starts three ``fedtre node serve`` processes
and a ``fedtre coordinator serve`` process on loopback (ports chosen by the OS), runs realistic
queries as a researcher through the Python client, and stops every process cleanly. Every process
is started exactly as an operator would start it: nothing here reaches into node or coordinator
internals, and there is no switch that turns noise off.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from fedtre.client import Client, Profile
from fedtre.errors import InternalError, UserError
from fedtre.pki import Role, init_ca, issue
from fedtre.serving import wait_for_address
from fedtre.synthetic import generate
from fedtre.tls import TlsFiles

PROJECT = "mh-demo"
COORDINATOR = "hub"
RESEARCHER = "alice"
TRUSTS = (("trust-a", 12_000, 11), ("trust-b", 30_000, 12), ("trust-c", 60_000, 13))
START_TIMEOUT = 60.0

QUERIES = (
    (
        "Depression prevalence: persons with a depression diagnosis, by age band and sex",
        "SELECT age_band, sex, COUNT(DISTINCT person_id) AS persons FROM patients "
        "WHERE person_id IN (SELECT person_id FROM conditions "
        "WHERE condition_group = 'depression') GROUP BY age_band, sex",
        0.5,
    ),
    (
        "Persons by condition group. The project is approved up to mental health, so for it "
        "self-harm and eating-disorder diagnoses do not exist: their groups are not in the answer",
        "SELECT condition_group, COUNT(DISTINCT person_id) AS persons FROM conditions "
        "GROUP BY condition_group",
        0.5,
    ),
    (
        "Mean length of stay of mental-health inpatient admissions",
        "SELECT AVG(length_of_stay) AS mean_stay_days, COUNT(*) AS admissions FROM visits "
        "WHERE visit_type = 'inpatient' AND mental_health = TRUE",
        0.5,
    ),
)
REFUSED = (
    ("Row-level values (refused by the coordinator)", "SELECT age, sex FROM patients"),
    (
        "Self-harm records, above the project's approved tier (refused by every trust itself)",
        "SELECT COUNT(*) AS n FROM conditions WHERE condition_group = 'self_harm'",
    ),
)


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="run a coordinator and three trust nodes on this machine, over mutual TLS"
    )
    demo.add_argument("--dir", type=Path, help="keep the files here (default: a temp folder)")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the federation up and print how to query it (Ctrl-C stops it)",
    )
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return Demo(args.dir.resolve()).run(args.keep_running)
    if args.keep_running:  # the files must outlive this call's temp folder handling
        return Demo(Path(tempfile.mkdtemp(prefix="fedtre-demo-"))).run(True)
    with tempfile.TemporaryDirectory(prefix="fedtre-demo-") as tmp:
        return Demo(Path(tmp)).run(False)


def _say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.pki = work / "pki"
        self.processes: list[Process] = []
        self.started = time.monotonic()

    def run(self, keep_running: bool) -> int:
        try:
            self._setup()
            profile = self._start()
            _say(f"   federation up in {time.monotonic() - self.started:.1f} s\n")
            status = self._queries(profile)
            if keep_running and status == 0:
                self._wait_for_interrupt(profile)
            return status
        finally:
            self._stop()

    # -- set-up ----------------------------------------------------------------------------

    def _setup(self) -> None:
        _say("1. Federation certificate authority and certificates (fedtre pki)")
        if not (self.pki / "ca.pem").exists():
            init_ca(self.pki)
            issue(self.pki, Role.COORDINATOR, COORDINATOR)
            for name, _, _ in TRUSTS:
                issue(self.pki, Role.NODE, name)
            issue(self.pki, Role.RESEARCHER, RESEARCHER)
        _say(f"   CA, coordinator '{COORDINATOR}', 3 trusts, researcher '{RESEARCHER}'")
        _say("2. Synthetic OMOP extracts of different sizes, loaded by each trust")
        loads = []
        for i, (name, persons, seed) in enumerate(TRUSTS):
            home = self.work / name
            home.mkdir(exist_ok=True)
            self._node_config(home, name)
            if (home / f"{name}.duckdb").exists():
                continue
            generate(home / "omop", persons, seed=seed, person_id_offset=(i + 1) * 10_000_000)
            loads.append(
                self._spawn(
                    f"load-{name}",
                    ["node", "load", "--config", str(home / "node.toml"), "--source", "omop"],
                    cwd=home,
                )
            )
        for proc in loads:
            if proc.popen.wait() != 0:
                raise InternalError(f"{proc.name} failed; see {proc.log}")
            self.processes.remove(proc)
        for name, persons, _ in TRUSTS:
            _say(f"   {name}: {persons:,} persons")

    def _node_config(self, home: Path, name: str) -> None:
        tls = TlsFiles.in_pki_dir(self.pki, Role.NODE, name)
        (home / "node.toml").write_text(
            textwrap.dedent(
                f"""\
                node_id = "{name}"
                database = "{name}.duckdb"
                state_dir = "state"
                node_epsilon_ceiling = 20.0
                duckdb_threads = 1

                [server]
                listen = "127.0.0.1:0"
                coordinator = "{COORDINATOR}"
                ca = "{tls.ca}"
                cert = "{tls.cert}"
                key = "{tls.key}"

                [projects.{PROJECT}]
                title = "Demo: mental-health service use"
                total_epsilon = 10.0
                max_epsilon_per_query = 1.0
                views = ["patients", "conditions", "visits"]
                max_tier = "mental_health"
                """
            )
        )

    def _start(self) -> Profile:
        _say("3. Starting three trust nodes and the coordinator (separate processes, mTLS)")
        nodes = {}
        for name, _, _ in TRUSTS:
            home = self.work / name
            ready = home / "ready.json"
            ready.unlink(missing_ok=True)
            proc = self._spawn(
                name,
                ["node", "serve", "--config", str(home / "node.toml"), "--ready-file", str(ready)],
            )
            nodes[name] = (proc, ready)
        addresses = {name: self._wait_ready(proc, ready) for name, (proc, ready) in nodes.items()}
        for name, address in addresses.items():
            _say(f"   {name} listening on {address}")
        home = self.work / "coordinator"
        home.mkdir(exist_ok=True)
        tls = TlsFiles.in_pki_dir(self.pki, Role.COORDINATOR, COORDINATOR)
        node_tables = "\n".join(
            f'[nodes.{name}]\naddress = "{address}"\n' for name, address in addresses.items()
        )
        (home / "coordinator.toml").write_text(
            f'coordinator_id = "{COORDINATOR}"\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
            f"deadline_seconds = 20.0\n\n"
            f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n\n'
            f"{node_tables}\n"
            f"[projects.{PROJECT}]\n"
            'title = "Demo: mental-health service use"\n'
            f'researchers = ["{RESEARCHER}"]\n'
            "max_epsilon_per_query = 1.0\ndefault_epsilon = 0.25\n"
            "allow_partial = false\nsuppress_below = 10\nround_to = 5\n"
        )
        ready = home / "ready.json"
        ready.unlink(missing_ok=True)
        proc = self._spawn(
            "coordinator",
            [
                "coordinator",
                "serve",
                "--config",
                str(home / "coordinator.toml"),
                "--ready-file",
                str(ready),
            ],
        )
        address = self._wait_ready(proc, ready)
        _say(f"   coordinator listening on {address}")
        researcher = TlsFiles.in_pki_dir(self.pki, Role.RESEARCHER, RESEARCHER)
        profile_path = self.work / f"{RESEARCHER}.toml"
        profile_path.write_text(
            f'coordinator = "{address}"\ncoordinator_name = "{COORDINATOR}"\n'
            f'ca = "{researcher.ca}"\ncert = "{researcher.cert}"\nkey = "{researcher.key}"\n'
        )
        self.profile_path = profile_path
        return Profile.load(profile_path)

    def _spawn(self, name: str, args: list[str], cwd: Path | None = None) -> Process:
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fedtre.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def _wait_ready(self, proc: Process, ready: Path) -> str:
        return wait_for_address(proc.popen, ready, proc.log, proc.name, START_TIMEOUT)

    # -- queries ---------------------------------------------------------------------------

    def _queries(self, profile: Profile) -> int:
        _say(
            f"4. Researcher '{RESEARCHER}' queries project '{PROJECT}' across all trusts "
            "(each trust answers on its fixed time slot, 500 ms by default)\n"
        )
        with Client(profile) as client:
            results = []
            for title, sql, epsilon in QUERIES:
                _say(f"{textwrap.fill(f'-- {title}', 100)}\n{textwrap.fill(sql, 100)}\n")
                result = client.query(PROJECT, sql, epsilon)
                results.append(result)
                _say(textwrap.indent(result.table(), "   "))
                _say()
            first, latest = results[0], results[-1]
            _say("5. A retry with the same query id: the stored answers again, nothing spent\n")
            again = client.query(PROJECT, QUERIES[0][1], QUERIES[0][2], first.query_id)
            same = again.rows() == first.rows()
            unchanged = all(t.replayed for t in again.trusts) and [
                t.epsilon_left for t in again.trusts
            ] == [t.epsilon_left for t in latest.trusts]
            _say(f"   same numbers: {same}; budget unchanged: {unchanged}\n")
            if not (same and unchanged):
                _say("   the retry did not replay the stored answer (this is a bug)")
                return 1
            _say("6. Refused queries (no ε spent anywhere)\n")
            for title, sql in REFUSED:
                _say(f"-- {title}")
                try:
                    result = client.query(PROJECT, sql, 0.1)
                except UserError as exc:
                    _say(f"   refused ({exc.refusal.value}): {exc.message}\n")
                    continue
                if result.released:
                    _say("   NOT refused (this is a bug)")
                    return 1
                reasons = {t.reason for t in result.trusts}
                _say(f"   every trust refused: {'; '.join(sorted(reasons))}\n")
            _say("7. Budget left for the project at each trust")
            for row in client.budget(PROJECT):
                _say(f"   {row['trust']}: ε left {row['epsilon_left']:g}")
        _say(
            f"\nEvery request above, refusals included, is in the audit logs "
            f"({self.work}/*/state/audit.jsonl)."
        )
        return 0

    def _wait_for_interrupt(self, profile: Profile) -> None:
        _say(
            textwrap.dedent(
                f"""
                The federation is running (Ctrl-C stops it). In another terminal:

                  export FEDTRE_PROFILE={self.profile_path}
                  fedtre projects
                  fedtre query --project {PROJECT} --epsilon 0.2 \\
                    "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
                  fedtre budget --project {PROJECT}

                Files, logs and audit logs: {self.work}
                """
            )
        )
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.popen.poll() is None for p in self.processes):
                time.sleep(0.5)
            _say("a federation process exited; stopping")

    # -- shutdown --------------------------------------------------------------------------

    def _stop(self) -> None:
        if not self.processes:
            return
        for proc in self.processes:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGTERM)
        unclean = []
        for proc in self.processes:
            try:
                code = proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                code = proc.popen.wait()
            if code != 0:
                unclean.append(f"{proc.name} (exit {code})")
        self.processes.clear()
        if unclean:
            _say(f"8. Stopped; not cleanly: {', '.join(unclean)} (see {self.work}/logs)")
        else:
            _say(f"8. All processes stopped cleanly; total {time.monotonic() - self.started:.1f} s")

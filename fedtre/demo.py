"""``fedtre demo``: a whole federation on this machine, end to end, over mutual TLS.

It creates a federation CA and certificates, generates synthetic OMOP data of different sizes for
three trusts, loads each with ``fedtre node load``, starts three ``fedtre node serve`` processes
and a ``fedtre coordinator serve`` process on loopback (ports chosen by the OS; the one launcher,
``fedtre.launcher``), runs realistic queries as a researcher through the Python client, and stops
every process cleanly. Two trusts listen for the coordinator (dial-in); the third opens no port at
all and dials the coordinator itself (dial-out), as a trust whose firewall allows only outbound
connections would. Every process is started exactly as an operator would start it: nothing here
reaches into node or coordinator internals, and there is no switch that turns noise off.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fedtre.answer import NotReleased
from fedtre.audit.reconcile import reconcile
from fedtre.audit.verify import verify
from fedtre.client import Client, Profile
from fedtre.errors import InternalError, UserError
from fedtre.launcher import DIAL_IN, DIAL_OUT, LocalFederation, ProjectSpec, TrustSpec
from fedtre.pki import Role, init_ca, issue
from fedtre.synthetic import generate

PROJECT = "mh-demo"
COORDINATOR = "hub"
RESEARCHER = "alice"
TRUSTS = (
    ("trust-a", 12_000, 11, DIAL_IN),
    ("trust-b", 30_000, 12, DIAL_IN),
    ("trust-c", 60_000, 13, DIAL_OUT),  # its firewall allows only outbound connections
)

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

LAY_SUMMARY = (
    "We want to understand how people use mental-health services across three NHS trusts: "
    "how many people have each kind of diagnosis, how often they visit or are admitted, and "
    "how this differs by age and sex, so that services can be planned where they are needed. "
    "No one's records leave their trust; we only see totals with deliberate uncertainty added."
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


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.pki = work / "pki"
        self.started = time.monotonic()
        self.fed = LocalFederation(
            work=work,
            pki=self.pki,
            trusts=[
                TrustSpec(name, work / name / f"{name}.duckdb", mode) for name, _, _, mode in TRUSTS
            ],
            projects=[
                ProjectSpec(
                    PROJECT,
                    researchers=(RESEARCHER,),
                    title="Demo: mental-health service use",
                    lay_summary=LAY_SUMMARY,
                    total_epsilon=10.0,
                    max_epsilon_per_query=1.0,
                    default_epsilon=0.25,
                    suppress_below=10,
                    round_to=5,
                )
            ],
            coordinator_name=COORDINATOR,
            deadline=20.0,
            answer_slot_ms=500,
            node_ceiling=20.0,
            new_session=True,
        )
        self.profile_path = work / f"{RESEARCHER}.toml"

    def run(self, keep_running: bool) -> int:
        try:
            self._setup()
            profile = self._start()
            _say(f"   federation up in {time.monotonic() - self.started:.1f} s\n")
            status = self._queries(profile)
            if status == 0 and not keep_running:
                status = self._revoke(profile)
            if status == 0:
                status = self._account()
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
            for name, _, _, _ in TRUSTS:
                issue(self.pki, Role.NODE, name)
            issue(self.pki, Role.RESEARCHER, RESEARCHER)
        _say(f"   CA, coordinator '{COORDINATOR}', 3 trusts, researcher '{RESEARCHER}'")
        _say("2. Synthetic OMOP extracts of different sizes, loaded by each trust")
        loads = []
        for i, (name, persons, seed, _) in enumerate(TRUSTS):
            home = self.fed.node_dir(name)
            self.fed.write_node_config(name)
            if (home / f"{name}.duckdb").exists():
                continue
            generate(home / "omop", persons, seed=seed, person_id_offset=(i + 1) * 10_000_000)
            log = self.work / f"load-{name}.log"
            with log.open("ab") as out:
                command = ["node", "load", "--config", "config.toml", "--source", "omop"]
                loads.append(
                    (
                        name,
                        log,
                        subprocess.Popen(
                            [sys.executable, "-m", "fedtre.cli", *command],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            cwd=home,
                        ),
                    )
                )
        for name, log, popen in loads:
            if popen.wait() != 0:
                raise InternalError(f"loading {name} failed; see {log}")
        for name, persons, _, mode in TRUSTS:
            _say(f"   {name}: {persons:,} persons ({mode})")

    def _start(self) -> Profile:
        _say(
            "3. Governance: the committee (ann, a service user; bob, a clinician) signs the "
            f"approval of '{PROJECT}'\n   (Ed25519, fedtre project review); each trust pins the "
            "committee's keys and checks every request itself"
        )
        _say("4. Starting three trust nodes and the coordinator (separate processes, mTLS)")
        self.fed.start()
        approval = self.fed.governance.registry.bundle(PROJECT)
        _say(
            f"   approval of {PROJECT}: application {approval.digest[:16]}, "
            f"{len(approval.statements)} signatures"
        )
        for name, _, _, mode in TRUSTS:
            proc = self.fed.nodes[name]
            where = (
                f"listening on {proc.address}"
                if mode == DIAL_IN
                else f"dialled the coordinator at {proc.address} (no inbound port)"
            )
            _say(f"   {name} {where}")
        _say(f"   coordinator listening on {self.fed.coordinator.address}")
        self.profile_path.write_text(self.fed.profile_text(RESEARCHER))
        return Profile.load(self.profile_path)

    # -- queries ---------------------------------------------------------------------------

    def _queries(self, profile: Profile) -> int:
        _say(
            f"5. Researcher '{RESEARCHER}' queries project '{PROJECT}' across all trusts "
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
            _say("6. A retry with the same query id: the stored answers again, nothing spent\n")
            again = client.query(PROJECT, QUERIES[0][1], QUERIES[0][2], first.query_id)
            same = again.rows() == first.rows()
            unchanged = all(t.replayed for t in again.trusts) and [
                t.epsilon_left for t in again.trusts
            ] == [t.epsilon_left for t in latest.trusts]
            _say(f"   same numbers: {same}; budget unchanged: {unchanged}\n")
            if not (same and unchanged):
                _say("   the retry did not replay the stored answer (this is a bug)")
                return 1
            _say("7. Refused queries (no ε spent anywhere)\n")
            for title, sql in REFUSED:
                _say(f"-- {title}")
                try:
                    result = client.query(PROJECT, sql, 0.1)
                except UserError as exc:
                    _say(f"   refused ({exc.refusal.value}): {exc.message}\n")
                    continue
                except NotReleased as not_released:
                    result = not_released.result
                if result.released:
                    _say("   NOT refused (this is a bug)")
                    return 1
                reasons = {t.reason for t in result.trusts}
                _say(f"   every trust refused: {'; '.join(sorted(reasons))}\n")
            _say("8. Budget left for the project at each trust")
            for row in client.budget(PROJECT):
                _say(f"   {row['trust']}: ε left {row['epsilon_left']:g}")
        _say(
            "\nEvery request above, refusals included, is in the tamper-evident audit logs "
            f"(each trust's {self.work}/<trust>/state/ledger.sqlite, the coordinator's "
            "state/audit.sqlite; check one with `fedtre audit verify LOG`)."
        )
        return 0

    def _revoke(self, profile: Profile) -> int:
        _say("9. The committee revokes the project (fedtre project revoke); the researcher asks")
        self.fed.governance.revoke(PROJECT, by="ann", reason="the demo is over")
        with Client(profile) as client:
            try:
                client.query(PROJECT, QUERIES[0][1], QUERIES[0][2])
            except UserError as exc:
                _say(f"   refused ({exc.refusal.value}): {exc.message}")
                return 0
            except NotReleased:
                pass
        _say("   NOT refused (this is a bug)")
        return 1

    def _account(self) -> int:
        """What auditors and the public see: every log verified, both sides reconciled, and
        the transparency register built."""
        hubs, trusts = self.fed.audit_logs()
        checked = [verify(p) for p in [*hubs, *trusts]]
        bad = [c.path for c in checked if not c.ok]
        found = reconcile(hubs, trusts)
        _say("10. An auditor checks the logs (fedtre audit verify, fedtre audit reconcile)")
        _say(
            f"   {len(checked) - len(bad)} of {len(checked)} audit logs verify "
            f"({sum(c.size for c in checked)} entries); reconcile: "
            + (
                f"every release matches on both sides ({found.trust_releases} at the trusts)"
                if found.ok
                else f"{len(found.discrepancies)} discrepancies"
            )
        )
        out = self.work / "register"
        self.fed.build_register(out)
        _say("11. The public transparency register (fedtre register build)")
        _say(f"   open {out / 'index.html'} in a browser (HTML, no JavaScript; JSON beside it)")
        return 0 if not bad and found.ok else 1

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
            while all(p.popen is None or p.popen.poll() is None for p in self.fed.procs()):
                time.sleep(0.5)
            _say("a federation process exited; stopping")

    # -- shutdown --------------------------------------------------------------------------

    def _stop(self) -> None:
        if not any(p.popen is not None for p in self.fed.procs()):
            return
        codes = self.fed.stop()
        unclean = [f"{name} (exit {code})" for name, code in codes.items() if code != 0]
        if unclean:
            _say(f"10. Stopped; not cleanly: {', '.join(unclean)} (see {self.work}/*.log)")
        else:
            _say(
                f"12. All processes stopped cleanly; total {time.monotonic() - self.started:.1f} s"
            )

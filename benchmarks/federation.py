"""Federation benchmark: the federation's own overhead, and throughput with concurrent researchers.

    python -m benchmarks.federation [--trusts 3,5,20] [--queries 200] [--rounds 3]
                                    [--concurrency 16] [--duration 10] [--persons 2000]
                                    [--py-spy DIR]

(about 5 minutes with the defaults on a 2-core machine; ``python benchmarks/federation.py``
works too.)

For each trust count k this starts, on loopback, k real ``fedtre node serve`` processes and one
``fedtre coordinator serve`` process over mutual TLS (a fresh test PKI, ports chosen by the OS,
ready files), exactly as an operator would start them. Every trust serves a copy of one small
synthetic database (``--persons``, cached under ``benchmarks/data/``) so that a node's own work
is small and what is measured is the federation around it. The project's budget is large enough
for every query (node ``total_epsilon`` and ``node_epsilon_ceiling`` 1e6).

* sequential: after ``--warmup`` queries, ``--queries`` queries one after another through
  ``fedtre.client.Client``, each with a fresh query id. Per query: end-to-end wall time at the
  client (e2e), the slowest trust's own handling time (``handling_ms``, measured inside the node
  around the engine call, read from the coordinator's operator log: researchers never receive
  it) and overhead = e2e - max over trusts of handling_ms. Also the CPU time each process used
  per query (client, coordinator, all nodes), from /proc. Nodes run with the answer slot off
  (``answer_slot_ms = 0``): this measures the federation, ``benchmarks/timing.py`` the slot.
* throughput: ``--concurrency`` researcher threads, each with its own certificate and its own
  ``Client``, submit queries back to back for ``--duration`` seconds: queries/s and latency.
* rounds: every setting is run ``--rounds`` times with fresh processes (rounds outermost, so
  drift in the machine's load hits every trust count alike); percentiles are also given over
  the queries of all rounds pooled, and each phase records the CPU our processes used, the CPU
  everything else on the machine used, and CPU stolen by the hypervisor, so that a noisy
  neighbour shows in the figures instead of silently inflating them.
* probes: a ListProjects round trip (researcher leg only: TLS, one audit fsync), and a bare
  append+fsync on the disk holding the state directories.

Prints a table and writes ``benchmarks/federation_latest.json``. Every process started is
stopped (SIGTERM, then wait; SIGKILL after 20 s) also on errors and Ctrl-C. Not a test, not CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedtre.catalog import load_catalog  # noqa: E402
from fedtre.client import Client  # noqa: E402
from fedtre.launcher import DIAL_IN, DIAL_OUT, LocalFederation, ProjectSpec, TrustSpec  # noqa: E402
from fedtre.pki import Role, init_ca, issue  # noqa: E402
from fedtre.synthetic import generate  # noqa: E402
from node.loader import load_omop  # noqa: E402

PROJECT = "bench"
COORDINATOR = "hub"
SQL = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
# p50 overhead targets (protocol v2 issue): dial-in 5 ms at 5 trusts, 15 ms at 20; dial-out
# at most 1 ms more.
TARGETS_MS = {
    (DIAL_IN, 5): 5.0,
    (DIAL_IN, 20): 15.0,
    (DIAL_OUT, 5): 6.0,
    (DIAL_OUT, 20): 16.0,
}


# -- data and PKI -----------------------------------------------------------------------------


def prepare_database(persons: int) -> Path:
    """One synthetic trust, generated and loaded once, cached like ``run.py`` does."""
    data = HERE / "data" / f"federation-{persons}"
    db = data / "node.duckdb"
    if db.exists():
        return db
    print(f"generating and loading {persons:,} persons ...", file=sys.stderr)
    generate(data / "omop", persons, seed=7)
    load_omop(data / "omop", db, load_catalog())
    return db


def trust_names(k: int) -> list[str]:
    return [f"trust-{i:02d}" for i in range(k)]


def researcher_names(n: int) -> list[str]:
    return [f"researcher-{i:02d}" for i in range(n)]


def make_pki(directory: Path, trusts: Sequence[str], researchers: Sequence[str]) -> Path:
    init_ca(directory)
    issue(directory, Role.COORDINATOR, COORDINATOR)
    for name in trusts:
        issue(directory, Role.NODE, name)
    for name in researchers:
        issue(directory, Role.RESEARCHER, name)
    return directory


# -- processes --------------------------------------------------------------------------------


def build_federation(
    work: Path,
    pki: Path,
    databases: dict[str, Path],
    researchers: Sequence[str],
    args: argparse.Namespace,
    mode: str,
) -> LocalFederation:
    """k trusts (all dial-in or all dial-out) and one coordinator on the one launcher."""
    return LocalFederation(
        work=work,
        pki=pki,
        trusts=[TrustSpec(name, path, mode) for name, path in databases.items()],
        projects=[
            ProjectSpec(
                PROJECT,
                researchers=tuple(researchers),
                total_epsilon=1_000_000.0,
                max_epsilon_per_query=1.0,
                max_tier="highly_sensitive",
            )
        ],
        coordinator_name=COORDINATOR,
        deadline=args.deadline,
        # the federation's own overhead, not the answer slot (benchmarks/timing.py)
        answer_slot_ms=0,
        node_ceiling=1_000_000.0,
        node_workers=args.node_workers,
        coordinator_workers=args.coordinator_workers,
    )


# -- measurement helpers ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "mean": sum(values) / len(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "n": len(values),
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return float("nan"), float("nan")
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4] - ticks[7]
    return busy / os.sysconf("SC_CLK_TCK"), ticks[7] / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used during a phase by our processes, by everything else, and stolen by the host."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start_wall = time.perf_counter()
        self.start = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        self.start_own = own_cpu_seconds()
        self.start_machine = machine_cpu_seconds()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.start_wall
        per = {n: process_cpu_seconds(p) - self.start[n] for n, p in self.pids.items()}
        own = own_cpu_seconds() - self.start_own
        (busy0, steal0), (busy1, steal1) = self.start_machine, machine_cpu_seconds()
        busy, steal = busy1 - busy0, steal1 - steal0
        ours = own + sum(per.values())
        return {
            "per_process_s": per,
            "client_s": own,
            "ours_cores": ours / wall,
            "others_cores": max(busy - ours, 0.0) / wall,
            "steal_cores": steal / wall,
        }


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    query_id: str
    e2e_ms: float
    node_ms: tuple[float, ...] = ()  # each trust's own handling, from the coordinator's log

    @property
    def max_node_ms(self) -> float:
        return max(self.node_ms)

    @property
    def min_node_ms(self) -> float:
        return min(self.node_ms)

    @property
    def sum_node_ms(self) -> float:
        return sum(self.node_ms)

    @property
    def overhead_ms(self) -> float:
        return self.e2e_ms - self.max_node_ms


def one_query(client: Client, sql: str, epsilon: float, trusts: int) -> Sample:
    start = time.perf_counter()
    result = client.query(PROJECT, sql, epsilon, query_id=f"bench-{uuid.uuid4()}")
    e2e = (time.perf_counter() - start) * 1000.0
    answered = [t for t in result.trusts if t.state == "answered"]
    if not result.released or len(answered) != trusts or any(t.replayed for t in answered):
        states = {t.node_id: t.state for t in result.trusts}
        raise RuntimeError(f"query not fully answered: {result.withheld_reason or states}")
    return Sample(result.query_id, e2e)


def with_node_times(fed: LocalFederation, samples: list[Sample]) -> list[Sample]:
    """Each trust's handling time per query, from the coordinator's operator log (researchers
    never receive per-trust timings)."""
    assert fed.coordinator is not None
    times: dict[str, tuple[float, ...]] = {}
    for line in fed.coordinator.log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "query.trusts":
                times[event["query_id"]] = tuple(event["handling_ms"].values())
    return [Sample(s.query_id, s.e2e_ms, times[s.query_id]) for s in samples]


class PySpy:
    """Optional sampling profiles (py-spy ``raw`` collapsed stacks) of running processes."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, pids: dict[str, int], label: str) -> None:
        if self.directory is None:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.directory / f"{label}-{name}.txt"
            self.procs.append(
                subprocess.Popen(
                    [
                        *(exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"),
                        *("--threads", "--idle", "--nonblocking", "--output", str(out)),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # let py-spy attach before the measured queries

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def cpu_per_query(cpu: dict[str, Any], k: int, done: int) -> dict[str, float]:
    per = cpu["per_process_s"]
    nodes = sum(per[n] for n in trust_names(k))
    return {
        "client": cpu["client_s"] * 1000 / done,
        "coordinator": per["coordinator"] * 1000 / done,
        "nodes_total": nodes * 1000 / done,
        "node_mean": nodes * 1000 / done / k,
    }


def machine_share(cpu: dict[str, Any]) -> dict[str, float]:
    return {key: cpu[key] for key in ("ours_cores", "others_cores", "steal_cores")}


def sequential(
    fed: LocalFederation, client: Client, args: argparse.Namespace, k: int, spy: PySpy
) -> dict[str, Any]:
    pids = {p.name: p.popen.pid for p in fed.procs() if p.popen is not None}
    label = f"k{k}-r{args.round}"
    spy.start({"coordinator": pids["coordinator"], "node": pids[trust_names(k)[0]]}, label)
    meter = CpuMeter(pids)
    samples: list[Sample] = []
    failures: list[str] = []
    for _ in range(args.queries):
        try:
            samples.append(one_query(client, args.sql, args.epsilon, k))
        except Exception as exc:  # keep going; failures are reported, not timed
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
    wall = time.perf_counter() - meter.start_wall
    cpu = meter.stop()
    spy.stop()
    samples = with_node_times(fed, samples)
    return {
        "queries": args.queries,
        "completed": len(samples),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "wall_s": wall,
        "e2e_ms": summary([s.e2e_ms for s in samples]),
        "max_node_handling_ms": summary([s.max_node_ms for s in samples]),
        "min_node_handling_ms": summary([s.min_node_ms for s in samples]),
        "sum_node_handling_ms": summary([s.sum_node_ms for s in samples]),
        "overhead_ms": summary([s.overhead_ms for s in samples]),
        "cpu_ms_per_query": cpu_per_query(cpu, k, max(len(samples), 1)),
        "machine_cpu": machine_share(cpu),
        "samples": {
            "e2e_ms": [round(s.e2e_ms, 3) for s in samples],
            "max_node_handling_ms": [round(s.max_node_ms, 3) for s in samples],
        },
    }


def throughput(
    fed: LocalFederation, clients: list[Client], args: argparse.Namespace, k: int, spy: PySpy
) -> dict[str, Any]:
    n = len(clients)
    records: list[list[Sample]] = [[] for _ in range(n)]
    ends: list[float] = [0.0] * n
    errors: list[list[str]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            try:
                records[i].append(one_query(clients[i], args.sql, args.epsilon, k))
            except Exception as exc:  # counted; a failing federation must not spin silently
                errors[i].append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.01)
            ends[i] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    pids = {p.name: p.popen.pid for p in fed.procs() if p.popen is not None}
    profiled = {"coordinator": pids["coordinator"], "node": pids[trust_names(k)[0]]}
    spy.start({**profiled, "client": os.getpid()}, f"k{k}-r{args.round}-load")
    meter = CpuMeter(pids)
    start = meter.start_wall
    stop_at[0] = start + args.duration
    try:
        barrier.wait()
        for t in threads:
            t.join()
    finally:
        stop_at[0] = 0.0  # on an interrupt, workers stop after their current query
    elapsed = max(ends) - start
    cpu = meter.stop()
    spy.stop()
    samples = with_node_times(fed, [s for r in records for s in r])
    errs = [e for r in errors for e in r]
    done = max(len(samples), 1)
    return {
        "concurrency": n,
        "duration_s": elapsed,
        "completed": len(samples),
        "failures": len(errs),
        "failure_examples": errs[:3],
        "queries_per_s": len(samples) / elapsed if elapsed > 0 else float("nan"),
        "e2e_ms": summary([s.e2e_ms for s in samples]),
        "max_node_handling_ms": summary([s.max_node_ms for s in samples]),
        "overhead_ms": summary([s.overhead_ms for s in samples]),
        "cpu_ms_per_query": cpu_per_query(cpu, k, done),
        "machine_cpu": machine_share(cpu),
    }


def probe_list_projects(client: Client, repeats: int) -> dict[str, float]:
    """A researcher-leg round trip: TLS call to the coordinator, one audit fsync, no fan-out."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.projects()
        times.append((time.perf_counter() - start) * 1000.0)
    return summary(times)


def probe_transport_floor(
    fed: LocalFederation, pki: Path, repeats: int = 200
) -> dict[str, float] | None:
    """The bare transport of two phases: from this process, with the coordinator's certificate,
    two fan-outs one after the other of the standard health check (no handler work, no audit)
    to every trust, on a thread pool as the coordinator's fan-out does. No query can cost less
    over Python gRPC with mutual TLS on this machine. Dial-in trusts only (a dial-out node
    listens on nothing); None if there are none."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedtre.tls import TlsFiles, channel_credentials, channel_options

    dial_in = [t.name for t in fed.trusts if t.mode == DIAL_IN]
    if not dial_in:
        return None
    creds = channel_credentials(TlsFiles.in_pki_dir(pki, Role.COORDINATOR, COORDINATOR))
    channels = [
        grpc.secure_channel(fed.nodes[n].address, creds, options=channel_options(n, Role.NODE))
        for n in dial_in
    ]
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    request = health_pb2.HealthCheckRequest(service="")
    pool = futures.ThreadPoolExecutor(max_workers=min(256, max(8, 4 * len(stubs))))

    def phase() -> None:
        pending = [pool.submit(stub.Check, request, timeout=10) for stub in stubs[1:]]
        stubs[0].Check(request, timeout=10)
        for f in pending:
            f.result()

    times = []
    try:
        for _ in range(20):
            phase()
        for _ in range(repeats):
            start = time.perf_counter()
            phase()
            phase()
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        pool.shutdown()
        for c in channels:
            c.close()
    return summary(times)


def probe_transport_floor_aio(
    fed: LocalFederation, pki: Path, repeats: int = 200
) -> dict[str, float] | None:
    """The same floor as ``probe_transport_floor``, with gRPC's asyncio API and one event loop
    instead of a thread pool: whether a coordinator built on it could fan out for less. Dial-in
    trusts only; None if there are none."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedtre.tls import TlsFiles, channel_credentials, channel_options

    dial_in = [t.name for t in fed.trusts if t.mode == DIAL_IN]
    if not dial_in:
        return None
    files = TlsFiles.in_pki_dir(pki, Role.COORDINATOR, COORDINATOR)

    async def run() -> list[float]:
        creds = channel_credentials(files)
        channels = [
            grpc.aio.secure_channel(
                fed.nodes[n].address, creds, options=channel_options(n, Role.NODE)
            )
            for n in dial_in
        ]
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
        request = health_pb2.HealthCheckRequest(service="")

        async def phase() -> None:
            await asyncio.gather(*(stub.Check(request, timeout=10) for stub in stubs))

        times = []
        try:
            for _ in range(20):
                await phase()
            for _ in range(repeats):
                start = time.perf_counter()
                await phase()
                await phase()
                times.append((time.perf_counter() - start) * 1000.0)
        finally:
            for c in channels:
                await c.close()
        return times

    return summary(asyncio.run(run()))


def probe_fsync(directory: Path, repeats: int = 200) -> dict[str, float]:
    """Append one audit-sized line and fsync it: the disk's floor under a durable audit write
    (``fedtre.audit.log.AuditLog.write`` commits to SQLite with ``synchronous=FULL``)."""
    path = directory / "fsync-probe.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    times = []
    try:
        line = b"x" * 300 + b"\n"
        for _ in range(repeats):
            start = time.perf_counter()
            os.write(fd, line)
            os.fsync(fd)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return summary(times)


# -- one setting ------------------------------------------------------------------------------


def run_setting(
    mode: str, k: int, db: Path, args: argparse.Namespace, spy: PySpy
) -> dict[str, Any]:
    base = Path(args.work) if args.work else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"fedtre-federation-{mode}-{k}-", dir=base))
    print(f"[{mode}, {k} trusts] work dir {work}", file=sys.stderr)
    out: dict[str, Any] = {"mode": mode, "trusts": k, "round": args.round}
    keep = args.keep
    try:
        names = trust_names(k)
        researchers = researcher_names(max(args.concurrency, 1))
        pki = make_pki(work / "pki", names, researchers)
        databases = {}
        for name in names:
            databases[name] = work / f"{name}.duckdb"
            shutil.copyfile(db, databases[name])
            databases[name].chmod(0o600)  # the node refuses a database open to others
        fed = build_federation(work, pki, databases, researchers, args, mode)
        clients: list[Client] = []
        try:
            t0 = time.perf_counter()
            fed.start()
            startup = time.perf_counter() - t0
            print(f"[{k} trusts] started in {startup:.1f} s", file=sys.stderr)
            clients = [fed.client(r) for r in researchers]
            for _ in range(args.warmup):
                one_query(clients[0], args.sql, args.epsilon, k)
            out["startup_s"] = startup
            out["sequential"] = sequential(fed, clients[0], args, k, spy)
            print(f"[{k} trusts] sequential done", file=sys.stderr)
            out["probe_list_projects_ms"] = probe_list_projects(clients[0], 50)
            out["probe_transport_floor_ms"] = probe_transport_floor(fed, pki)
            out["probe_transport_floor_aio_ms"] = probe_transport_floor_aio(fed, pki)
            out["probe_fsync_ms"] = probe_fsync(work)
            if args.duration > 0 and args.concurrency > 0:
                for c in clients:  # connect every researcher before the clock starts
                    one_query(c, args.sql, args.epsilon, k)
                out["throughput"] = throughput(fed, clients, args, k, spy)
                print(f"[{k} trusts] throughput done", file=sys.stderr)
            return out
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    c.close()
            codes = fed.stop()
            bad = {n: c for n, c in codes.items() if c != 0}
            out["nonzero_exit_codes"] = bad
            if bad:  # keep the configs and logs for a look
                keep = True
                print(f"[{k} trusts] non-zero exit codes: {bad} (logs in {work})", file=sys.stderr)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


# -- report -----------------------------------------------------------------------------------


def _pp(d: dict[str, float]) -> str:
    return f"{d['p50']:.1f} ({d['p95']:.1f})"


def pooled(
    settings: list[dict[str, Any]], modes: Sequence[str], trusts: Sequence[int]
) -> list[dict[str, Any]]:
    """Per mode and trust count: percentiles over the sequential queries of every round."""
    out = []
    for mode, k in ((m, k) for m in modes for k in trusts):
        runs = [s for s in settings if s["trusts"] == k and s["mode"] == mode]
        e2e = [v for s in runs for v in s["sequential"]["samples"]["e2e_ms"]]
        node = [v for s in runs for v in s["sequential"]["samples"]["max_node_handling_ms"]]
        overhead = [a - b for a, b in zip(e2e, node, strict=True)]
        p50s = [s["sequential"]["overhead_ms"]["p50"] for s in runs]
        target = TARGETS_MS.get((mode, k))
        out.append(
            {
                "mode": mode,
                "trusts": k,
                "rounds": len(runs),
                "queries": len(e2e),
                "e2e_ms": summary(e2e),
                "max_node_handling_ms": summary(node),
                "overhead_ms": summary(overhead),
                "overhead_p50_per_round_ms": p50s,
                "target_overhead_p50_ms": target,
                "target_met": None if target is None else summary(overhead)["p50"] <= target,
                "rounds_meeting_target": None
                if target is None
                else sum(1 for v in p50s if v <= target),
                "queries_per_s_per_round": [
                    s["throughput"]["queries_per_s"] for s in runs if "throughput" in s
                ],
            }
        )
    return out


def _cpu(c: dict[str, float]) -> str:
    return f"{c['client']:.1f} / {c['coordinator']:.1f} / {c['nodes_total']:.1f}"


def _cores(c: dict[str, float]) -> str:
    return f"{c['ours_cores']:.2f} / {c['others_cores']:.2f} / {c['steal_cores']:.2f}"


def _label(setting: dict[str, Any], results: dict[str, Any]) -> str:
    if results["rounds"] > 1:
        return f"{setting['mode']}, {setting['trusts']} (round {setting['round']})"
    return f"{setting['mode']}, {setting['trusts']}"


def target_verdict(mode: str, k: int, overhead_p50: float) -> str:
    target = TARGETS_MS.get((mode, k))
    if target is None:
        return "–"
    return f"≤ {target:g}: {'met' if overhead_p50 <= target else 'NOT met'}"


def report_table(results: dict[str, Any]) -> str:
    lines = [
        f"machine: {results['machine']}",
        f"{results['persons_per_trust']:,} persons per trust; query: {results['sql']} at "
        f"ε = {results['epsilon']} per trust; {results['queries']} sequential queries after "
        f"{results['warmup']} warm-up",
        "",
        "Sequential (one researcher), ms, p50 (p95):",
        "",
        "| trusts | end-to-end | slowest node handling | overhead = e2e − slowest node | "
        "target (p50) | CPU ms/query: client / coordinator / all nodes | cores: ours / others "
        "/ stolen | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results["settings"]:
        q = s["sequential"]
        cpu = q["cpu_ms_per_query"]
        lines.append(
            f"| {_label(s, results)} | {_pp(q['e2e_ms'])} | {_pp(q['max_node_handling_ms'])} | "
            f"**{_pp(q['overhead_ms'])}** | "
            f"{target_verdict(s['mode'], s['trusts'], q['overhead_ms']['p50'])}"
            f" | {_cpu(cpu)} | {_cores(q['machine_cpu'])} | {q['failures']} |"
        )
    if any("throughput" in s for s in results["settings"]):
        lines += [
            "",
            f"Sustained, {results['concurrency']} concurrent researchers, "
            f"{results['duration_s']:g} s, ms p50 (p95):",
            "",
            "| trusts | queries/s | end-to-end | slowest node handling | overhead | "
            "CPU ms/query: client / coordinator / all nodes | cores: ours / others / stolen | "
            "failures |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in results["settings"]:
            t = s.get("throughput")
            if not t:
                continue
            lines.append(
                f"| {_label(s, results)} | **{t['queries_per_s']:.1f}** | {_pp(t['e2e_ms'])} | "
                f"{_pp(t['max_node_handling_ms'])} | {_pp(t['overhead_ms'])} | "
                f"{_cpu(t['cpu_ms_per_query'])} | {_cores(t['machine_cpu'])} | {t['failures']} |"
            )
    if results["rounds"] > 1:
        lines += [
            "",
            f"All {results['rounds']} rounds pooled (sequential), ms p50 (p95):",
            "",
            "| trusts | queries | end-to-end | slowest node handling | overhead | "
            "overhead p50 per round | target (p50) | queries/s per round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in results["pooled"]:
            verdict = target_verdict(p["mode"], p["trusts"], p["overhead_ms"]["p50"])
            if p["rounds_meeting_target"] is not None:
                verdict += f" ({p['rounds_meeting_target']} of {p['rounds']} rounds)"
            lines.append(
                f"| {p['mode']}, {p['trusts']} | {p['queries']} | {_pp(p['e2e_ms'])} | "
                f"{_pp(p['max_node_handling_ms'])} | **{_pp(p['overhead_ms'])}** | "
                + ", ".join(f"{v:.1f}" for v in p["overhead_p50_per_round_ms"])
                + f" | {verdict} | "
                + ", ".join(f"{v:.1f}" for v in p["queries_per_s_per_round"])
                + " |"
            )
    lines += ["", "Probes, ms p50 (p95):", ""]
    for s in results["settings"]:
        lines.append(
            f"- {s['mode']}, {s['trusts']} trusts"
            + (f", round {s['round']}" if results["rounds"] > 1 else "")
            + ": ListProjects round trip "
            f"{_pp(s['probe_list_projects_ms'])}; append+fsync {_pp(s['probe_fsync_ms'])}; "
            + (
                "two bare health-check fan-outs (the transport floor of two phases) "
                f"{_pp(s['probe_transport_floor_ms'])}; "
                if s.get("probe_transport_floor_ms")
                else ""
            )
            + (
                f"the same with gRPC's asyncio API {_pp(s['probe_transport_floor_aio_ms'])}; "
                if s.get("probe_transport_floor_aio_ms")
                else ""
            )
            + f"start-up {s['startup_s']:.1f} s"
        )
    return "\n".join(lines)


def machine() -> str:
    import duckdb
    import grpc

    mem = ""
    with contextlib.suppress(OSError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.0f} GiB"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, DuckDB {duckdb.__version__}"
    )


# -- main -------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of positive whole numbers")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trusts", type=_int_list, default=[3, 5, 20], help="default 3,5,20")
    parser.add_argument(
        "--modes",
        type=lambda t: [m for m in t.split(",") if m],
        default=[DIAL_IN, DIAL_OUT],
        help="dial-in,dial-out (default both)",
    )
    parser.add_argument("--queries", type=int, default=200, help="sequential queries per setting")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=3, help="repeat every setting (fresh processes) N times"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent researchers")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sustained load")
    parser.add_argument("--persons", type=int, default=2000, help="persons per trust")
    parser.add_argument("--epsilon", type=float, default=0.01, help="ε per query per trust")
    parser.add_argument("--sql", default=SQL)
    parser.add_argument("--deadline", type=float, default=30.0, help="coordinator deadline (s)")
    parser.add_argument("--node-workers", type=int, help="node [server] max_workers")
    parser.add_argument("--coordinator-workers", type=int, help="coordinator max_workers")
    parser.add_argument("--work", help="parent directory for per-run state (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep work dirs (configs, logs)")
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="record py-spy profiles of the coordinator and one node during the sequential "
        "and the sustained phases into this directory (perturbs the timings)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "federation_latest.json")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGTERM, _terminate)
    spy = PySpy(args.py_spy)
    try:
        db = prepare_database(args.persons)
        results: dict[str, Any] = {
            "benchmark": "federation",
            "date": dt.date.today().isoformat(),
            "command": " ".join(["python -m benchmarks.federation", *sys.argv[1:]]),
            "machine": machine(),
            "persons_per_trust": args.persons,
            "sql": args.sql,
            "epsilon": args.epsilon,
            "queries": args.queries,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "profiled_with_py_spy": args.py_spy is not None,
            "modes": args.modes,
            "targets_overhead_p50_ms": {f"{m} {k}": v for (m, k), v in TARGETS_MS.items()},
            "settings": [],
        }
        for round_ in range(1, args.rounds + 1):  # rounds outermost: drift hits every k alike
            args.round = round_
            for mode, k in ((m, k) for m in args.modes for k in args.trusts):
                results["settings"].append(run_setting(mode, k, db, args, spy))
                brief = {key: v for key, v in results["settings"][-1].items()}
                brief["sequential"] = {
                    key: v for key, v in brief["sequential"].items() if key != "samples"
                }
                print(json.dumps(brief, indent=1), file=sys.stderr)
        results["pooled"] = pooled(results["settings"], args.modes, args.trusts)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    finally:
        spy.stop()
        signal.signal(signal.SIGTERM, previous)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report_table(results))
    print(f"\nraw figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

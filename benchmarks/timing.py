"""Timing channel benchmark: can a caller tell, from a node's answer times alone, whether one
person is in the data? With the answer slot off, and on.

    python -m benchmarks.timing [--probes 2000] [--persons 20000] [--slot-ms 100] [--no-control]

Two trusts over mutual TLS on loopback (real ``fedtre node serve`` processes, started by the
integration tests' launcher): trust-a holds dataset D, trust-b holds D' = D plus one person P,
whose 25 psychosis diagnoses are the only ones dated 2030. The probe is a query whose cohort
holds exactly P::

    SELECT COUNT(*) AS n FROM conditions WHERE person_id IN
        (SELECT person_id FROM conditions WHERE condition_group = 'psychosis' AND year = 2030)

The attacker is as strong as fedtre allows: it holds the coordinator's certificate and calls
each node's ``Answer`` directly, with a fresh query id each time (ε = 0.001, the node's default
minimum, so 2,000 probes cost 2 ε per trust), alternating between the two trusts, and times
every call at the client. The two arms are compared with a two-sided Mann-Whitney U test (and a
Kolmogorov-Smirnov test). Runs:

* slot off (``answer_slot_ms = 0``): the channel the issue measured; expect a tiny p-value;
* slot on (``--slot-ms``): expect p > 0.01;
* control, slot off, D on both trusts: the test's own false-alarm check (two processes with the
  same data should not be told apart); ``--no-control`` skips it.

It reports the p-values, the median answer time per arm, what the slot costs in latency, and how
many answers overran their slot (read from the nodes' operator logs). Prints a table and writes
``benchmarks/timing_latest.json``. Not a test, not CI.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from scipy import stats  # noqa: E402

from fedtre.catalog import load_catalog  # noqa: E402
from fedtre.pki import Role, init_ca, issue  # noqa: E402
from fedtre.synthetic import generate  # noqa: E402
from fedtre.tls import TlsFiles, channel_credentials, channel_options  # noqa: E402
from fedtre.v2 import node_pb2 as npb  # noqa: E402
from fedtre.v2 import node_pb2_grpc  # noqa: E402
from node.loader import load_omop  # noqa: E402
from tests.integration.federation import PROJECT, Federation  # noqa: E402

PROBE = (
    "SELECT COUNT(*) AS n FROM conditions WHERE person_id IN (SELECT person_id FROM conditions "
    "WHERE condition_group = 'psychosis' AND year = 2030)"
)
PSYCHOSIS = 436073
EPSILON_UNITS = 1000  # ε 0.001: the node's default minimum
PERSON = 999_999_999
PRIME = "D'"  # the arm whose data holds P


def datasets(work: Path, persons: int) -> tuple[Path, Path]:
    """Load D and D' = D plus one person P with the only 2030 psychosis diagnoses."""
    d = work / "d-omop"
    generate(d, persons, seed=7, fmt="csv")
    d2 = work / "d2-omop"
    shutil.copytree(d, d2)
    _append(
        d2 / "person.csv",
        [{"person_id": PERSON, "gender_concept_id": 8532, "year_of_birth": 1980,
          "month_of_birth": 5, "day_of_birth": 5, "race_concept_id": 8527,
          "ethnicity_concept_id": 0, "person_source_value": "p"}],
    )  # fmt: skip
    _append(
        d2 / "condition_occurrence.csv",
        [
            {
                "condition_occurrence_id": PERSON * 100 + i,
                "person_id": PERSON,
                "condition_concept_id": PSYCHOSIS,
                "condition_start_date": f"2030-01-{i + 1:02d}",
            }
            for i in range(25)
        ],
    )
    catalog = load_catalog()
    out = (work / "d.duckdb", work / "d2.duckdb")
    load_omop(d, out[0], catalog)
    load_omop(d2, out[1], catalog)
    return out


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="", lineterminator="\n")
        writer.writerows({k: v for k, v in r.items() if k in header} for r in rows)


def make_pki(directory: Path) -> Path:
    init_ca(directory)
    issue(directory, Role.COORDINATOR, "hub")
    for name in ("trust-a", "trust-b"):
        issue(directory, Role.NODE, name)
    issue(directory, Role.RESEARCHER, "alice")
    return directory


def probe_run(
    work: Path, pki: Path, databases: dict[str, Path], slot_ms: int, probes: int, label: str
) -> dict[str, Any]:
    fed = Federation(work / label, pki, databases, deadline=30.0, answer_slot_ms=slot_ms)
    fed.start()
    try:
        files = TlsFiles.in_pki_dir(pki, Role.COORDINATOR, "hub")
        stubs = {}
        channels = []
        for name, proc in fed.nodes.items():
            channel = grpc.secure_channel(
                proc.address, channel_credentials(files), options=channel_options(name)
            )
            channels.append(channel)
            stubs[name] = node_pb2_grpc.NodeServiceStub(channel)
        times: dict[str, list[float]] = {name: [] for name in stubs}
        warmup = 50
        for i in range(warmup + probes):
            for name, stub in stubs.items():  # alternate the arms
                request = npb.PrepareRequest(
                    query_id=f"probe-{uuid.uuid4()}",
                    project_id=PROJECT,
                    sql=PROBE,
                    epsilon_units=EPSILON_UNITS,
                    researcher="attacker",
                )
                start = time.perf_counter()  # phase 1 is the one that reads the data
                stub.Prepare(request, timeout=30)
                took = (time.perf_counter() - start) * 1000
                decision = npb.DecisionRequest(
                    query_id=request.query_id, project_id=request.project_id
                )
                stub.Commit(decision, timeout=30)
                if i >= warmup:
                    times[name].append(took)
            if i and i % 500 == 0:
                print(f"  {label}: {i} probes per arm", file=sys.stderr)
        for channel in channels:
            channel.close()
    finally:
        fed.stop()
    overruns = sum(
        1
        for name in fed.nodes
        for e in fed.log_lines(name)
        if e.get("event") == "answer overran its slot"
    )
    a, b = times["trust-a"], times["trust-b"]
    return {
        "label": label,
        "slot_ms": slot_ms,
        "probes_per_arm": probes,
        "median_ms": {"D": statistics.median(a), PRIME: statistics.median(b)},
        "mean_ms": {"D": statistics.fmean(a), PRIME: statistics.fmean(b)},
        "p99_ms": {"D": _pct(a, 0.99), PRIME: _pct(b, 0.99)},
        "mann_whitney_p": float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue),
        "ks_p": float(stats.ks_2samp(a, b).pvalue),
        "overruns": overruns,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(results: dict[str, Any]) -> str:
    lines = [
        f"machine: {results['machine']}; {results['persons']:,} persons; "
        f"{results['probes']:,} probes per arm; ε {EPSILON_UNITS / 1e6:g} per probe",
        "",
        "| run | slot | median D / D' (ms) | p99 D / D' (ms) | Mann-Whitney p | KS p | overruns |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        med, p99 = r["median_ms"], r["p99_ms"]
        lines.append(
            f"| {r['label']} | {r['slot_ms'] or 'off'} | {med['D']:.2f} / {med[PRIME]:.2f} "
            f"| {p99['D']:.2f} / {p99[PRIME]:.2f} | {r['mann_whitney_p']:.3g} "
            f"| {r['ks_p']:.3g} | {r['overruns']} |"
        )
    off = next(r for r in results["runs"] if r["label"] == "slot off")
    on = next(r for r in results["runs"] if r["label"] == "slot on")
    cost = statistics.fmean(on["median_ms"].values()) - statistics.fmean(off["median_ms"].values())
    lines += ["", f"latency the slot costs (median, slot on − slot off): {cost:.1f} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=2000, help="probes per arm")
    parser.add_argument("--persons", type=int, default=20_000)
    parser.add_argument("--slot-ms", type=int, default=100)
    parser.add_argument("--no-control", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedtre-timing-") as tmp:
        work = Path(tmp)
        print(f"loading D and D' ({args.persons:,} persons) ...", file=sys.stderr)
        d, d2 = datasets(work, args.persons)
        pki = make_pki(work / "pki")
        runs = [
            probe_run(work, pki, {"trust-a": d, "trust-b": d2}, 0, args.probes, "slot off"),
            probe_run(work, pki, {"trust-a": d, "trust-b": d2}, args.slot_ms, args.probes,
                      "slot on"),
        ]  # fmt: skip
        if not args.no_control:
            d_copy = work / "d-copy.duckdb"
            shutil.copyfile(d, d_copy)
            d_copy.chmod(0o600)  # the node refuses a database open to others
            runs.append(
                probe_run(work, pki, {"trust-a": d, "trust-b": d_copy}, 0, args.probes,
                          "control: D on both, slot off")
            )  # fmt: skip
    results = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "persons": args.persons,
        "probes": args.probes,
        "probe": PROBE,
        "runs": runs,
    }
    (HERE / "timing_latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

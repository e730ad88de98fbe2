"""``fedtre audit export``: CSV, JSON lines and Parquet, with filters, ε as units and decimals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedtre.audit.events import Event
from fedtre.audit.export import Filters, export
from fedtre.audit.log import AuditLog
from fedtre.cli import main


@pytest.fixture
def logs(tmp_path: Path) -> list[Path]:
    hub = AuditLog(tmp_path / "hub.sqlite", "hub", role="coordinator")
    trust = AuditLog(tmp_path / "ledger.sqlite", "trust-a")
    for i, (project, researcher) in enumerate(
        [("study", "alice"), ("study", "bob"), ("other", "alice")]
    ):
        hub.write(
            Event.QUERY_RELEASED,
            query_id=f"q{i}",
            project=project,
            researcher=researcher,
            trusts={"trust-a": "answered", "trust-b": "answered"},
            spent_epsilon_units={"trust-a": 250_000, "trust-b": 250_000},
        )
        trust.write(
            Event.QUERY_RELEASED,
            query_id=f"q{i}",
            project=project,
            caller="coordinator:hub",
            epsilon_units=250_000,
        )
    hub.write(
        Event.QUERY_REFUSED,
        query_id="q9",
        project="study",
        researcher="bob",
        refusal="out_of_scope",
        reason="beyond the approved tier",
    )
    hub.close()
    trust.close()
    return [tmp_path / "hub.sqlite", tmp_path / "ledger.sqlite"]


def test_csv_has_flat_columns_and_epsilon_in_both_forms(logs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "all.csv"
    n = export(logs, Filters(events=(Event.QUERY_RELEASED,)), "csv", out)
    rows = list(csv.DictReader(out.open()))
    assert n == len(rows) == 6
    hub_rows = [r for r in rows if r["role"] == "coordinator"]
    assert {r["epsilon_units"] for r in hub_rows} == {"500000"}  # over both trusts
    assert {r["epsilon"] for r in rows if r["role"] == "node"} == {"0.25"}
    assert all(json.loads(r["entry"])["event"] == "query.released" for r in rows)


def test_filters_by_project_researcher_trust_and_time(logs: list[Path], tmp_path: Path) -> None:
    def count(**kw: object) -> int:
        return export(logs, Filters(**kw), "json", tmp_path / "out.jsonl")  # type: ignore[arg-type]

    assert count(project="other") == 2
    assert count(researcher="bob") == 2  # a release and a refusal
    assert count(researcher="bob", events=(Event.QUERY_REFUSED,)) == 1
    # trust-a: its own entries, and the coordinator's entries that cover it
    assert count(trust="trust-a", events=(Event.QUERY_RELEASED,)) == 6
    assert count(trust="trust-b", events=(Event.QUERY_RELEASED,)) == 3
    assert count(since="2000-01-01", until="2001-01-01") == 0
    assert count(since="2000-01-01") == 9  # every entry, the two log.created included


def test_parquet_and_the_command_line(logs: list[Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "all.parquet"
    args = ["audit", "export", *map(str, logs), "--format", "parquet", "--out", str(out)]
    assert main([*args, "--project", "study"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 5 and "epsilon" in table.column_names  # 2 + 1 refusal, 2
    assert main(["audit", "export", *map(str, logs), "--format", "parquet"]) == 3  # needs --out
    assert "needs --out" in capsys.readouterr().err


def test_epsilon_per_trust_meaning_formulas_and_times(tmp_path: Path) -> None:
    hub = AuditLog(tmp_path / "hub.sqlite", "hub", role="coordinator")
    hub.write(
        Event.QUERY_RELEASED,
        query_id="=HYPERLINK(1)",  # chosen by a researcher
        project="study",
        researcher="alice",
        trusts={"trust-a": "answered", "trust-b": "answered"},
        spent_epsilon_units={"trust-a": 100_000, "trust-b": 100_000},
    )
    hub.write(Event.QUERY_ABORTED, query_id="q2", project="study", refunded_epsilon_units=5)
    hub.close()
    out = tmp_path / "a.csv"
    export([tmp_path / "hub.sqlite"], Filters(trust="trust-a"), "csv", out)
    (row,) = list(csv.DictReader(out.open()))
    assert row["epsilon"] == "0.1" and row["epsilon_meaning"] == "spent"  # trust-a's share
    assert row["query_id"] == "'=HYPERLINK(1)"  # never a formula in a spreadsheet
    export([tmp_path / "hub.sqlite"], Filters(events=(Event.QUERY_ABORTED,)), "csv", out)
    (row,) = list(csv.DictReader(out.open()))
    assert row["epsilon_meaning"] == "refunded"
    # a time with a space, or a date, compares as the log's own times do
    assert export([tmp_path / "hub.sqlite"], Filters(since="2000-01-01 10:00"), "json", out) == 3
    with pytest.raises(ValueError, match="trust name"):
        export([tmp_path / "hub.sqlite"], Filters(trust='trust-a"'), "csv", out)

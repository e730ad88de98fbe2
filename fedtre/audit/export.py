"""Export audit entries for auditors: CSV, JSON lines or Parquet, filtered.

Filters (all optional, combined with AND): project, researcher (the coordinator's
``researcher``; at a trust, a query's signer is checked but the entry names its ``caller``),
trust (the trust that wrote the entry, or a coordinator entry that covers it), event kinds,
and a time range. Every row keeps the full entry as JSON (``entry``) beside flat columns; ε
appears in units (millionths, exact) and as a decimal (``epsilon``), so no one has to know how
the ledger stores it. Filters run inside SQLite, so years of activity export in seconds.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedtre.audit.events import Event

COLUMNS = (
    "log",
    "seq",
    "ts",
    "role",
    "actor",
    "event",
    "project",
    "query_id",
    "researcher",
    "caller",
    "epsilon_units",
    "epsilon",
    "epsilon_meaning",
    "refusal",
    "reason",
    "entry",
)


@dataclass(frozen=True)
class Filters:
    project: str | None = None
    researcher: str | None = None
    trust: str | None = None
    events: tuple[Event, ...] = ()
    since: str | None = None  # ISO time, inclusive
    until: str | None = None  # ISO time, exclusive

    def sql(self) -> tuple[str, list[Any]]:
        where, args = [], []
        if self.project is not None:
            where.append("json_extract(entry, '$.project') = ?")
            args.append(self.project)
        if self.researcher is not None:
            where.append("json_extract(entry, '$.researcher') = ?")
            args.append(self.researcher)
        if self.trust is not None:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.trust):
                raise ValueError(f"not a trust name: {self.trust[:64]!r}")
            where.append(
                "(json_extract(entry, '$.node') = ? OR json_extract(entry, '$.trust') = ? "
                "OR json_type(entry, '$.trusts.\"' || ? || '\"') IS NOT NULL)"
            )
            args += [self.trust, self.trust, self.trust]
        if self.events:
            where.append(f"json_extract(entry, '$.event') IN ({','.join('?' * len(self.events))})")
            args += [e.value for e in self.events]
        if self.since is not None:
            where.append("json_extract(entry, '$.ts') >= ?")
            args.append(_when(self.since))
        if self.until is not None:
            where.append("json_extract(entry, '$.ts') < ?")
            args.append(_when(self.until))
        return (" WHERE " + " AND ".join(where)) if where else "", args


def rows(logs: Sequence[Path], filters: Filters) -> Iterator[dict[str, Any]]:
    where, args = filters.sql()
    for path in logs:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            for seq, text in con.execute(
                f"SELECT seq, entry FROM audit_log{where} ORDER BY seq", args
            ):
                yield _row(path, seq, text, filters.trust)
        finally:
            con.close()


# What the ε of an entry means (one column, so that sums are never mixed by accident).
_MEANING = {
    "query.received": "requested",
    "query.reserved": "reserved (refunded unless released)",
    "query.prepared": "reserved (refunded unless released)",
    "query.released": "spent",
    "query.replayed": "spent (0: an earlier answer again)",
    "query.withheld": "spent",
    "query.aborted": "refunded",
    "query.expired": "refunded",
}


def _row(path: Path, seq: int, text: str, trust: str | None = None) -> dict[str, Any]:
    e = json.loads(text)
    role = next((r for r in ("node", "coordinator", "registry") if r in e), "")
    units = e.get("epsilon_units")
    if units is None and isinstance(e.get("spent_epsilon_units"), dict):
        shares = e["spent_epsilon_units"]
        if trust is not None:  # the coordinator's record, for the one trust asked about
            units = int(shares.get(trust, 0))
        else:
            units = sum(int(u) for u in shares.values())
    if units is None:
        units = e.get("refunded_epsilon_units")
    if isinstance(units, bool) or not isinstance(units, int):
        units = None
    return {
        "log": str(path),
        "seq": seq,
        "ts": e.get("ts", ""),
        "role": role,
        "actor": e.get(role, "") if role else "",
        "event": e.get("event", ""),
        "project": e.get("project", ""),
        "query_id": e.get("query_id", ""),
        "researcher": e.get("researcher", ""),
        "caller": e.get("caller", ""),
        "epsilon_units": units,
        "epsilon": units / 1_000_000 if units is not None else None,
        "epsilon_meaning": _MEANING.get(str(e.get("event")), "") if units is not None else "",
        "refusal": e.get("refusal", ""),
        "reason": e.get("reason", ""),
        "entry": text,
    }


def export(logs: Sequence[Path], filters: Filters, fmt: str, out: Path | None) -> int:
    """Write the matching rows as ``csv``, ``json`` (one object per line) or ``parquet``
    (needs ``out``); returns how many rows were written."""
    if fmt == "parquet":
        if out is None:
            raise ValueError("Parquet needs --out FILE")
        return _parquet(rows(logs, filters), out)
    stream: IO[str] = sys.stdout if out is None else out.open("w", encoding="utf-8", newline="")
    try:
        n = 0
        if fmt == "csv":
            writer = csv.DictWriter(stream, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows(logs, filters):
                writer.writerow({k: _cell(v) for k, v in row.items()})
                n += 1
        elif fmt == "json":
            for row in rows(logs, filters):
                record = json.loads(row["entry"])
                record["log"] = row["log"]
                stream.write(json.dumps(record, sort_keys=True) + "\n")
                n += 1
        else:
            raise ValueError(f"unknown format {fmt!r}: csv, json or parquet")
        return n
    finally:
        if out is not None:
            stream.close()


def _cell(value: Any) -> Any:
    """A spreadsheet never runs a cell as a formula: text starting =, +, -, @, tab or CR (a
    query id a researcher chose, say) gets a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _when(text: str) -> str:
    """An ISO date or time, as the log writes times (UTC, 'T'), for comparing as text."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"not an ISO date or time: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _parquet(source: Iterator[dict[str, Any]], out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            (c, pa.int64() if c in ("seq", "epsilon_units") else pa.float64())
            if c in ("seq", "epsilon_units", "epsilon")
            else (c, pa.string())
            for c in COLUMNS
        ]
    )
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in source:
            batch.append(row)
            if len(batch) == 50_000:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n += len(batch)
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        n += len(batch)
    return n

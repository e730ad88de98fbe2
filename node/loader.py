"""Build a node's research database from an OMOP CDM extract.

Sources: a folder of CSV / Parquet files (``person.csv``, ``condition_occurrence.parquet``, ...;
a folder of Parquet parts per table also works) or an OMOP DuckDB file. The research views
declared in the catalog (``patients``, ``conditions``, ``visits``) are built in a new file that
replaces the node database only once everything succeeded: a bad or missing file leaves the
existing database untouched.

Condition concepts map to condition groups through a mapping file (concept ids per group; with
the OMOP ``concept_ancestor`` table present, descendants are included too; the most specific
match wins). Unmapped concepts become ``other`` and are reported. Persons on the opt-out list
are removed from every view.

Everything derived for one person depends only on that person's own rows and on public
parameters, never on other persons, on row order or on the data's extremes:

* ages are computed at the catalog's ``reference_date``, the same at every trust;
* a diagnosis takes its setting, and a visit its mental-health flag, only from rows of the same
  person (a diagnosis naming another person's visit is counted in the report, not linked);
* each person's rows are numbered, per row level (``node.database.rank_column``), in the order
  of a hash of each row's own values; the query compiler keeps ranks up to the view's cap;
* every source value is cast by the loader itself (CSV fields are read as text), so a
  malformed value makes that one value missing; it never fails the load or retypes a column.

The load report is for trust IT on the node's own console; it never leaves the trust.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from fedtre import __version__
from fedtre.catalog import Catalog, Column, ColumnType, View
from node.database import (
    META_TABLE,
    clamped_column,
    kept_column,
    rank_column,
    row_tier_sql,
    stored_columns,
)
from node.errors import LoadError
from node.load_progress import LoadProgress
from node.memory import DUCKDB_SHARE, MEMORY_LIMIT_PATTERN, default_memory_limit, memory_bytes

Progress = Callable[[str], None]

REQUIRED = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id"],
    "condition_occurrence": ["person_id", "condition_concept_id", "condition_start_date"],
    "visit_occurrence": [
        "visit_occurrence_id",
        "person_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_end_date",
    ],
}
OPTIONAL_TABLES = {
    "concept": ["concept_id", "concept_name"],  # names in the unmapped-concepts report only
    "observation_period": ["person_id", "observation_period_end_date"],
    "concept_ancestor": [
        "ancestor_concept_id",
        "descendant_concept_id",
        "min_levels_of_separation",
    ],
}
MENTAL_HEALTH_GROUPS = (
    "depression",
    "anxiety",
    "psychosis",
    "bipolar",
    "self_harm",
    "eating_disorder",
    "adhd",
    "dementia",
)
SEX = {8532: "female", 8507: "male"}
RACE = {
    8527: "white",
    8515: "asian",
    8516: "black",
    8522: "mixed_other",
    8657: "mixed_other",
    8557: "mixed_other",
}
HISPANIC = 38003563
VISIT_TYPE = {
    9201: "inpatient",
    262: "inpatient",
    9202: "outpatient",
    9203: "emergency",
    581476: "community",
    5083: "community",
    38004193: "community",
}
# The scratch database (in the spill directory) holding the largest staging tables.
SCRATCH = "scratch"
VISIT_SRC = f"{SCRATCH}.visit_src"
COND_GROUPED = f"{SCRATCH}.cond_grouped"
AGE_BANDS = [
    (17, "0-17"),
    (24, "18-24"),
    (34, "25-34"),
    (44, "35-44"),
    (54, "45-54"),
    (64, "55-64"),
    (74, "65-74"),
    (84, "75-84"),
]


@dataclass(frozen=True)
class LoadReport:
    database: Path
    reference_date: dt.date
    persons: int
    conditions: int
    visits: int
    persons_dropped: int
    opted_out: int
    conditions_dropped: int
    visits_dropped: int
    conditions_other_persons_visit: int
    unmapped_concepts: int
    unmapped_condition_rows: int
    concepts_mixed_tiers: int
    persons_over_cap: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    unmapped_report: Path | None = None
    warnings: tuple[str, ...] = ()

    @property
    def accepted_rows(self) -> int:
        """Rows taken into the views, before the per-person row cap drops any."""
        return self.persons + self.conditions + self.visits

    def lines(self) -> list[str]:
        over = ", ".join(f"{v}: {n:,}" for v, n in self.persons_over_cap.items()) or "none"
        return [
            f"node database      {self.database}",
            f"reference date     {self.reference_date.isoformat()}",
            f"patients           {self.persons:,} rows",
            f"conditions         {self.conditions:,} rows",
            f"visits             {self.visits:,} rows",
            f"persons dropped    {self.persons_dropped:,} (no valid id or year of birth)",
            f"opted out          {self.opted_out:,} persons removed from every view",
            f"conditions dropped {self.conditions_dropped:,} (no valid date, or person unknown)",
            f"visits dropped     {self.visits_dropped:,} (no valid start date, or person unknown)",
            f"foreign visit ids  {self.conditions_other_persons_visit:,} diagnoses name a visit "
            "of another person: their setting is 'unknown'",
            f"unmapped concepts  {self.unmapped_concepts:,} condition concepts, "
            f"{self.unmapped_condition_rows:,} rows: counted as 'other'",
            *(
                [
                    f"                   review them in {self.unmapped_report} (one line per "
                    "concept, most rows first; exact counts: keep it inside the trust); to "
                    "count one in a group, add it to a mapping file and load again with "
                    "--mapping",
                ]
                if self.unmapped_report is not None and self.unmapped_concepts
                else []
            ),
            f"mixed tiers        {self.concepts_mixed_tiers:,} concepts match groups of "
            "different tiers: each counts in its highest-tier group",
            f"over the row cap   {over} persons (their extra rows are not stored)",
            f"took               {self.seconds:.1f} s "
            f"({self.accepted_rows / max(self.seconds, 1e-9):,.0f} rows/s taken into the views)",
            *(f"WARNING            {w}" for w in self.warnings),
        ]


def load_omop(
    source: Path,
    out: Path,
    catalog: Catalog,
    mapping: Path | None = None,
    opt_out: Path | None = None,
    progress: Progress | None = None,
    memory_limit: str | None = None,
    threads: int | None = None,
    extract_date: dt.date | None = None,
) -> LoadReport:
    """Build the node database ``out`` from an OMOP extract. ``memory_limit`` (e.g. "4GB";
    default ``default_memory_limit()``) caps DuckDB's memory; ``threads`` its worker threads
    (default: every core). ``extract_date``: when the trust took the extract (default: today);
    every answer states it, so researchers know how fresh each trust's data is."""
    started = time.perf_counter()

    def say(message: str) -> None:
        if progress is not None:
            progress(f"[{time.perf_counter() - started:6.1f} s] {message}")

    memory_limit = memory_limit or default_memory_limit()
    if (
        not re.fullmatch(MEMORY_LIMIT_PATTERN, memory_limit, re.IGNORECASE)
        or memory_bytes(memory_limit) < 64e6
    ):
        raise LoadError(
            f"memory limit {memory_limit!r} must look like '4GB' or '512MB', at least 64MB"
        )
    if threads is not None and not 1 <= threads <= 256:
        raise LoadError("threads must be a whole number from 1 to 256")
    _check_catalog(catalog)
    if not source.exists():
        raise LoadError(f"source {source} does not exist")
    groups = _read_mapping(mapping, catalog)
    out = out.resolve()
    # Everything written from here holds person-level data: owner only (files 0600, the spill
    # directory 0700), from the moment it is created.
    umask = os.umask(0o077)
    try:
        return _load_private(
            source,
            out,
            catalog,
            groups,
            opt_out,
            memory_limit,
            threads,
            say,
            started,
            progress,
            extract_date or dt.datetime.now(dt.UTC).date(),
        )
    finally:
        os.umask(umask)


def _load_private(
    source: Path,
    out: Path,
    catalog: Catalog,
    groups: Any,
    opt_out: Path | None,
    memory_limit: str,
    threads: int | None,
    say: Callable[[str], None],
    started: float,
    progress: Progress | None,
    extract_date: dt.date,
) -> LoadReport:
    out.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_interrupted_loads(out)
    if removed:
        say(f"removed {removed} file(s) left by an interrupted load")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    unmapped_report = unmapped_report_path(out)
    tmp_unmapped = tmp.with_name(tmp.name + ".unmapped.csv")
    spill = tmp.with_name(tmp.name + ".spill")
    # DuckDB's limit covers its buffer pool; reading files, its other allocations and Python
    # take the rest (measured: peak RSS about 1.2x DuckDB's limit), so the whole load stays
    # within the limit given.
    duckdb_limit = f"{int(memory_bytes(memory_limit) * DUCKDB_SHARE / 2**20)}MiB"
    config: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": duckdb_limit,
        "temp_directory": str(spill),
        # Insertion order is never relied on (ranks follow each row's content; the final
        # tables are written with ORDER BY), and keeping it costs memory on large loads.
        "preserve_insertion_order": False,
    }
    if threads is not None:
        config["threads"] = threads
    con: duckdb.DuckDBPyConnection | None = None
    try:  # from the moment the file exists, any way out removes it (SIGTERM included)
        _fresh_private_dir(spill)
        con = duckdb.connect(str(tmp), config=config)
        # The largest staging tables (every visit and diagnosis row, typed) are written to a
        # scratch database in the spill directory, not kept as temporary tables: stored there
        # they are compressed, and DuckDB can drop their pages from memory without writing
        # them out again, so the per-person numbering keeps its memory (10M persons under a
        # 4 GB limit: 140.7 s -> 124.8 s). Removed with the spill directory on every way out.
        con.execute(f"ATTACH {_sql_str(str(spill / 'stage.duckdb'))} AS {SCRATCH}")
        # DuckDB tracks each statement's progress; the load shows it (node.load_progress)
        # instead of DuckDB printing its own bar on stdout.
        con.execute("SET enable_progress_bar = true")
        con.execute("SET enable_progress_bar_print = false")
        say(f"memory limit {memory_limit} (DuckDB {duckdb_limit}), spilling to {spill}")
        _no_type_pushdown(con)
        watching = progress.watching(con) if isinstance(progress, LoadProgress) else nullcontext()
        with watching:
            found = _stage_sources(con, source, say)
            mixed_tiers = _stage_mapping(con, groups, "concept_ancestor" in found, catalog, say)
            ref = catalog.reference_date
            say(f"reference date for ages: {ref.isoformat()} (from the catalog)")
            _stage_opt_out(con, opt_out)
            report = _build_views(con, catalog, say, "concept" in found)
            _validate(con, catalog)
        con.execute(f"CREATE TABLE {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)")
        meta = {
            "catalog_version": catalog.version,
            "catalog_digest": catalog.digest,
            "reference_date": ref.isoformat(),
            "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "extract_date": extract_date.isoformat(),
            "fedtre_version": __version__,
            "source_kind": "duckdb" if source.is_file() else "folder",
        }
        con.executemany(f"INSERT INTO {META_TABLE} VALUES (?, ?)", list(meta.items()))
        con.execute("CHECKPOINT")
        con.execute(
            "COPY (SELECT * FROM unmapped_concepts ORDER BY condition_rows DESC, concept_id) "
            f"TO {_sql_str(str(tmp_unmapped))} (HEADER, DELIMITER ',')"
        )
        con.close()
        os.chmod(tmp, 0o600)
        os.chmod(tmp_unmapped, 0o600)
        os.replace(tmp, out)
        os.replace(tmp_unmapped, unmapped_report)
    except duckdb.Error as exc:
        if con is not None:
            con.close()
        _remove(tmp)
        tmp_unmapped.unlink(missing_ok=True)
        raise LoadError(f"loading failed: {_described(exc)}") from exc
    except BaseException:
        if con is not None:
            con.close()
        _remove(tmp)
        tmp_unmapped.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    say(f"node database written: {out}")
    return LoadReport(
        database=out,
        reference_date=ref,
        seconds=time.perf_counter() - started,
        concepts_mixed_tiers=mixed_tiers,
        unmapped_report=unmapped_report,
        warnings=tuple(_opt_out_warnings(opt_out)),
        **report,
    )


def _opt_out_warnings(opt_out: Path | None) -> list[str]:
    """The opt-out register names persons who said no: it is person-level, owner-only data."""
    if opt_out is None:
        return []
    mode = stat.S_IMODE(opt_out.stat().st_mode)
    if mode & 0o077:
        return [
            f"the opt-out list {opt_out} is readable by other users (mode {mode:04o}): "
            f"chmod 600 {opt_out}"
        ]
    return []


def unmapped_report_path(database: Path) -> Path:
    """The unmapped-concepts report written beside ``database`` by every load."""
    return database.with_name(database.stem + ".unmapped-concepts.csv")


# DuckDB errors that are not about the extract's files, said plainly (no CSV advice).
_PLAIN_ERRORS = {
    "IOException": "a file could not be read or written: check the free disk space and the "
    "permissions beside the output (the load stages its rows there) and of the source files",
    "OutOfMemoryException": "DuckDB ran out of memory: give the load more with --memory-limit, "
    "or free memory on this server",
}


def _described(exc: duckdb.Error) -> str:
    """DuckDB's error without the values it quotes (a row of the extract, a number): its kind,
    and the line of a CSV file when it names one. For trust IT, on the node's console."""
    text = str(exc)
    name = type(exc).__name__
    if name in _PLAIN_ERRORS:
        return _PLAIN_ERRORS[name]
    kind = re.sub(r"(?<!^)(?=[A-Z])", " ", name.removesuffix("Exception")).lower()
    line = re.search(r"CSV Error on Line: (\d+)", text)
    path = re.search(r'(?:sniffing file "|\bfile = )([^"\n]+)', text)
    where = f" at line {line.group(1)}" if line else ""
    where += f" of {path.group(1).strip()}" if path else (" of a CSV file" if line else "")
    return (
        f"{kind or 'error'}{where}. Check that every file is valid CSV (comma-separated, "
        "double quotes, a header row, UTF-8) or Parquet."
    )


def _no_type_pushdown(con) -> None:
    """Keep ``TRY_CAST`` a try: DuckDB 2.0's ``type_pushdown`` optimizer moves a cast into the
    CSV reader, where one malformed value then fails the whole load (measured on 2.0.1)."""
    names = {r[0] for r in con.execute("SELECT name FROM duckdb_optimizers()").fetchall()}
    if "type_pushdown" in names:
        con.execute("SET disabled_optimizers = 'type_pushdown'")


def _check_catalog(catalog: Catalog) -> None:
    expected = {"patients", "conditions", "visits"}
    missing = expected - set(catalog.views)
    if missing:
        raise LoadError(f"the catalog has no view(s) {', '.join(sorted(missing))} to build")
    # Values the loader itself derives must be in their column's domain: a visit's setting is
    # held as an ENUM of that domain while conditions are numbered, and a value missing from it
    # would otherwise be read as "unknown" instead of stopping the load.
    derived = {
        ("conditions", "setting"): {*VISIT_TYPE.values(), "unknown"},
        ("visits", "visit_type"): {*VISIT_TYPE.values(), "other"},
    }
    for (view, column), values in derived.items():
        col = catalog.views[view].columns.get(column)
        absent = values - {str(v) for v in col.domain} if col is not None else values
        if absent:
            raise LoadError(
                f"the catalog's {view}.{column} must list {', '.join(sorted(absent))} "
                "in its domain: the loader gives them"
            )


def _fresh_private_dir(path: Path) -> None:
    """Make ``path`` a new directory only this user can enter: whatever is there (left by an
    earlier load that had this process id, or put there by someone else) is removed first, and
    the new directory is checked to be a real directory, ours, mode 0700 (not a link elsewhere)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        path.mkdir(mode=0o700)
        info = path.lstat()
    except OSError as exc:
        raise LoadError(f"cannot make the private directory {path}: {exc.strerror}") from exc
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise LoadError(f"{path} is not a private directory of this user: remove it and retry")


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        if p.exists():
            p.unlink()


def _read_mapping(mapping: Path | None, catalog: Catalog) -> list[tuple[int, str, bool, int]]:
    domain = catalog.views["conditions"].columns["condition_group"].domain
    if mapping is None:
        text = resources.files("fedtre").joinpath("data/condition_groups.csv").read_text("utf-8")
        where = "built-in condition mapping"
    else:
        try:
            text = mapping.read_text(encoding="utf-8")
        except OSError as exc:
            raise LoadError(f"cannot read mapping file {mapping}: {exc.strerror}") from exc
        where = str(mapping)
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"group", "concept_id"} <= set(rows[0]):
        raise LoadError(f"{where}: needs a header with at least 'group' and 'concept_id'")
    out = []
    for i, row in enumerate(rows, start=2):
        group = (row.get("group") or "").strip()
        if group not in domain or group == "other":
            raise LoadError(f"{where} line {i}: '{group}' is not a condition group of the catalog")
        try:
            concept_id = int(row["concept_id"])
        except (TypeError, ValueError):
            raise LoadError(f"{where} line {i}: concept_id must be a whole number") from None
        descend = (row.get("include_descendants") or "true").strip().lower() in {"true", "1", "yes"}
        out.append((concept_id, group, descend, i))
    return out


def _find_file(folder: Path, table: str) -> Path | None:
    by_lower = {p.name.lower(): p for p in folder.iterdir()}
    for suffix in (".parquet", ".csv", ".csv.gz", ".tsv", ""):
        hit = by_lower.get(table + suffix)
        if hit is not None and (hit.is_file() or any(hit.glob("*.parquet"))):
            return hit
    return None


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _csv_dialect(path: Path) -> str:
    """Every field as text, with the dialect fixed rather than sniffed: the loader casts each
    value itself, so one malformed value cannot fail the load or retype a column, and no
    person's text (a leading '#', a run of ';') can change how other persons' lines are read."""
    delim = "\\t" if path.name.lower().endswith(".tsv") else ","
    return (
        f"header = true, all_varchar = true, delim = E'{delim}', quote = '\"', escape = '\"', "
        "skip = 0, comment = ''"
    )


def remove_interrupted_loads(out: Path) -> int:
    """Remove the temporary files of loads into ``out`` whose process is gone (killed, or the
    machine stopped): they hold person-level views. Returns how many paths were removed."""
    removed = 0
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid_text = path.name.removeprefix(f".{out.name}.tmp-").split(".", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stage_sources(con, source: Path, say: Progress) -> set[str]:
    tables = {**REQUIRED, **OPTIONAL_TABLES}
    found: set[str] = set()
    if source.is_dir():
        for table in tables:
            path = _find_file(source, table)
            if path is None:
                if table in REQUIRED:
                    raise LoadError(f"{source} has no {table} file (.csv or .parquet)")
                continue
            if path.is_dir():  # parts are read by column name and widened, never cast: a part
                # with text ids cannot be converted to another part's integer type by DuckDB's
                # lenient cast ('02' would become 2) before the loader checks each id
                glob = _sql_str(str(path / "*.parquet"))
                reader = f"read_parquet({glob}, union_by_name = true)"
            elif path.name.lower().endswith(".parquet"):
                reader = f"read_parquet({_sql_str(str(path))})"
            else:
                reader = f"read_csv({_sql_str(str(path))}, {_csv_dialect(path)})"
            con.execute(f"CREATE TEMP VIEW src_{table} AS SELECT * FROM {reader}")
            found.add(table)
    else:
        try:
            con.execute(f"ATTACH {_sql_str(str(source))} AS omop (READ_ONLY)")
        except duckdb.Error as exc:
            raise LoadError(f"{source} is neither a folder nor a readable DuckDB file") from exc
        available = {
            name.lower(): (schema, name)
            for schema, name in con.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_catalog = 'omop'"
            ).fetchall()
        }
        for table in tables:
            if table not in available:
                if table in REQUIRED:
                    raise LoadError(f"{source} has no {table} table")
                continue
            schema, name = available[table]
            con.execute(f'CREATE TEMP VIEW src_{table} AS SELECT * FROM omop."{schema}"."{name}"')
            found.add(table)
    con.execute(
        "CREATE TEMP TABLE src_columns (table_name VARCHAR, column_name VARCHAR, type VARCHAR)"
    )
    for table in (t for t in tables if t in found):
        try:
            described = con.execute(f"DESCRIBE src_{table}").fetchall()
        except duckdb.Error as exc:
            raise LoadError(f"cannot read the {table} source: {_described(exc)}") from exc
        columns = {r[0].lower(): str(r[1]).upper() for r in described}
        missing = [c for c in tables[table] if c not in columns]
        if missing:
            raise LoadError(f"{table} is missing required column(s): {', '.join(missing)}")
        con.executemany(
            "INSERT INTO src_columns VALUES (?, ?, ?)",
            [(table, name, ctype) for name, ctype in columns.items()],
        )
        say(f"found {table}")
    return found


def _stage_mapping(
    con,
    groups: list[tuple[int, str, bool, int]],
    ancestors: bool,
    catalog: Catalog,
    say: Progress,
) -> int:
    """Map condition concepts to groups; returns how many concepts matched groups of different
    tiers.

    A concept that matches several groups takes the group of the highest tier first (a
    diagnosis that is both self-harm and depression is self-harm, so it never reaches a project
    approved only for mental health), then the most specific match (a concept listed in the
    mapping beats any descendant; descendants are at least one level down, whatever the source's
    ``concept_ancestor`` says), then the mapping file's order.
    """
    column = catalog.views["conditions"].columns["condition_group"]
    con.execute(
        "CREATE TEMP TABLE map_direct (concept_id BIGINT, grp VARCHAR, descend BOOLEAN, prio INT)"
    )
    con.executemany("INSERT INTO map_direct VALUES (?, ?, ?, ?)", groups)
    con.execute("CREATE TEMP TABLE group_tier (grp VARCHAR, tier INT)")
    con.executemany(
        "INSERT INTO group_tier VALUES (?, ?)",
        [(str(g), column.tier_of(g).rank) for g in column.domain],
    )
    expanded = ""
    if ancestors:
        descendant = _number(con, "concept_ancestor", "descendant_concept_id")
        ancestor = _number(con, "concept_ancestor", "ancestor_concept_id")
        levels = _number(con, "concept_ancestor", "min_levels_of_separation")
        expanded = f"""
            UNION ALL
            SELECT {descendant}, m.grp, LEAST(GREATEST(COALESCE({levels}, 1), 1), 999999), m.prio
            FROM map_direct m JOIN src_concept_ancestor a ON {ancestor} = m.concept_id
            WHERE m.descend AND {descendant} IS NOT NULL"""
    con.execute(
        f"""CREATE TEMP TABLE concept_candidates AS
            SELECT c.concept_id, c.grp, c.lvl, c.prio, t.tier FROM (
                SELECT concept_id, grp, 0 AS lvl, prio FROM map_direct {expanded}
            ) c JOIN group_tier t ON t.grp = c.grp"""
    )
    con.execute(
        """CREATE TEMP TABLE concept_group AS
            SELECT concept_id,
                   arg_min(grp, (9 - tier) * 1000000000000 + lvl * 1000000 + prio) AS grp
            FROM concept_candidates GROUP BY concept_id"""
    )
    n = con.execute("SELECT count(*) FROM concept_group").fetchone()[0]
    how = "with descendants from concept_ancestor" if ancestors else "listed concepts only"
    say(f"condition mapping: {n:,} concepts in {len({g[1] for g in groups})} groups ({how})")
    return int(
        con.execute(
            "SELECT count(*) FROM (SELECT concept_id FROM concept_candidates "
            "GROUP BY concept_id HAVING count(DISTINCT tier) > 1)"
        ).fetchone()[0]
    )


def _stage_opt_out(con, opt_out: Path | None) -> None:
    """The persons on the trust's opt-out register: a CSV with a ``person_id`` column, a
    ``person_source_value`` column, or both; each line names a person by whichever it gives.
    A line that gives neither, or an id that is not a plain whole number, is refused (the
    message names the line, not its text), so no opt-out is ever silently skipped."""
    con.execute("CREATE TEMP TABLE opt_out (person_id BIGINT NOT NULL)")
    if opt_out is None:
        return
    try:
        text = opt_out.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read opt-out list {opt_out}: not a readable UTF-8 file") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = set(reader.fieldnames or ())
    if not header & {"person_id", "person_source_value"}:
        raise LoadError(f"{opt_out}: needs a 'person_id' or 'person_source_value' column")
    ids: list[tuple[int]] = []
    sources: list[tuple[str]] = []
    for line, row in enumerate(reader, start=2):
        pid = (row.get("person_id") or "").strip()
        source = row.get("person_source_value") or ""
        if pid:
            if not re.fullmatch(_WHOLE_NUMBER, pid):
                raise LoadError(f"{opt_out} line {line}: person_id must be a whole number")
            ids.append((int(pid),))
        if source.strip():
            sources.append((source,))
        if not pid and not source.strip():
            raise LoadError(
                f"{opt_out} line {line}: gives neither a person_id nor a person_source_value"
            )
    if ids:
        con.executemany("INSERT INTO opt_out VALUES (?)", ids)
    if sources:
        if _col_type(con, "person", "person_source_value") is None:
            raise LoadError(
                f"{opt_out} names persons by person_source_value, but the person table has "
                "no person_source_value column"
            )
        con.execute("CREATE TEMP TABLE opt_out_src (v VARCHAR)")
        con.executemany("INSERT INTO opt_out_src VALUES (?)", sources)
        person_id = _number(con, "person", "person_id")
        con.execute(
            f"INSERT INTO opt_out SELECT {person_id} FROM src_person p "
            "JOIN opt_out_src o ON CAST(p.person_source_value AS VARCHAR) = o.v "
            f"WHERE {person_id} IS NOT NULL"
        )


def _case(column: str, mapping: dict[int, str], default: str) -> str:
    arms = " ".join(f"WHEN {int(k)} THEN {_sql_str(v)}" for k, v in mapping.items())
    return f"CASE {column} {arms} ELSE {_sql_str(default)} END"


_INTEGER_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT",
}  # fmt: skip
_FRACTIONAL_TYPES = {"FLOAT", "DOUBLE", "REAL"}
_WHOLE_NUMBER = "0|-?[1-9][0-9]{0,17}"


def _number(con, table: str, column: str) -> str:
    """A whole number from a source column, NULL where it is missing or is not written as one.

    Integer-typed columns are taken as they are (NULL beyond BIGINT); float and decimal columns
    only where the value is whole (1.5 is not 2). Text must read exactly as a plain whole
    number: "02", " 2", "+2", "2.0", "2e0", "0x2" or "2_0" are not 2 (DuckDB's own cast would
    say they are), so a malformed id can never be read as another person's id; it becomes
    missing, and its row is dropped.
    """
    ctype = _col_type(con, table, column)
    if ctype is None:
        return "NULL"
    if ctype in _INTEGER_TYPES:
        return f"TRY_CAST({column} AS BIGINT)"
    if ctype in _FRACTIONAL_TYPES or ctype.startswith("DECIMAL"):  # whole values only
        return (
            f"CASE WHEN isfinite({column}) AND {column} = trunc({column}) "
            f"AND abs({column}) < 1e15 THEN CAST({column} AS BIGINT) END"
        )
    text = f"CAST({column} AS VARCHAR)"
    return f"CASE WHEN regexp_full_match({text}, '{_WHOLE_NUMBER}') THEN CAST({text} AS BIGINT) END"


def _date(con, table: str, column: str) -> str:
    """A calendar date, NULL where missing, malformed or infinite."""
    value = f"TRY_CAST({_col(con, table, column)} AS DATE)"
    return f"CASE WHEN isfinite({value}) THEN {value} END"


def _in_range(expr: str, low: int, high: int) -> str:
    """The value where it lies in [low, high] (a calendar field), else NULL."""
    return f"CASE WHEN {expr} BETWEEN {low} AND {high} THEN CAST({expr} AS INTEGER) END"


def _content_key(*exprs: str) -> str:
    """A key made of a row's own values only, hashed: the order of a person's rows for the
    per-person cap. It never depends on other rows or on file order. DuckDB's 64-bit ``hash``
    (no seed: the same values give the same key in every load by the same DuckDB version; an
    upgrade may choose another order, equally made of each row's own values). Rows whose keys
    collide are ordered by their stored values, so which of them is kept cannot matter."""
    return f"hash({', '.join(exprs)})"


def _build_views(con, catalog: Catalog, say: Progress, names: bool) -> dict[str, Any]:
    """Stage typed rows, derive every value within one person, then store the views.

    Every derived value of a person comes from that person's own rows and from public
    parameters (the catalog's reference date, bounds, domains and tiers, the mapping): ages at
    the catalog's reference date; condition settings and visit flags joined on the person as
    well as the visit id; row ranks from a hash of the row's own content.
    """
    ref = catalog.reference_date
    ref_sql = f"DATE {_sql_str(ref.isoformat())}"
    band = " ".join(f"WHEN age <= {hi} THEN {_sql_str(name)}" for hi, name in AGE_BANDS)
    say("building patients")
    con.execute(
        f"""CREATE TEMP TABLE person_src AS
        SELECT {_number(con, "person", "person_id")} AS person_id,
               {_number(con, "person", "gender_concept_id")} AS gender,
               {_in_range(_number(con, "person", "year_of_birth"), 1, 9999)} AS yob,
               {_in_range(_number(con, "person", "month_of_birth"), 1, 12)} AS mob,
               {_in_range(_number(con, "person", "day_of_birth"), 1, 31)} AS dob,
               {_number(con, "person", "race_concept_id")} AS race,
               {_number(con, "person", "ethnicity_concept_id")} AS eth
        FROM src_person"""
    )
    race = _case("race", RACE, "unknown")
    # A person listed twice keeps one of their own rows, chosen by content (never by position).
    con.execute(
        f"""CREATE TEMP TABLE person_clean AS
        SELECT person_id,
               {_case("gender", SEX, "unknown")} AS sex,
               CASE WHEN race IS NULL OR race = 0 THEN
                    CASE WHEN eth = {HISPANIC} THEN 'mixed_other' ELSE 'unknown' END
                    ELSE {race} END AS ethnicity,
               LEAST(GREATEST(
                   year({ref_sql}) - yob
                   - CASE WHEN month({ref_sql}) * 100 + day({ref_sql})
                          < COALESCE(mob, 7) * 100 + COALESCE(dob, 1) THEN 1 ELSE 0 END,
                   0), 110) AS age
        FROM person_src
        WHERE person_id IS NOT NULL AND yob IS NOT NULL
        QUALIFY row_number() OVER (
            PARTITION BY person_id ORDER BY gender, yob, mob, dob, race, eth NULLS LAST) = 1"""
    )
    con.execute(
        f"""CREATE TEMP TABLE stage_patients AS
        SELECT person_id, sex, CASE {band} ELSE '85+' END AS age_band, age, ethnicity,
               hash(person_id) AS _key
        FROM person_clean c
        WHERE NOT EXISTS (SELECT 1 FROM opt_out o WHERE o.person_id = c.person_id)"""
    )
    source_persons = _scalar(
        con, "SELECT count(DISTINCT person_id) FROM person_src WHERE person_id IS NOT NULL"
    )
    persons = _count(con, "stage_patients")
    opted = _count(con, "person_clean") - persons
    _drop(con, "person_src", "person_clean")
    _store_view(con, catalog.views["patients"])
    say(f"patients: {persons:,} rows")

    say("building visits")
    con.execute(
        f"""CREATE TABLE {VISIT_SRC} AS
        SELECT {_number(con, "visit_occurrence", "visit_occurrence_id")} AS visit_id,
               {_number(con, "visit_occurrence", "person_id")} AS person_id,
               {_number(con, "visit_occurrence", "visit_concept_id")} AS concept_id,
               {_date(con, "visit_occurrence", "visit_start_date")} AS s,
               {_date(con, "visit_occurrence", "visit_end_date")} AS e
        FROM src_visit_occurrence"""
    )
    con.execute(
        f"""CREATE TEMP VIEW cond_src AS
        SELECT {_number(con, "condition_occurrence", "person_id")} AS person_id,
               {_number(con, "condition_occurrence", "condition_concept_id")} AS concept_id,
               {_date(con, "condition_occurrence", "condition_start_date")} AS d,
               {_number(con, "condition_occurrence", "visit_occurrence_id")} AS visit_id,
               {_number(con, "condition_occurrence", "condition_occurrence_id")} AS occurrence_id
        FROM src_condition_occurrence"""
    )
    # The setting of a diagnosis is the type of the same person's visit with that id; a link to
    # another person's visit is not used (and is reported). Held as an ENUM of the catalog's
    # settings while the conditions are numbered (a byte per visit in the join, not a string).
    settings = _enum(catalog.views["conditions"].columns["setting"])
    con.execute(
        f"""CREATE TEMP TABLE visit_setting AS
        SELECT person_id, visit_id,
               TRY_CAST(CASE WHEN visit_type = 'other' THEN 'unknown' ELSE visit_type END
                        AS {settings}) AS setting
        FROM (SELECT person_id, visit_id,
                     min({_case("concept_id", VISIT_TYPE, "other")}) AS visit_type
              FROM {VISIT_SRC} WHERE person_id IS NOT NULL AND visit_id IS NOT NULL
              GROUP BY person_id, visit_id)"""
    )
    # Each diagnosis is staged with its group and the setting of its visit (NULL when the
    # person has no visit with that id), so the visit table is joined once, here, and not
    # held in memory while the diagnoses are numbered.
    con.execute(
        f"""CREATE TABLE {COND_GROUPED} AS
        SELECT c.*, COALESCE(g.grp, 'other') AS grp, v.setting AS visit_setting
        FROM cond_src c LEFT JOIN concept_group g ON g.concept_id = c.concept_id
        LEFT JOIN visit_setting v ON v.person_id = c.person_id AND v.visit_id = c.visit_id"""
    )
    # A diagnosis names another person's visit when the join found nothing but the visit id
    # exists: that reads the setting's NULL as "no such visit of this person", which holds
    # because every visit type casts into the settings (_check_catalog); checked here too.
    if _scalar(con, "SELECT count(*) FROM visit_setting WHERE setting IS NULL"):
        raise LoadError("a visit type has no setting in the catalog (internal error)")
    foreign = _scalar(
        con,
        f"""SELECT count(*) FROM {COND_GROUPED} c
           WHERE c.visit_id IS NOT NULL AND c.person_id IS NOT NULL AND c.visit_setting IS NULL
             AND c.visit_id IN (SELECT visit_id FROM visit_setting)""",  # so: another person's
    )
    _drop(con, "visit_setting")
    # A visit's flag comes from the same person's diagnoses recorded on it, in mental-health
    # groups at the flag's own tier or below (a highly sensitive diagnosis never sets it).
    flag_groups = ", ".join(_sql_str(g) for g in _flag_groups(catalog))
    con.execute(
        f"""CREATE TEMP TABLE visit_flag AS
        SELECT DISTINCT person_id, visit_id FROM {COND_GROUPED}
        WHERE person_id IS NOT NULL AND visit_id IS NOT NULL AND grp IN ({flag_groups})"""
    )
    visits, visits_over_cap = _staged_persons(
        con, catalog.views["visits"], VISIT_SRC, "s IS NOT NULL"
    )
    # The staged rows of a view are a view themselves: the per-person numbering reads them
    # as it goes (materialised, they would be written and read once more).
    con.execute(
        f"""CREATE TEMP VIEW stage_visits AS
        SELECT v.person_id, {_case("v.concept_id", VISIT_TYPE, "other")} AS visit_type,
               EXISTS (SELECT 1 FROM visit_flag f
                       WHERE f.person_id = v.person_id AND f.visit_id = v.visit_id)
                   AS mental_health,
               CAST(LEAST(GREATEST(COALESCE(date_diff('day', v.s, v.e), 0), 0), 1000000)
                    AS INTEGER) AS length_of_stay,
               year(v.s) AS year,
               {_content_key("v.person_id", "v.visit_id", "v.concept_id", "v.s", "v.e")} AS _key
        FROM {VISIT_SRC} v
        WHERE v.s IS NOT NULL AND v.person_id IS NOT NULL
          AND v.person_id NOT IN (SELECT person_id FROM visits_excluded)"""
    )
    say(f"visits staged: {visits:,} rows; numbering each person's rows and storing")
    _store_view(con, catalog.views["visits"])
    con.execute("DROP VIEW stage_visits")
    _drop(con, "visit_flag", "visits_excluded")
    say(f"visits: {visits:,} rows")

    say("building conditions")
    setting = f"COALESCE(c.visit_setting, CAST('unknown' AS {settings}))"
    conditions, conditions_over_cap = _staged_persons(
        con, catalog.views["conditions"], COND_GROUPED, "d IS NOT NULL"
    )
    con.execute(
        f"""CREATE TEMP VIEW stage_conditions AS
        SELECT c.person_id, c.grp AS condition_group, {setting} AS setting, year(c.d) AS year,
               {_content_key("c.person_id", "c.concept_id", "c.d", "c.visit_id", "c.occurrence_id")}
                   AS _key
        FROM {COND_GROUPED} c
        WHERE c.d IS NOT NULL AND c.person_id IS NOT NULL
          AND c.person_id NOT IN (SELECT person_id FROM conditions_excluded)"""
    )
    say(f"conditions staged: {conditions:,} rows")
    # Concepts the mapping does not know, for trust IT to review (UNMAPPED_CSV, beside the
    # database, owner-only like it): how many condition rows each one holds, and its name when
    # the extract has a concept table.
    names_sql = (
        f"""SELECT {_number(con, "concept", "concept_id")} AS concept_id,
                   min(CAST(concept_name AS VARCHAR)) AS concept_name
            FROM src_concept GROUP BY 1"""
        if names
        else "SELECT NULL::BIGINT AS concept_id, NULL::VARCHAR AS concept_name"
    )
    con.execute(
        f"""CREATE TEMP TABLE unmapped_concepts AS
        SELECT u.concept_id, n.concept_name, u.condition_rows
        FROM (SELECT concept_id, count(*) AS condition_rows FROM {COND_GROUPED}
              WHERE grp = 'other' AND concept_id IS NOT NULL
                AND concept_id NOT IN (SELECT concept_id FROM concept_group)
              GROUP BY concept_id) u
        LEFT JOIN ({names_sql}) n ON n.concept_id = u.concept_id"""
    )
    unmapped = con.execute(
        "SELECT count(*), COALESCE(sum(condition_rows), 0) FROM unmapped_concepts"
    ).fetchone()
    conditions_dropped = _count(con, COND_GROUPED) - conditions
    visits_dropped = _count(con, VISIT_SRC) - visits
    # Temporary staging tables live in DuckDB's memory (spilling beyond its limit): each is
    # dropped as soon as nothing needs it, so the per-person numbering of the largest view has
    # the memory to itself.
    _drop(con, VISIT_SRC, "stage_patients")
    say("conditions: numbering each person's rows and storing")
    _store_view(con, catalog.views["conditions"])
    con.execute("DROP VIEW stage_conditions")
    _drop(con, COND_GROUPED, "conditions_excluded")
    say(f"conditions: {conditions:,} rows")
    return {
        "persons": persons,
        "conditions": conditions,
        "visits": visits,
        "persons_dropped": source_persons - persons - opted,
        "opted_out": opted,
        "conditions_dropped": conditions_dropped,
        "visits_dropped": visits_dropped,
        "conditions_other_persons_visit": foreign,
        "unmapped_concepts": int(unmapped[0]),
        "unmapped_condition_rows": int(unmapped[1]),
        "persons_over_cap": {"conditions": conditions_over_cap, "visits": visits_over_cap},
    }


def _enum(column: Column) -> str:
    """The DuckDB ENUM type of a category column's catalog domain."""
    return f"ENUM({', '.join(_sql_str(str(v)) for v in column.domain)})"


def _drop(con, *tables: str) -> None:
    for table in tables:
        con.execute(f"DROP TABLE {table}")


def _staged_persons(con, view: View, table: str, where: str) -> tuple[int, int]:
    """The rows of ``table`` meeting ``where`` are staged in ``view`` if their person is a
    staged patient. Makes ``<view>_excluded``, the persons with such rows who are not patients
    (dropped or opted out: usually few, so the staged view is filtered by a small table, not
    joined with every patient while it is numbered). Returns how many rows are staged and how
    many persons have more of them than the view's cap (for the load report)."""
    name = view.name
    con.execute(
        f"CREATE TEMP TABLE {name}_persons AS SELECT person_id, count(*) AS n "
        f"FROM {table} WHERE {where} AND person_id IS NOT NULL GROUP BY person_id"
    )
    total, over = con.execute(
        f"SELECT COALESCE(sum(n), 0), count(*) FILTER (WHERE n > {view.max_rows_per_person}) "
        f"FROM {name}_persons r SEMI JOIN stage_patients p ON p.person_id = r.person_id"
    ).fetchone()
    con.execute(
        f"CREATE TEMP TABLE {name}_excluded AS SELECT person_id FROM {name}_persons r "
        "ANTI JOIN stage_patients p ON p.person_id = r.person_id"
    )
    _drop(con, f"{name}_persons")
    return int(total), int(over)


def _flag_groups(catalog: Catalog) -> list[str]:
    """Mental-health condition groups whose tier is at most the visit flag's tier."""
    groups = catalog.views["conditions"].columns["condition_group"]
    flag = catalog.views["visits"].columns["mental_health"]
    return [g for g in MENTAL_HEALTH_GROUPS if groups.tier_of(g) <= flag.tier]


def _store_view(con, view: View) -> None:
    """Store a staged view: its columns, clamped copies of numeric columns, and per row level
    each person's visible rows numbered by their content key (``node.database.rank_column``).

    Rows beyond the cap at every level are not stored: no query could count them, and a person
    with a million rows then costs a query no more work than one with ``cap`` rows at each level
    (the time an answer takes cannot be stretched by one person's records)."""
    # One order per person, shared by every level: rows with the same content are
    # interchangeable, but each level must number them the same way round, or which of them
    # lies within the cap (and so is stored) could differ between two loads of the same data.
    # So every level's rank is a running count over the same window (one sort per view): at
    # level L, a visible row's rank is the number of the person's rows visible at L up to it.
    columns = ", ".join(f'"{c}"' for c in view.columns)
    order = f"_key, {columns}"
    single = len(view.row_levels) == 1
    ranks = [
        f"CASE WHEN _tier <= {level.rank} THEN "
        + ("row_number()" if single else f"count(*) FILTER (WHERE _tier <= {level.rank})")
        + f' OVER w END AS "{rank_column(level)}"'
        for level in view.row_levels
    ]
    # Category columns go through the window and the block sort as ENUMs of their catalog
    # domain (one byte, not a string: the rows they hold, and spill, are about half as wide)
    # and come out as text again; the clamped copies are made after the sort, for the same
    # reason. A value outside the domain becomes NULL, which _validate refuses.
    compact = [
        f'TRY_CAST("{c.name}" AS {_enum(c)}) AS "{c.name}"'
        if c.type is ColumnType.CATEGORY
        else f'"{c.name}"'
        for c in view.columns.values()
    ]
    restored = [
        f'CAST("{c.name}" AS VARCHAR) AS "{c.name}"'
        if c.type is ColumnType.CATEGORY
        else f'"{c.name}"'
        for c in view.columns.values()
    ]
    clamped = [
        f'LEAST(GREATEST("{c.name}", {int(c.lower or 0)}), {int(c.upper or 0)}) '
        f'AS "{clamped_column(c.name)}"'
        for c in view.columns.values()
        if c.type is ColumnType.INTEGER
    ]
    cap = int(view.max_rows_per_person)
    kept = [
        f'COALESCE("{rank_column(level)}" <= {cap}, FALSE) AS "{kept_column(level)}"'
        for level in view.row_levels
    ]
    within = " OR ".join(f'"{kept_column(level)}"' for level in view.row_levels)
    stored = ", ".join(
        [
            "person_id",
            *restored,
            *clamped,
            *(f'"{rank_column(level)}"' for level in view.row_levels),
            *(f'"{kept_column(level)}"' for level in view.row_levels),
        ]
    )
    # Stored in blocks of rows kept at the same levels (highest level first), so that for
    # every level the rows it keeps lie in a few long runs: DuckDB's zone maps then prove the
    # cap filter true (or false) for whole row groups and skip it (1.58x plain DuckDB -> 1.02x
    # on 1M persons). The order is storage only; no answer depends on it.
    order_blocks = ", ".join(f'"{kept_column(level)}" DESC' for level in reversed(view.row_levels))
    con.execute(
        f'CREATE TABLE "{view.name}" AS SELECT {stored} FROM ('
        f"SELECT * FROM (SELECT *, {', '.join(kept)} FROM ("
        f"SELECT person_id, {columns}, {', '.join(ranks)} "
        f"FROM (SELECT person_id, {', '.join(compact)}, _key, "
        f"{row_tier_sql(view)} AS _tier FROM stage_{view.name}) "
        f"WINDOW w AS (PARTITION BY person_id ORDER BY {order} "
        "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))) "
        f"WHERE {within} ORDER BY {order_blocks}, person_id)"
    )


def _col(con, table: str, column: str) -> str:
    """The column's name if the source table has it, else NULL (for optional OMOP columns)."""
    return column if _col_type(con, table, column) is not None else "NULL"


def _col_type(con, table: str, column: str) -> str | None:
    row = con.execute(
        "SELECT type FROM src_columns WHERE table_name = ? AND column_name = ?", [table, column]
    ).fetchone()
    return None if row is None else str(row[0])


def _count(con, table: str) -> int:
    return _scalar(con, f"SELECT count(*) FROM {table}")


def _scalar(con, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0])


def _validate(con, catalog: Catalog) -> None:
    """Every view has exactly the catalog's columns, and categories stay in their domains."""
    for name, view in catalog.views.items():
        cols = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        expected = stored_columns(view)
        if cols != expected:
            raise LoadError(f"internal: view {name} has columns {sorted(cols)}")
        # One scan per view: per column, values missing or outside the column's domain.
        checks = []
        for col in view.columns.values():
            bad = f'"{col.name}" IS NULL'
            if col.type is ColumnType.CATEGORY:
                domain = ", ".join(_sql_str(str(v)) for v in col.domain)
                bad += f' OR "{col.name}" NOT IN ({domain})'
            checks.append(f"count(*) FILTER (WHERE {bad})")
        counts = con.execute(f'SELECT {", ".join(checks)} FROM "{name}"').fetchone()
        for col, count in zip(view.columns.values(), counts, strict=True):
            if count:
                raise LoadError(
                    f"internal: {name}.{col.name} has missing values or values outside its domain"
                )

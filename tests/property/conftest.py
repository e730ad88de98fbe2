"""Fixtures for the property tests: the spec reference and a node connection, once a session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtre.catalog import Catalog
from node.database import open_research_db
from tests.spec.reference import Reference


@pytest.fixture(scope="session")
def property_reference(node_db: Path, catalog: Catalog) -> Reference:
    return Reference.from_db(node_db, catalog)


# Module scope: see tests/spec/conftest.py (a locked connection held open would block others).
@pytest.fixture(scope="module")
def property_con(node_db: Path, catalog: Catalog) -> Iterator[object]:
    con = open_research_db(node_db, catalog)
    yield con
    con.close()

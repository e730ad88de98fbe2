"""Fixtures for the spec tests: a runner for exact (pre-noise) answers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedtre.catalog import Catalog, Tier
from fedtre.parse import parse_query
from node.compiler import compile_plan, run_exact


@pytest.fixture(scope="module")
def run_sql(research_con: object, catalog: Catalog) -> Callable[..., list[list[int]]]:
    """Parse, compile and run a query exactly, the way a node does before adding noise, for a
    project approved up to ``tier`` (default: highly sensitive, every row)."""

    def run(sql: str, tier: Tier = Tier.HIGHLY_SENSITIVE) -> list[list[int]]:
        return run_exact(research_con, compile_plan(parse_query(sql, catalog), catalog, tier))

    return run

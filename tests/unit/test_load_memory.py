"""The load's memory limit: parsed as DuckDB reads it, a sensible default, DuckDB's share."""

from __future__ import annotations

import pytest

from node.memory import DUCKDB_SHARE, default_memory_limit, memory_bytes


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("4GB", 4e9),
        ("4gb", 4e9),
        ("512MB", 512e6),
        ("64MiB", 64 * 2**20),
        ("1.5 GB", 1.5e9),
        ("2TiB", 2 * 2**40),
        ("lots", 0.0),
    ],
)
def test_limits_read_as_duckdb_reads_them(limit, expected):
    assert memory_bytes(limit) == expected


def test_the_default_leaves_most_of_the_machine_to_other_services():
    limit = default_memory_limit()
    assert 256e6 * 0.99 <= memory_bytes(limit) <= 4096 * 2**20 * 1.01
    assert 0 < DUCKDB_SHARE < 1  # the rest is for reading files and Python

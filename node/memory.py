"""Memory limits as DuckDB reads them ("4GB", "512MB", "64MiB"), for loading and serving."""

from __future__ import annotations

import os
import re

DUCKDB_SHARE = 0.7  # of the load's memory limit, for DuckDB's own
MEMORY_LIMIT_PATTERN = r"\d{1,6}(\.\d+)?\s?[KMGT]i?B"


def memory_bytes(limit: str) -> float:
    """'4GB' -> bytes (KB/MB/GB/TB in powers of 1000, KiB/MiB/... of 1024, as DuckDB reads)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s?([KMGT])(i?)B", limit, re.IGNORECASE)
    if match is None:
        return 0.0
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return float(number) * base ** ("KMGT".index(unit.upper()) + 1)


def default_memory_limit() -> str:
    """A quarter of the machine's memory, at most 4 GB: a trust's server runs other services
    (DuckDB's own default is 80%). Work beyond the limit spills to disk next to the output."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return "1GB"
    return f"{max(256, min(4096, total // 4 // 2**20))}MB"

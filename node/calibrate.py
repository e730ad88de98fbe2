"""``fedtre node calibrate``: how long the slowest query shapes take on this trust's data, and
the answer slot that covers them.

Every answer leaves the node on a multiple of ``answer_slot_ms`` after it was received, so its
timing does not depend on the data. That holds only while the work fits in the slot: an answer
that overruns leaves on the next multiple, which tells the caller it took longer than one slot.
This command runs the heaviest shapes the query language allows against the loaded database,
along the node's own path (plan, compile, DuckDB, OpenDP noise, plus the cost of the durable
writes), several callers at once, and suggests a slot with a safety margin.

Nothing is released and no budget is spent: the noisy values are discarded, and only times are
printed. Times are for trust IT; they stay on the node's console.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtre.catalog import Catalog, ColumnType, Tier, View
from fedtre.errors import QueryRefused
from fedtre.parse import (
    MAX_AGGREGATES,
    MAX_CELLS,
    MAX_COHORT_DEPTH,
    MAX_COHORTS,
    MAX_GROUP_COLUMNS,
    MAX_IN_VALUES,
    MAX_RELEASED_VALUES,
    MAX_SQL_CHARS,
    parse_query,
)
from node.compiler import run_exact
from node.config import NodeConfig, ProjectPolicy
from node.database import ResearchDatabase
from node.prepare import plan_query
from node.release import release

SAFETY = 2.0  # the slot is at least this many times the slowest answer seen under load
ROUND_TO_MS = 50
MIN_SLOT_MS = 100
DURABLE_WRITES = 2  # fsyncs a release can wait for: the request's audit line, the stored answer


@dataclass(frozen=True)
class Shape:
    name: str
    sql: str


@dataclass(frozen=True)
class Timing:
    shape: Shape
    seconds: tuple[float, ...]

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def worst(self) -> float:
        return max(self.seconds)


@dataclass(frozen=True)
class Calibration:
    timings: tuple[Timing, ...]
    durable_write_seconds: float  # the slowest of the measured append+fsync writes
    concurrency: int
    suggested_ms: int

    @property
    def worst(self) -> float:
        return max(t.worst for t in self.timings) + DURABLE_WRITES * self.durable_write_seconds


def heavy_shapes(catalog: Catalog) -> list[Shape]:
    """The most expensive queries the language allows, per view: the widest grouping with as many
    aggregates as still fit the limit on released values, the most aggregates with the widest
    grouping that fits, and as many three-deep cohort chains, each with a filter at every
    level, as the parser's limit on conditions allows."""
    shapes = []
    for view in catalog.views.values():
        wide = _widest_grouping(view, MAX_CELLS)
        shapes.append(_grouped(view, wide, "widest grouping"))
        most = _aggregates(view, MAX_AGGREGATES, 2 * MAX_AGGREGATES)
        statistics = 2 + 2 * (len(most) - 2)
        groups = _widest_grouping(view, MAX_RELEASED_VALUES // statistics)
        shapes.append(_grouped(view, groups, f"{len(most)} aggregates"))
    for main in sorted(catalog.views):
        shapes.append(_most_cohorts(catalog, main))
        shapes.append(_cohorts_with_lists(catalog, main))
    return shapes


def _grouped(view: View, groups: list[str], label: str) -> Shape:
    cells = math.prod(len(view.columns[g].group_domain or ()) for g in groups)
    budget = MAX_RELEASED_VALUES // max(cells, 1)
    aggregates = _aggregates(view, MAX_AGGREGATES, budget)
    sql = f"SELECT {', '.join([*groups, *aggregates])} FROM {view.name}"
    if groups:
        sql += " GROUP BY " + ", ".join(groups)
    return Shape(f"{view.name}: {label}, {cells:,} cells × {len(aggregates)} aggregates", sql)


def _aggregates(view: View, count: int, statistics: int) -> list[str]:
    """Counts, then means (two statistics each) while they fit ``statistics``."""
    numeric = [c.name for c in view.columns.values() if c.type is ColumnType.INTEGER]
    out = ["COUNT(*) AS n"]
    used = 1
    if statistics >= 2:
        out.append("COUNT(DISTINCT person_id) AS p")
        used += 1
    i = 0
    while numeric and len(out) < count and used + 2 <= statistics:
        out.append(f"AVG({numeric[i % len(numeric)]}) AS a{i}")
        used += 2
        i += 1
    return out


def _most_cohorts(catalog: Catalog, main: str) -> Shape:
    """OR'd chains of cohorts three deep through every view, with a filter at each level; as
    many chains as the parser accepts."""
    views = sorted(catalog.views)
    chains = []
    for i in range(max(1, MAX_COHORTS // MAX_COHORT_DEPTH)):
        chain = ""
        for depth in range(MAX_COHORT_DEPTH):
            sub = views[(i + depth) % len(views)]
            where = _a_filter(catalog.views[sub], i + depth)
            if chain:
                where = f"{where} AND {chain}"
            negated = "NOT " if (i + depth) % 2 else ""
            chain = f"person_id {negated}IN (SELECT person_id FROM {sub} WHERE {where})"
        chains.append(f"({chain})")
    while chains:
        sql = f"SELECT COUNT(*) AS n, COUNT(DISTINCT person_id) AS p FROM {main} WHERE " + (
            " OR ".join(chains)
        )
        try:
            parse_query(sql, catalog)
        except QueryRefused:
            chains.pop()
            continue
        return Shape(f"{main}: {len(chains)} OR'd cohort chains, {MAX_COHORT_DEPTH} deep", sql)
    raise ValueError("no cohort shape fits the parser's limits")


def _cohorts_with_lists(catalog: Catalog, main: str) -> Shape:
    """The widest grouping with the most cohorts allowed, each filtered by the longest
    ``NOT IN`` list of integers that still fits the parser's limits on length."""
    view = catalog.views[main]
    groups = _widest_grouping(view, MAX_RELEASED_VALUES // 2)
    listed = [
        (name, c)
        for name in sorted(catalog.views)
        for c in catalog.views[name].columns.values()
        if c.type is ColumnType.INTEGER
    ]
    select = ", ".join([*groups, "COUNT(*) AS n", "COUNT(DISTINCT person_id) AS p"])
    group_by = f" GROUP BY {', '.join(groups)}" if groups else ""

    def query(size: int) -> str:
        cohorts = []
        for i in range(MAX_COHORTS):
            sub, col = listed[i % len(listed)]
            lower = int(col.lower or 0)
            values = ", ".join(str(lower + 1_000 + k) for k in range(size))  # none of them match
            cohorts.append(
                f"person_id IN (SELECT person_id FROM {sub} WHERE {col.name} NOT IN ({values}))"
            )
        return f"SELECT {select} FROM {main} WHERE {' OR '.join(cohorts)}{group_by}"

    fits = [s for s in range(1, MAX_IN_VALUES + 1) if len(query(s)) <= MAX_SQL_CHARS]
    for size in sorted(fits, reverse=True):
        sql = query(size)
        try:
            parse_query(sql, catalog)
        except QueryRefused:
            continue
        name = f"{main}: {MAX_COHORTS} cohorts with {size}-value lists, {len(groups)} group columns"
        return Shape(name, sql)
    raise ValueError("no list shape fits the parser's limits")


def _a_filter(view: View, i: int) -> str:
    """A condition on one of the view's columns that keeps most rows."""
    col = list(view.columns.values())[i % len(view.columns)]
    if col.type is ColumnType.INTEGER:
        return f"{col.name} >= {int(col.lower or 0)}"
    if col.type is ColumnType.BOOLEAN:
        return f"{col.name} IN (TRUE, FALSE)"
    return f"{col.name} <> '{col.domain[-1]}'"


def _widest_grouping(view: View, max_cells: int) -> list[str]:
    """Group columns (within the parser's limits and ``max_cells``) with the most cells."""
    columns = [c for c in view.columns.values() if c.group_domain is not None]
    columns.sort(key=lambda c: len(c.group_domain or ()), reverse=True)
    chosen: list[str] = []
    cells = 1
    for col in columns:
        size = len(col.group_domain or ())
        if len(chosen) < MAX_GROUP_COLUMNS and cells * size <= max_cells:
            chosen.append(col.name)
            cells *= size
    return chosen


def calibrate(
    config: NodeConfig,
    repeats: int = 10,
    concurrency: int | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> Calibration:
    """Time every heavy shape ``repeats`` times on ``concurrency`` threads at once."""
    workers = concurrency or (config.server.max_workers if config.server else 4)
    shapes = heavy_shapes(config.catalog)
    everything = ProjectPolicy(  # every view and tier: the heaviest work a query can cause
        project_id="calibration",
        title="calibration",
        total_units=1,
        max_units_per_query=1_000_000,
        views=frozenset(config.catalog.views),
        max_tier=Tier.HIGHLY_SENSITIVE,
    )
    prepared = [
        plan_query(parse_query(s.sql, config.catalog), config.catalog, everything, 1_000_000)
        for s in shapes
    ]
    database = ResearchDatabase(
        config.database, config.catalog, config.duckdb_threads, config.duckdb_memory_limit
    )
    times: dict[int, list[float]] = {i: [] for i in range(len(shapes))}
    lock = threading.Lock()

    def work(offset: int) -> None:
        for r in range(repeats):
            for k in range(len(shapes)):
                i = (k + offset + r) % len(shapes)
                start = time.perf_counter()
                with database.reading() as cursor:
                    release(prepared[i].release, run_exact(cursor, prepared[i].compiled))
                with lock:
                    times[i].append(time.perf_counter() - start)

    try:
        progress(f"timing {len(shapes)} query shapes × {repeats} on {workers} threads")
        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        database.close()
    fsync = _durable_write_seconds(config.state_dir)
    timings = tuple(Timing(s, tuple(times[i])) for i, s in enumerate(shapes))
    worst = max(t.worst for t in timings) + DURABLE_WRITES * fsync
    suggested = max(MIN_SLOT_MS, _round_up(worst * SAFETY * 1000, ROUND_TO_MS))
    return Calibration(timings, fsync, workers, suggested)


def _durable_write_seconds(state_dir: Path, repeats: int = 50) -> float:
    """The slowest of ``repeats`` appends with fsync on the disk holding the node's state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    worst = 0.0
    with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".calibrate-") as handle:
        for _ in range(repeats):
            start = time.perf_counter()
            handle.write(b"x" * 256)
            handle.flush()
            os.fsync(handle.fileno())
            worst = max(worst, time.perf_counter() - start)
    return worst


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def report(result: Calibration, current_ms: int) -> list[str]:
    width = max(len(t.shape.name) for t in result.timings)
    lines = [f"{'query shape':<{width}}  {'p50 ms':>8}  {'worst ms':>8}"]
    for t in result.timings:
        lines.append(f"{t.shape.name:<{width}}  {t.p50 * 1000:>8.1f}  {t.worst * 1000:>8.1f}")
    lines += [
        "",
        f"{result.concurrency} queries at a time; durable writes: "
        f"{DURABLE_WRITES} × {result.durable_write_seconds * 1000:.1f} ms (slowest fsync seen)",
        f"slowest answer: {result.worst * 1000:.0f} ms; with a {SAFETY:g}× margin, rounded up to "
        f"{ROUND_TO_MS} ms:",
        f"suggested answer_slot_ms = {result.suggested_ms}   (this node's config: {current_ms})",
    ]
    if current_ms and current_ms < result.suggested_ms:
        lines.append(
            "The configured slot is shorter than suggested: slow answers would overrun it, and "
            "an overrun tells the caller the query took more than one slot."
        )
    return lines

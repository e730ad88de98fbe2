"""The node's exact, pre-noise path, for tests that compare exact answers.

It is the engine's own path minus the budget and the noise: ``node.prepare.plan_query`` (scope,
tier, the SQL for the project's tier, the release plan with its declared sensitivities) and
``node.compiler.run_exact`` on the database opened exactly as the engine opens it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtre.catalog import Catalog, Tier
from fedtre.errors import QueryRefused
from fedtre.parse import parse_query
from fedtre.plan import QueryPlan
from node.compiler import run_exact
from node.config import ProjectPolicy
from node.database import open_research_db
from node.prepare import PreparedQuery, plan_query

UNITS = 1_000_000  # ε = 1: the split only has to be possible


def project(tier: Tier = Tier.HIGHLY_SENSITIVE, views: frozenset[str] | None = None):
    return ProjectPolicy(
        project_id="study",
        title="neighbours",
        total_units=10**12,
        max_units_per_query=10**9,
        views=views if views is not None else frozenset({"patients", "conditions", "visits"}),
        max_tier=tier,
    )


@dataclass(frozen=True)
class Exact:
    """The outcome of one query on one database: a refusal, or the exact statistics."""

    refusal: str | None
    prepared: PreparedQuery | None = None
    values: tuple[tuple[int, ...], ...] = ()

    @property
    def sensitivities(self) -> tuple[int, ...]:
        assert self.prepared is not None
        return tuple(s.sensitivity for s in self.prepared.release.statistics)


# Parsed plans (or the refusal's name) by (catalog, SQL text), as the node caches plans
# (``node.prepare``): the same query is planned at every tier and the targeted ones in every
# example; parsing is most of it.
_PARSED: dict[tuple[str, str], QueryPlan | str] = {}


def _parsed(sql: str, catalog: Catalog) -> QueryPlan | str:
    key = (catalog.digest, sql)
    if key not in _PARSED:
        if len(_PARSED) > 4096:
            _PARSED.clear()
        try:
            _PARSED[key] = parse_query(sql, catalog)
        except QueryRefused as exc:
            _PARSED[key] = exc.refusal.value
    return _PARSED[key]


def prepare(sql: str, catalog: Catalog, policy: ProjectPolicy) -> Exact:
    plan = _parsed(sql, catalog)
    if isinstance(plan, str):
        return Exact(plan)
    try:
        return Exact(None, plan_query(plan, catalog, policy, UNITS))
    except QueryRefused as exc:
        return Exact(exc.refusal.value)


def run(con, prepared: Exact, excluded: tuple[int, ...] = ()) -> Exact:
    """``excluded``: persons opted out of this query (the engine passes them the same way)."""
    if prepared.prepared is None:
        return prepared
    values = run_exact(con, prepared.prepared.compiled, excluded)
    return Exact(None, prepared.prepared, tuple(tuple(v) for v in values))


def exact(db: Path, catalog: Catalog, sql: str, tier: Tier = Tier.HIGHLY_SENSITIVE) -> Exact:
    con = open_research_db(db, catalog)
    try:
        return run(con, prepare(sql, catalog, project(tier)))
    finally:
        con.close()


def l1(a: Exact, b: Exact) -> list[int]:
    """Per statistic: the L1 distance between two exact answers, over all cells."""
    return [
        sum(abs(x - y) for x, y in zip(sa, sb, strict=True))
        for sa, sb in zip(a.values, b.values, strict=True)
    ]

"""Everything a node decides about a query before it touches the data.

``Planner.prepare`` takes the request, the node's own policy and catalog, and either refuses
with a plain, data-free reason or returns a ``PreparedQuery``: the plan, the SQL as the
project's tier sees the data, and the release plan (the ε split over the statistics with every
OpenDP measurement built and checked). Nothing here reads the research database, so no refusal
and no cost can depend on the data or on how long it takes to read. (The budget itself is
reserved by the engine, from the ledger, also before the data is read.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from fedtre.catalog import Catalog, Tier
from fedtre.dp import epsilon_to_units, units_to_epsilon
from fedtre.errors import QueryRefused, Refusal
from fedtre.parse import parse_query, query_tier
from fedtre.plan import QueryPlan, cohort_views
from fedtre.plan import fingerprint as plan_fingerprint
from fedtre.request import QueryRequest
from node.approvals import Projects
from node.compiler import CompiledQuery, compile_plan
from node.config import NodeConfig, ProjectPolicy
from node.optouts import OptOut
from node.release import ReleasePlan, plan_release


@dataclass(frozen=True)
class PreparedQuery:
    project: ProjectPolicy
    plan: QueryPlan
    compiled: CompiledQuery
    release: ReleasePlan
    units: int
    fingerprint: str  # what a retry of the query id must match
    optouts: frozenset[OptOut] = frozenset()  # the opt-outs that remove persons from it
    views: frozenset[str] = frozenset()  # every view it reads (disputed records act on these)
    approval: str = ""  # digest of the signed application it is prepared under ("" hand-kept)


class Planner:
    """``prepare`` for one node, with bounded caches: parsed plans by SQL text, and prepared
    queries (SQL for the tier, release plan with its OpenDP measurements) by (SQL, project
    policy, ε units). Both are pure functions of those keys and the node's fixed catalog, so a
    question asked again skips parsing, checking and building; refusals are never cached."""

    def __init__(self, config: NodeConfig, projects: Projects, size: int = 512) -> None:
        self.config = config
        self.projects = projects
        self._parsed = functools.lru_cache(maxsize=size)(self._parse)
        self._prepared = functools.lru_cache(maxsize=size)(self._plan)

    def prepare(self, request: QueryRequest) -> PreparedQuery:
        """Check the request against this node's policy and fix its cost; refuses otherwise."""
        config = self.config
        request.check_fields()
        units = epsilon_to_units(request.epsilon)
        if units < config.min_units_per_query:
            raise QueryRefused(
                Refusal.INVALID_EPSILON,
                f"ε {units_to_epsilon(units):g} is below this trust's minimum of "
                f"{units_to_epsilon(config.min_units_per_query):g} per query.",
            )
        verified = self.projects.for_request(request.project_id, request.approval)
        self.projects.check_signature(verified, request)
        project = verified.policy
        approval = verified.approved.digest if verified.approved is not None else ""
        if units > project.max_units_per_query:
            raise QueryRefused(
                Refusal.OUT_OF_SCOPE,
                f"ε {units_to_epsilon(units):g} is above this project's per-query limit of "
                f"{units_to_epsilon(project.max_units_per_query):g}.",
            )
        prepared = self._prepared(request.sql, project, units)
        return replace(prepared, approval=approval) if approval else prepared

    def _parse(self, sql: str) -> QueryPlan:
        return parse_query(sql, self.config.catalog)

    def _plan(self, sql: str, project: ProjectPolicy, units: int) -> PreparedQuery:
        return plan_query(self._parsed(sql), self.config.catalog, project, units)


def plan_query(
    plan: QueryPlan, catalog: Catalog, project: ProjectPolicy, units: int
) -> PreparedQuery:
    """Scope and tier checks, the SQL for the project's tier, and the release plan."""
    check_scope(plan, catalog, project)
    compiled = compile_plan(plan, catalog, project.max_tier)
    release = plan_release(plan, compiled.view, len(compiled.cells), units)
    fingerprint = plan_fingerprint(project.project_id, plan, units)
    kinds = optouts_for(plan, catalog, project)
    views = frozenset({plan.view} | cohort_views(plan.where))
    return PreparedQuery(
        project, plan, compiled, release, units, fingerprint, optouts=kinds, views=views
    )


def optouts_for(plan: QueryPlan, catalog: Catalog, project: ProjectPolicy) -> frozenset[OptOut]:
    """Whose opt-outs remove them from this query: everyone's national opt-out; the commercial
    one for a commercial project; the mental-health one when the query reads mental-health
    data (names such a column or value, or reads a view whose rows at the project's tier
    include mental-health rows)."""
    kinds = {OptOut.NATIONAL}
    if project.purpose == "commercial":
        kinds.add(OptOut.COMMERCIAL)
    reads = [query_tier(plan, catalog)]
    for name in {plan.view} | cohort_views(plan.where):
        level = catalog.views[name].level_for(project.max_tier)
        if level is not None:
            reads.append(level)
    if max(reads) >= Tier.MENTAL_HEALTH:
        kinds.add(OptOut.MENTAL_HEALTH)
    return frozenset(kinds)


def check_scope(plan: QueryPlan, catalog: Catalog, project: ProjectPolicy) -> None:
    views = {plan.view} | cohort_views(plan.where)
    outside = sorted(views - project.views)
    if outside:
        raise QueryRefused(
            Refusal.OUT_OF_SCOPE,
            f"This project is not approved to use the view(s): {', '.join(outside)}.",
        )
    tier = query_tier(plan, catalog)
    if tier > project.max_tier:
        raise QueryRefused(
            Refusal.OUT_OF_SCOPE,
            f"This query names {tier.value.replace('_', ' ')} data; the project is approved "
            f"up to {project.max_tier.value.replace('_', ' ')}.",
        )

"""``fedtre query --explain``: what a query would cost and how precise it would be, before
anything is spent. Computed from the SQL, the federation's catalog and the project, with the
same statistics, cells, sensitivities and ε split the trusts use (``fedtre.statistics``); no
trust is asked and no data is read, so it says nothing about the data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedtre.answer import ProjectInfo
from fedtre.catalog import Catalog, Tier, Value
from fedtre.dp import discrete_laplace_std, epsilon_to_units, sum_halfwidth, units_to_epsilon
from fedtre.parse import parse_query
from fedtre.statistics import cells_for, epsilon_shares

CONFIDENCE = 0.95


@dataclass(frozen=True)
class StatisticCost:
    aggregate: str  # the alias the researcher gave it
    statistic: str  # count / count_persons / sum
    column: str | None
    sensitivity: int  # L1, per trust
    epsilon_per_trust: float
    noise_std_per_trust: float
    combined_std: float  # of the sum over every trust of the project
    half_width_95: int  # of a combined count or sum, before rounding


@dataclass(frozen=True)
class Explanation:
    project_id: str
    view: str
    epsilon_per_trust: float
    trusts: tuple[str, ...]
    tier: str
    cells: tuple[tuple[Value, ...], ...]
    group_by: tuple[str, ...]
    statistics: tuple[StatisticCost, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["cells"] = [list(c) for c in self.cells]
        return doc

    def table(self) -> str:
        lines = [
            f"Nothing has been spent. If run, this query would spend ε {self.epsilon_per_trust:g} "
            f"at each of {len(self.trusts)} trusts ({', '.join(self.trusts)}) of project "
            f"{self.project_id}, on view {self.view}, as approved up to {self.tier}.",
            f"Cells: {len(self.cells)}"
            + (
                f" ({', '.join(self.group_by)}: "
                + "; ".join("/".join(str(v) for v in c) for c in self.cells[:12])
                + ("; …" if len(self.cells) > 12 else "")
                + ")"
                if self.group_by
                else " (no GROUP BY)"
            ),
            "",
            "| aggregate | statistic | sensitivity | ε per trust | noise sd per trust | "
            "combined sd | ± 95% (combined) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.statistics:
            what = s.statistic + (f"({s.column})" if s.column else "")
            lines.append(
                f"| {s.aggregate} | {what} | {s.sensitivity:,} | {s.epsilon_per_trust:g} | "
                f"{s.noise_std_per_trust:,.1f} | {s.combined_std:,.1f} | {s.half_width_95:,} |"
            )
        lines += ["", *(f"Note: {n}" for n in self.notes)]
        return "\n".join(lines)


def explain(sql: str, catalog: Catalog, project: ProjectInfo, epsilon: float | None) -> Explanation:
    """Refuses (``QueryRefused``) what the coordinator would refuse: the query against the
    catalog, ε against the project's per-query limit."""
    plan = parse_query(sql, catalog)
    units = epsilon_to_units(project.default_epsilon if epsilon is None else epsilon)
    tier = Tier(project.max_tier) if project.max_tier else Tier.HIGHLY_SENSITIVE
    view = catalog.views[plan.view]
    cells = cells_for(plan, catalog, tier)
    k = max(1, len(project.trusts))
    costs = []
    for agg in epsilon_shares(plan, view, len(cells), units):
        for share in agg.statistics:
            scale = share.sensitivity / units_to_epsilon(share.epsilon_units)
            std = discrete_laplace_std(scale)
            costs.append(
                StatisticCost(
                    aggregate=agg.aggregate.alias,
                    statistic=share.statistic.kind,
                    column=share.statistic.column,
                    sensitivity=share.sensitivity,
                    epsilon_per_trust=units_to_epsilon(share.epsilon_units),
                    noise_std_per_trust=std,
                    combined_std=std * math.sqrt(k),
                    half_width_95=sum_halfwidth([scale] * k, CONFIDENCE),
                )
            )
    notes = [
        "the noise depends only on ε, the sensitivity and the number of trusts, never on the "
        "data: these figures are what the answer's intervals will be",
        "a mean (AVG) is a noisy sum over a noisy count: its interval also depends on the "
        "count, so it is known only with the answer",
    ]
    if project.round_to > 1:
        notes.append(f"counts and sums will be rounded to {project.round_to}; intervals widen")
    if project.suppress_below > 0:
        notes.append(f"counts below {project.suppress_below} will be shown as '< n'")
    if units > round(project.max_epsilon_per_query * 1_000_000):
        notes.append(
            f"ε {units_to_epsilon(units):g} is above the project's limit of "
            f"{project.max_epsilon_per_query:g}: the coordinator would refuse it"
        )
    return Explanation(
        project_id=project.project_id,
        view=plan.view,
        epsilon_per_trust=units_to_epsilon(units),
        trusts=project.trusts,
        tier=tier.value,
        cells=cells,
        group_by=plan.group_by,
        statistics=tuple(costs),
        notes=tuple(notes),
    )

"""What a node releases: noisy values only, with the noise scale and the ε each one cost.

A ``NodeResult`` is stored in the node's ledger in the same transaction that debits the budget,
and returned verbatim when the same query id is asked again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedtre.catalog import Value
from fedtre.dp import units_to_epsilon
from fedtre.plan import AggregateKind


@dataclass(frozen=True)
class ReleasedStatistic:
    """One noisy vector: a value per cell, all from one OpenDP measurement."""

    kind: str  # "count", "count_persons" or "sum"
    values: tuple[int, ...]
    sensitivity: int  # L1 sensitivity over the whole vector
    noise_scale: float
    noise_std: float
    epsilon_units: int
    mechanism: str

    @property
    def epsilon(self) -> float:
        return units_to_epsilon(self.epsilon_units)


@dataclass(frozen=True)
class ReleasedAggregate:
    """An aggregate the researcher asked for; AVG carries a sum and a count statistic."""

    alias: str
    kind: AggregateKind
    column: str | None
    statistics: tuple[ReleasedStatistic, ...]
    lower: int | None = None
    upper: int | None = None


@dataclass(frozen=True)
class NodeResult:
    query_id: str
    node_id: str
    project_id: str
    view: str
    catalog_version: str
    reference_date: str  # the catalog's date for ages, YYYY-MM-DD: the same at every trust
    group_by: tuple[str, ...]
    cells: tuple[tuple[Value, ...], ...]
    aggregates: tuple[ReleasedAggregate, ...]
    epsilon_units: int
    released_at: str
    data_as_of: str = ""  # the date of the trust's extract (YYYY-MM-DD): how fresh the data is

    @property
    def epsilon(self) -> float:
        return units_to_epsilon(self.epsilon_units)

    def to_json(self) -> str:
        return json.dumps(_to_dict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> NodeResult:
        return _from_dict(json.loads(text))


def _to_dict(r: NodeResult) -> dict[str, Any]:
    return {
        "query_id": r.query_id,
        "node_id": r.node_id,
        "project_id": r.project_id,
        "view": r.view,
        "catalog_version": r.catalog_version,
        "reference_date": r.reference_date,
        "group_by": list(r.group_by),
        "cells": [list(c) for c in r.cells],
        "aggregates": [
            {
                "alias": a.alias,
                "kind": a.kind.value,
                "column": a.column,
                "lower": a.lower,
                "upper": a.upper,
                "statistics": [
                    {
                        "kind": s.kind,
                        "values": list(s.values),
                        "sensitivity": s.sensitivity,
                        "noise_scale": s.noise_scale,
                        "noise_std": s.noise_std,
                        "epsilon_units": s.epsilon_units,
                        "mechanism": s.mechanism,
                    }
                    for s in a.statistics
                ],
            }
            for a in r.aggregates
        ],
        "epsilon_units": r.epsilon_units,
        "released_at": r.released_at,
        "data_as_of": r.data_as_of,
    }


def _from_dict(d: dict[str, Any]) -> NodeResult:
    return NodeResult(
        query_id=d["query_id"],
        node_id=d["node_id"],
        project_id=d["project_id"],
        view=d["view"],
        catalog_version=d["catalog_version"],
        reference_date=d.get("reference_date", ""),  # answers stored before it was recorded
        data_as_of=d.get("data_as_of", ""),
        group_by=tuple(d["group_by"]),
        cells=tuple(tuple(c) for c in d["cells"]),
        aggregates=tuple(
            ReleasedAggregate(
                alias=a["alias"],
                kind=AggregateKind(a["kind"]),
                column=a["column"],
                lower=a["lower"],
                upper=a["upper"],
                statistics=tuple(
                    ReleasedStatistic(
                        kind=s["kind"],
                        values=tuple(s["values"]),
                        sensitivity=s["sensitivity"],
                        noise_scale=s["noise_scale"],
                        noise_std=s["noise_std"],
                        epsilon_units=s["epsilon_units"],
                        mechanism=s["mechanism"],
                    )
                    for s in a["statistics"]
                ),
            )
            for a in d["aggregates"]
        ),
        epsilon_units=d["epsilon_units"],
        released_at=d["released_at"],
    )

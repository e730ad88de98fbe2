"""Turn released results into estimates people can read (tables) and machines can parse (JSON).

Everything here is post-processing of noisy values: no data is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedtre.catalog import Value
from fedtre.dp import Interval, count_interval, ratio_estimate, units_to_epsilon
from fedtre.plan import AggregateKind
from fedtre.result import NodeResult, ReleasedAggregate


@dataclass(frozen=True)
class Estimate:
    value: float | None
    interval: Interval | None


def estimates(agg: ReleasedAggregate, cell: int) -> Estimate:
    if agg.kind is AggregateKind.AVG:
        total, count = agg.statistics
        assert agg.lower is not None and agg.upper is not None
        mean, interval = ratio_estimate(
            total.values[cell],
            total.noise_std,
            count.values[cell],
            count.noise_std,
            agg.lower,
            agg.upper,
        )
        return Estimate(mean, interval)
    stat = agg.statistics[0]
    value = stat.values[cell]
    return Estimate(value, count_interval(value, stat.noise_scale))


def _fmt(value: float | None, mean: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.1f}" if mean else f"{value:,.0f}"


def result_rows(result: NodeResult) -> list[dict[str, Any]]:
    rows = []
    for i, cell in enumerate(result.cells):
        row: dict[str, Any] = dict(zip(result.group_by, cell, strict=True))
        for agg in result.aggregates:
            est = estimates(agg, i)
            row[agg.alias] = est.value
            row[f"{agg.alias}_ci_low"] = est.interval.low if est.interval else None
            row[f"{agg.alias}_ci_high"] = est.interval.high if est.interval else None
        rows.append(row)
    return rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain left-aligned columns, for operators' status tables."""
    widths = [max([len(h), *(len(r[j]) for r in rows)]) for j, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def render_table(result: NodeResult) -> str:
    headers = [*result.group_by]
    for agg in result.aggregates:
        headers += [agg.alias, "95% interval"]
    body: list[list[str]] = []
    for i, cell in enumerate(result.cells):
        line = [_value(v) for v in cell]
        for agg in result.aggregates:
            est = estimates(agg, i)
            mean = agg.kind is AggregateKind.AVG
            line.append(_fmt(est.value, mean))
            line.append(
                f"{_fmt(est.interval.low, mean)} to {_fmt(est.interval.high, mean)}"
                if est.interval
                else "n/a"
            )
        body.append(line)
    widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for line in body:
        out.append(
            "  ".join(
                c.rjust(w) if j >= len(result.group_by) else c.ljust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    out.append("")
    out.append(
        f"trust {result.node_id}: ε spent {units_to_epsilon(result.epsilon_units):g}; "
        "values are differentially private estimates (discrete Laplace noise); "
        "intervals cover the true value with at least 95% probability "
        "(means: approximate)."
    )
    return "\n".join(out)


def _value(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render_json(result: NodeResult, extra: dict[str, Any] | None = None) -> str:
    doc = {
        "query_id": result.query_id,
        "node_id": result.node_id,
        "project_id": result.project_id,
        "view": result.view,
        "catalog_version": result.catalog_version,
        "epsilon_spent": units_to_epsilon(result.epsilon_units),
        "rows": result_rows(result),
        "release": json.loads(result.to_json()),
        **(extra or {}),
    }
    return json.dumps(doc, indent=2, sort_keys=False)

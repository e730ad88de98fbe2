"""A federated answer as the researcher receives it: estimates with 95% intervals, suppressed
marks, which trusts it covers, and ε spent and left. Readable as a table, CSV, JSON, an Arrow
table or a pandas DataFrame. Everything here is post-processing of released noisy values."""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtre.catalog import Value
from fedtre.errors import FedtreError

if TYPE_CHECKING:
    import pandas
    import pyarrow


@dataclass(frozen=True)
class TrustReport:
    node_id: str
    state: str  # answered / unavailable / refused / failed / withdrawn
    reason: str
    refusal: str | None
    epsilon_spent: float
    epsilon_left: float | None
    replayed: bool
    data_as_of: str = ""  # the date of the trust's extract, when it answered


@dataclass(frozen=True)
class EstimateValue:
    available: bool
    suppressed: bool
    value: float | None
    low: float | None
    high: float | None
    display: str
    std_error: float | None = None  # standard error of the estimate (None when not shown)


@dataclass(frozen=True)
class EstimateColumn:
    alias: str
    kind: str  # count / count_persons / sum / avg
    estimates: tuple[EstimateValue, ...]
    column: str | None = None  # the view column summed or averaged


@dataclass(frozen=True)
class QueryResult:
    query_id: str
    project_id: str
    view: str
    released: bool
    withheld_reason: str
    group_by: tuple[str, ...]
    cells: tuple[tuple[Value, ...], ...]
    columns: tuple[EstimateColumn, ...]
    trusts: tuple[TrustReport, ...]
    covered_trusts: tuple[str, ...]
    epsilon: float
    notes: tuple[str, ...]
    reference_date: str = ""  # the date every covered trust computed ages at (YYYY-MM-DD)
    catalog_version: str = ""

    # -- what happened -------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """``released`` (every trust), ``partial`` (released without some trusts), ``refused``
        (not released, and some trust's own rules said no), ``withheld`` (not released because
        trusts did not answer)."""
        if self.released:
            return "partial" if len(self.covered_trusts) < len(self.trusts) else "released"
        return "refused" if any(t.state == "refused" for t in self.trusts) else "withheld"

    def summary(self) -> str:
        """One line for people: what was released and what was not, and why."""
        missing = [t for t in self.trusts if t.state != "answered"]
        why = "; ".join(
            f"{t.node_id} {t.state}" + (f" ({t.reason})" if t.reason else "") for t in missing
        )
        if self.status == "released":
            return f"released: covers all {len(self.trusts)} trusts"
        if self.status == "partial":
            return (
                f"partial: covers {', '.join(self.covered_trusts)} "
                f"({len(self.covered_trusts)} of {len(self.trusts)} trusts); not covered: {why}"
            )
        return f"{self.status}: {self.withheld_reason or why}" + (
            f" [{why}]" if why and self.withheld_reason else ""
        )

    # -- machine-readable ------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One dict per cell: group values, then per aggregate its estimate, interval bounds and
        a suppressed flag. Suppressed or unavailable estimates are None."""
        out = []
        for i, cell in enumerate(self.cells):
            row: dict[str, Any] = dict(zip(self.group_by, cell, strict=True))
            for col in self.columns:
                e = col.estimates[i]
                row[col.alias] = e.value
                row[f"{col.alias}_ci_low"] = e.low
                row[f"{col.alias}_ci_high"] = e.high
                row[f"{col.alias}_se"] = e.std_error
                row[f"{col.alias}_suppressed"] = e.suppressed
            out.append(row)
        return out

    def to_arrow(self) -> pyarrow.Table:
        import pyarrow as pa

        rows = self.rows()
        names = [*self.group_by]
        for col in self.columns:
            names += [col.alias, f"{col.alias}_ci_low", f"{col.alias}_ci_high"]
            names += [f"{col.alias}_se", f"{col.alias}_suppressed"]
        table = pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names})
        metadata = {
            "query_id": self.query_id,
            "project_id": self.project_id,
            "covered_trusts": ",".join(self.covered_trusts),
            "epsilon_per_trust": repr(self.epsilon),
            "reference_date": self.reference_date,
            "notes": " | ".join(self.notes),
        }
        return table.replace_schema_metadata(metadata)

    def to_pandas(self) -> pandas.DataFrame:
        """Counts and sums as pandas ``Int64`` (whole numbers, missing when suppressed)."""
        frame = self.to_arrow().to_pandas()
        for col in self.columns:
            if col.kind != "avg":
                for name in (col.alias, f"{col.alias}_ci_low", f"{col.alias}_ci_high"):
                    frame[name] = frame[name].round().astype("Int64")
        frame.attrs.update(
            query_id=self.query_id,
            project_id=self.project_id,
            covered_trusts=list(self.covered_trusts),
            epsilon_per_trust=self.epsilon,
            reference_date=self.reference_date,
            notes=list(self.notes),
        )
        return frame

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "project_id": self.project_id,
            "view": self.view,
            "status": self.status,
            "released": self.released,
            "withheld_reason": self.withheld_reason or None,
            "covered_trusts": list(self.covered_trusts),
            "epsilon_per_trust": self.epsilon,
            "reference_date": self.reference_date or None,
            "rows": self.rows() if self.released else [],
            "trusts": [t.__dict__ for t in self.trusts],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        """The rows as CSV. A partial, withheld or refused result says so in ``#`` lines first
        (``pandas.read_csv(..., comment="#")`` skips them); one not released lists each
        trust's state instead of rows, so the output is never empty."""
        buffer = io.StringIO()
        if self.status != "released":
            for line in self.summary().splitlines():
                buffer.write(f"# {line}\n")
        rows = self.rows() if self.released else []
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        elif not self.released:
            plain = csv.writer(buffer, lineterminator="\n")
            plain.writerow(["trust", "state", "refusal", "reason"])
            for t in self.trusts:
                plain.writerow([t.node_id, t.state, t.refusal or "", t.reason])
        return buffer.getvalue()

    # -- for people ------------------------------------------------------------------------

    def _repr_html_(self) -> str:
        """The table in Jupyter: estimates with intervals, then each trust's state."""
        e = html.escape
        parts = [f"<p><b>{e(self.project_id)}</b> · {e(self.summary())}</p>"]
        if self.released:
            head = "".join(f"<th>{e(h)}</th>" for h in self.group_by)
            for col in self.columns:
                head += f"<th>{e(col.alias)}</th><th>95% interval</th>"
            body = []
            for i, cell in enumerate(self.cells):
                tds = "".join(f"<td>{e(_text(v))}</td>" for v in cell)
                for col in self.columns:
                    est = col.estimates[i]
                    interval = (
                        f"{_num(est.low, col.kind == 'avg')} to {_num(est.high, col.kind == 'avg')}"
                        if est.low is not None and est.high is not None
                        else ""
                    )
                    tds += (
                        f"<td style='text-align:right'>{e(est.display)}</td><td>{e(interval)}</td>"
                    )
                body.append(f"<tr>{tds}</tr>")
            parts.append(
                f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            )
        trusts = "".join(
            f"<li>{e(t.node_id)}: {e(t.state)}"
            + (f" ({e(t.reason)})" if t.reason else "")
            + (f"; data as of {e(t.data_as_of)}" if t.data_as_of else "")
            + "</li>"
            for t in self.trusts
        )
        parts.append(f"<ul>{trusts}</ul>")
        parts += [f"<p><small>{e(n)}</small></p>" for n in self.notes]
        return "\n".join(parts)

    def table(self) -> str:
        lines: list[str] = []
        if self.released:
            lines += _grid(self)
        else:
            lines.append(f"No result released: {self.withheld_reason}")
        lines.append("")
        lines.append("Trusts:")
        for t in self.trusts:
            left = "" if t.epsilon_left is None else f"; ε left {t.epsilon_left:g}"
            spent = f"ε spent {t.epsilon_spent:g}" if t.state == "answered" else "nothing spent"
            replay = " (stored answer, no new spend)" if t.replayed else ""
            why = f": {t.reason}" if t.reason and t.state != "answered" else ""
            fresh = f"; data as of {t.data_as_of}" if t.data_as_of else ""
            lines.append(f"  {t.node_id:<20} {t.state}{why}; {spent}{replay}{left}{fresh}")
        if self.released:
            lines.append(f"Covers: {', '.join(self.covered_trusts)}")
            lines.append(f"Ages are at the federation's reference date, {self.reference_date}.")
        for note in self.notes:
            lines.append(f"Note: {note}")
        lines.append(f"Query id: {self.query_id} (reuse it to fetch this answer again at no cost)")
        return "\n".join(lines)


def _grid(r: QueryResult) -> list[str]:
    headers = [*r.group_by]
    for col in r.columns:
        headers += [col.alias, "95% interval"]
    body = []
    for i, cell in enumerate(r.cells):
        line = [_text(v) for v in cell]
        for col in r.columns:
            e = col.estimates[i]
            mean = col.kind == "avg"
            line.append(e.display)
            if e.low is not None and e.high is not None:
                line.append(f"{_num(e.low, mean)} to {_num(e.high, mean)}")
            else:
                line.append("")
        body.append(line)
    widths = [max(len(h), *(len(row[j]) for row in body)) for j, h in enumerate(headers)]
    keys = len(r.group_by)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for row in body:
        out.append(
            "  ".join(
                c.ljust(w) if j < keys else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return out


def _num(value: float, mean: bool) -> str:
    return f"{value:,.1f}" if mean else f"{value:,.0f}"


def _text(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class NotReleased(FedtreError):
    """The query ran but no result was released: withheld (trusts did not answer) or refused
    (some trust's own rules said no). Nothing was spent at any trust whose answer was withdrawn.
    ``result`` carries every trust's state and reason."""

    def __init__(self, result: QueryResult) -> None:
        super().__init__(result.summary())
        self.result = result
        self.status = result.status
        self.trusts = {t.node_id: t.state for t in result.trusts}


@dataclass(frozen=True)
class ProjectInfo:
    """A project as a researcher on it sees it."""

    project_id: str
    title: str
    trusts: tuple[str, ...]
    max_epsilon_per_query: float
    allow_partial: bool
    suppress_below: int
    round_to: int
    default_epsilon: float = 0.0
    views: tuple[str, ...] = ()  # approved at every trust of the project (as they report it)
    max_tier: str = ""  # the highest tier every trust approved ("" if none reported)


@dataclass(frozen=True)
class ProjectBudget:
    project_id: str
    trusts: tuple[TrustReport, ...]  # epsilon_left per trust, or why it is unknown

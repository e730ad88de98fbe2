"""What a researcher is told about a result: its status in every format, never an empty output."""

from __future__ import annotations

import csv
import io
import json

import pytest

from fedtre.answer import EstimateColumn, EstimateValue, NotReleased, QueryResult, TrustReport


def _trust(node: str, state: str, reason: str = "", refusal: str | None = None) -> TrustReport:
    spent = 0.1 if state == "answered" else 0.0
    return TrustReport(node, state, reason, refusal, spent, 4.9, False)


def _result(states: dict[str, str], released: bool, reason: str = "") -> QueryResult:
    trusts = tuple(
        _trust(
            n,
            s,
            "" if s == "answered" else f"{s} reason",
            "out_of_scope" if s == "refused" else None,
        )
        for n, s in states.items()
    )
    covered = tuple(n for n, s in states.items() if s == "answered") if released else ()
    est = EstimateValue(True, False, 120, 110, 130, "120", 5.0)
    return QueryResult(
        query_id="q-1",
        project_id="study",
        view="patients" if released else "",
        released=released,
        withheld_reason=reason,
        group_by=("sex",) if released else (),
        cells=(("female",),) if released else (),
        columns=(EstimateColumn("n", "count", (est,)),) if released else (),
        trusts=trusts,
        covered_trusts=covered,
        epsilon=0.1,
        notes=(),
    )


CASES = {
    "released": (_result({"a": "answered", "b": "answered"}, True), "released"),
    "partial": (_result({"a": "answered", "b": "unavailable"}, True), "partial"),
    "refused": (_result({"a": "withdrawn", "b": "refused"}, False, "b refused"), "refused"),
    "withheld": (_result({"a": "withdrawn", "b": "unavailable"}, False, "b down"), "withheld"),
}


@pytest.mark.parametrize("name", CASES)
def test_every_format_says_the_status(name: str) -> None:
    result, status = CASES[name]
    assert result.status == status
    assert json.loads(result.to_json())["status"] == status
    text = result.to_csv()
    assert text.strip(), "never an empty output"
    if status == "released":
        assert not text.startswith("#")
    else:
        assert text.startswith(f"# {status}")
    rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    data = [r for r in rows if r and not r[0].startswith("#")]
    if result.released:
        assert data[0][:2] == ["sex", "n"] and data[1][0] == "female"
    else:  # each trust's state instead of rows
        assert data[0] == ["trust", "state", "refusal", "reason"]
        assert {r[0]: r[1] for r in data[1:]} == {t.node_id: t.state for t in result.trusts}
    assert status in result.summary()


def test_not_released_carries_every_trusts_state() -> None:
    result = CASES["refused"][0]
    error = NotReleased(result)
    assert error.status == "refused" and error.trusts == {"a": "withdrawn", "b": "refused"}
    assert error.result is result and "refused" in str(error)


def test_the_html_table_escapes_what_it_shows() -> None:
    result = CASES["partial"][0]
    bad = QueryResult(**{**result.__dict__, "project_id": "<script>"})
    html = bad._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html

"""``fedtre node calibrate``: times the heaviest query shapes and suggests an answer slot,
spending nothing and printing no data."""

from __future__ import annotations

import json

from fedtre.cli import main
from fedtre.parse import parse_query
from node.calibrate import SAFETY, calibrate, heavy_shapes
from node.config import load_node_config
from node.engine import NodeEngine
from tests.conftest import write_node_config


def test_heavy_shapes_are_valid_queries_that_reach_the_parsers_limits(catalog):
    shapes = heavy_shapes(catalog)
    assert len(shapes) == 4 * len(catalog.views)
    for shape in shapes:
        plan = parse_query(shape.sql, catalog)  # raises if the language would refuse it
        assert plan.aggregates


def test_the_suggested_slot_covers_the_slowest_answer_with_a_margin(tmp_path, node_db):
    config = load_node_config(write_node_config(tmp_path, node_db, answer_slot_ms=1))
    result = calibrate(config, repeats=1, concurrency=1)
    assert result.suggested_ms % 50 == 0 and result.suggested_ms >= 100
    assert result.suggested_ms >= SAFETY * result.worst * 1000
    assert all(len(t.seconds) == 1 for t in result.timings)
    engine = NodeEngine(config)  # nothing was spent, nothing was audited as released
    try:
        assert engine.budget("study").spent_units == 0
        assert engine.ledger.debits() == []
    finally:
        engine.close()


def test_cli_prints_times_only(tmp_path, node_db, capsys):
    config = write_node_config(tmp_path, node_db, answer_slot_ms=1)
    assert main(["node", "calibrate", "--config", str(config), "--repeats", "1",
                 "--concurrency", "1"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "suggested answer_slot_ms" in table and "shorter than suggested" in table
    assert main(["node", "calibrate", "--config", str(config), "--repeats", "1",
                 "--concurrency", "1", "--format", "json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert doc["configured_answer_slot_ms"] == 1
    assert set(doc) == {
        "suggested_answer_slot_ms", "configured_answer_slot_ms", "concurrency",
        "durable_write_ms", "slowest_answer_ms", "shapes",
    }  # fmt: skip
    for shape in doc["shapes"]:
        assert set(shape) == {"shape", "p50_ms", "worst_ms"}

"""Each answer states how fresh the trust's data is: the date of its extract."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fedtre.catalog import Catalog
from node.config import load_node_config
from node.engine import NodeEngine
from node.loader import load_omop
from tests.conftest import request, write_node_config


def test_every_answer_states_the_extract_date(
    tmp_path: Path, omop_dir: Path, catalog: Catalog
) -> None:
    db = tmp_path / "node.duckdb"
    load_omop(omop_dir, db, catalog, extract_date=dt.date(2026, 11, 30))
    engine = NodeEngine(load_node_config(write_node_config(tmp_path / "n", db)))
    try:
        result = engine.answer(request("SELECT COUNT(*) AS n FROM patients"))
        assert result.data_as_of == "2026-11-30"
        assert result.to_json().count('"data_as_of":"2026-11-30"') == 1  # stored with it
    finally:
        engine.close()


def test_without_an_extract_date_the_day_of_the_load_is_stated(
    tmp_path: Path, node_db: Path
) -> None:
    engine = NodeEngine(load_node_config(write_node_config(tmp_path / "n", node_db)))
    try:
        result = engine.answer(request("SELECT COUNT(*) AS n FROM patients"))
        day = dt.date.fromisoformat(result.data_as_of)
        assert abs((dt.datetime.now(dt.UTC).date() - day).days) <= 1
    finally:
        engine.close()

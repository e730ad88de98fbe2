"""A node's audit log: only its server logs a start or a stop (the command-line tools share
the log without claiming either), and a start with other settings is recorded as such."""

from __future__ import annotations

import dataclasses

from fedtre.audit.log import read_audit
from fedtre.audit.verify import verify
from node.config import load_node_config
from node.engine import NodeEngine
from tests.conftest import request

GOOD = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


def test_tools_never_log_a_start_or_stop_and_setting_changes_are_recorded(
    node_config_factory,
) -> None:
    config = node_config_factory()
    NodeEngine(config, serving=True).close()  # the server
    tool = NodeEngine(config)  # e.g. `fedtre node query` while the server runs
    tool.answer(request(GOOD, 0.1, query_id="local-1"))
    tool.close()
    changed = dataclasses.replace(config, answer_slot_ms=250, config_digest="f" * 64)
    NodeEngine(changed, serving=True).close()
    events = [e["event"] for e in read_audit(config.audit_path)]
    assert events.count("node.started") == 2 and events.count("node.stopped") == 2
    assert events.count("query.released") == 1
    (change,) = [e for e in read_audit(config.audit_path) if e["event"] == "config.changed"]
    assert change["before"] == config.config_digest and change["after"] == "f" * 64
    assert (
        events.index("config.changed") == len(events) - 1 - events[::-1].index("node.started") - 1
    )
    assert verify(config.audit_path).ok


def test_the_digest_follows_the_settings_file(tmp_path, node_config_factory) -> None:
    config = node_config_factory()
    path = tmp_path / "node0" / "node.toml"
    assert load_node_config(path).config_digest == config.config_digest != ""
    path.write_text(path.read_text().replace("answer_slot_ms = 1", "answer_slot_ms = 2"))
    assert load_node_config(path).config_digest != config.config_digest

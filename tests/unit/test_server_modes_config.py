"""``[server]`` modes in the node config and dial-out trusts in the coordinator config: every
mistake is refused at start-up with a line saying what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.config import parse_coordinator_config
from fedtre.errors import ConfigError
from node.config import ServerMode, parse_node_config


def _node(server: dict[str, Any]) -> dict[str, Any]:
    return {
        "node_id": "trust-a",
        "database": "x.duckdb",
        "state_dir": "state",
        "node_epsilon_ceiling": 10.0,
        "projects": {},
        "server": server,
    }


def test_dial_out_node_config() -> None:
    config = parse_node_config(
        _node({"mode": "dial-out", "connect": ["hub.example.org:443"], "coordinator": "hub"}),
        Path("/tmp"),
        "t",
    )
    assert config.server is not None
    assert config.server.mode is ServerMode.DIAL_OUT
    assert config.server.connect == ("hub.example.org:443",)
    assert config.server.listen == ""


@pytest.mark.parametrize(
    ("server", "says"),
    [
        ({"mode": "sideways", "listen": "0.0.0.0:1", "coordinator": "hub"}, "dial-in"),
        ({"mode": "dial-out", "coordinator": "hub"}, "connect"),
        ({"mode": "dial-out", "connect": [], "coordinator": "hub"}, "connect"),
        ({"mode": "dial-out", "connect": "nowhere", "coordinator": "hub"}, "connect"),
        (
            {"mode": "dial-out", "connect": ["a:1", "a:1"], "coordinator": "hub"},
            "listed twice",
        ),
        (
            {"mode": "dial-out", "connect": "a:1", "listen": "0.0.0.0:1", "coordinator": "hub"},
            "listens on nothing",
        ),
        ({"listen": "0.0.0.0:1", "connect": "a:1", "coordinator": "hub"}, "dial-out"),
        ({"coordinator": "hub"}, "listen"),
    ],
)
def test_bad_server_sections_are_refused(server: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_node_config(_node(server), Path("/tmp"), "t")


def _coordinator(nodes: dict[str, Any]) -> dict[str, Any]:
    return {
        "coordinator_id": "hub",
        "listen": "127.0.0.1:0",
        "state_dir": "state",
        "nodes": nodes,
        "projects": {},
    }


def test_dial_out_trusts_in_the_coordinator_config() -> None:
    config = parse_coordinator_config(
        _coordinator({"trust-a": {"mode": "dial-out"}, "trust-b": {"address": "b:1"}}),
        Path("/tmp"),
        "t",
    )
    assert config.nodes["trust-a"].dial_out and not config.nodes["trust-b"].dial_out


@pytest.mark.parametrize(
    "spec",
    [{"mode": "dial-out", "address": "a:1"}, {"mode": "sideways"}, {}],
    ids=["address-on-dial-out", "unknown-mode", "nothing"],
)
def test_bad_trust_entries_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):  # CoordinatorConfigError is one too
        parse_coordinator_config(_coordinator({"trust-a": spec}), Path("/tmp"), "t")
